"""End to end: CIFAR-10 -> CIFAR-100 transfer through run_one on the fixture datasets, and the
`evaluate` command re-evaluating a saved digits model without retraining."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.config import load_suite
from benchmarks.data import load_split
from benchmarks.evaluation.clustering import clustering_metrics, kmeans_assign
from benchmarks.evaluation.features import backbone_features
from benchmarks.evaluation.linear import Labelled, linear_probe
from benchmarks.evaluation.transfer import transfer_preprocess
from benchmarks.records import entry_table, same_run_records
from benchmarks.runner import (
    RunContext,
    build_augment,
    build_method,
    load_model_file,
    load_suite_data,
    run_one,
)

try:
    from tests import fixtures
except ImportError:
    import fixtures


def rebuild(config, model_file, data):
    payload = load_model_file(model_file)
    method, _ = build_method(config, payload["method"], data)
    method.load_state_dict(payload["state_dict"])
    return method.eval()


@pytest.mark.slow
def test_cifar10_to_cifar100_transfer_end_to_end(tmp_path):
    root = tmp_path / "data"
    fixtures.make_cifar10(root)
    fixtures.make_cifar100(root)
    transfer = {"targets": ["cifar100"], "epochs": 5, "batch_size": 32, "lr": 0.1}
    config = load_suite("cifar10", {
        "backbone": "small_cnn",  # the protocol, not the architecture, is under test: keep it fast
        "train": {"epochs": 1, "batch_size": 16, "seeds": [0], "online_knn_every": 0, "accelerator": "cpu"},
        "evaluation": {"protocols": ["knn", "transfer"], "knn": {"ks": [5]}, "transfer": transfer}})
    record = run_one(config, "simclr", 0, RunContext(results_dir=tmp_path / "results", work_dir=tmp_path / "runs",
                                                     data_root=root, progress=False))
    assert record["status"] == "completed"
    metrics = entry_table(record)["transfer_linear:CIFAR-100"]
    assert set(metrics) == {"top1", "top5"}
    params = record["evaluation"]["transfer_linear:CIFAR-100"]
    assert params["num_classes"] == 100 and params["epochs"] == 5 and params["target"] == "cifar100"
    assert "knn_k5" in entry_table(record)
    # the recorded numbers are a linear probe on CIFAR-100 features of the pretrained backbone
    data = load_suite_data(config, root)
    method = rebuild(config, record["checkpoint"], data)
    norm = config.augment.normalization
    prep = transfer_preprocess(32, 3, norm.mean, norm.std)
    train, test = load_split("cifar100", "train", root), load_split("cifar100", "test", root)
    feats = [backbone_features(method.backbone, split, prep) for split in (train, test)]
    expected, _, _ = linear_probe(Labelled(feats[0], train.labels), Labelled(feats[1], test.labels), 100,
                                  {**transfer, "momentum": 0.9, "weight_decay": 0.0}, seed=0)
    assert metrics == pytest.approx(expected)


@pytest.mark.slow
def test_evaluate_cli_reevaluates_a_checkpoint_without_retraining(tmp_path, capsys):
    out, work = tmp_path / "results", tmp_path / "runs"
    common = ["--out", str(out), "--no-progress"]
    assert main(["run", "--suite", "digits", "--methods", "simclr", "--seeds", "0", "--no-references", "--epochs", "1",
                 "--work-dir", str(work), "--no-report", "--protocols", "knn",
                 "--set", "train.online_knn_every=0", *common]) == 0
    (record_file,) = same_run_records(out, "digits", "simclr", 1, 0)
    before = json.loads(record_file.read_text())
    assert "clustering" not in entry_table(before) and before["clusters"] == {}
    (model,) = (work / "digits").glob("simclr_e1_s0_*/model.pt")
    files_before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != ".lock"}

    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "clustering", *common]) == 0
    after = json.loads(record_file.read_text())
    # nothing retrained: the work dir is untouched, history and kNN metrics kept
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != ".lock"} == files_before
    assert after["history"] == before["history"]
    assert entry_table(after)["knn_k20"] == entry_table(before)["knn_k20"]
    assert after["clusters"]["clustering"]["source"] == "kmeans" and after["clusters"]["clustering"]["num_clusters"] == 10
    # the same record (the same evaluation settings), with the pretraining provenance kept and this evaluation added
    assert same_run_records(out, "digits", "simclr", 1, 0) == [record_file]
    assert after["provenance"]["pretraining"] == before["provenance"]["pretraining"]
    assert [e["command"] for e in after["provenance"]["evaluations"]] == ["run", "evaluate"]
    assert after["provenance"]["evaluations"][1]["protocols"] == ["clustering"]
    # the numbers are k-means on the saved model's test features
    config = load_suite("digits")
    data = load_suite_data(config)
    method = rebuild(config, model, data)
    feats = backbone_features(method.backbone, data.test, build_augment(config.augment).clean)
    c = config.evaluation.clustering
    assignment, _ = kmeans_assign(feats, 10, 0, c.niter, c.nredo, c.spherical)
    assert entry_table(after)["clustering"]["NMI"] == pytest.approx(100 * clustering_metrics(data.test.labels,
                                                                                            assignment)["nmi"])

    # existing metrics are replaced only with --force
    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "clustering", *common]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "clustering", "--force", *common]) == 0
    assert json.loads(record_file.read_text())["metrics"] == after["metrics"]  # deterministic

    # other evaluation settings: a record of their own (its own report column), never mixed into this one
    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "knn", "--set",
                 "evaluation.knn.temperature=0.2", *common]) == 0
    others = [p for p in same_run_records(out, "digits", "simclr", 1, 0) if p != record_file]
    assert len(others) == 1 and json.loads(record_file.read_text())["metrics"] == after["metrics"]
    other = json.loads(others[0].read_text())
    assert set(entry_table(other)) == {"knn_k20", "knn_k200"} and other["history"] == before["history"]
    assert other["evaluation"]["knn_k20"]["settings"]["temperature"] == 0.2
    assert other["fingerprints"]["training"] == before["fingerprints"]["training"]
    assert other["fingerprints"]["evaluation"] != before["fingerprints"]["evaluation"]
    assert other["provenance"]["pretraining"] == before["provenance"]["pretraining"]

    # a checkpoint of another suite/method is refused
    assert main(["evaluate", "--checkpoint", str(model), "--suite", "mnist", *common]) == 2
    assert "trained on suite 'digits'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(model), "--method", "byol", *common]) == 2

    # no record yet: one is created
    fresh = tmp_path / "fresh"
    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "knn", "--out", str(fresh),
                 "--no-progress"]) == 0
    (created_file,) = same_run_records(fresh, "digits", "simclr", 1, 0)
    created = json.loads(created_file.read_text())
    assert created["status"] == "completed"
    assert entry_table(created)["knn_k20"] == entry_table(before)["knn_k20"]


@pytest.mark.slow
def test_a_set_only_variant_is_evaluated_later_from_its_model_file_alone(tmp_path, capsys):
    """Issue 24: `simclr/t05` exists only through --set; its model file carries the settings that built it, so
    `evaluate` needs neither the --set again nor a suite section (and per-block kNN fits digits' 3-block CNN)."""
    import torch

    out, work = tmp_path / "results", tmp_path / "runs"
    common = ["--out", str(out), "--no-progress"]
    assert main(["run", "--suite", "digits", "--methods", "simclr/t05", "--epochs", "1", "--seeds", "0",
                 "--no-references", "--no-report", "--work-dir", str(work), *common, "--set",
                 "methods.simclr/t05.temperature=0.5", "train.online_knn_every=0", "evaluation.protocols=[knn]",
                 "dataset.options.test_fraction=0.75"]) == 0
    (record_file,) = same_run_records(out, "digits", "simclr/t05", 1, 0)
    (model,) = (work / "digits").glob("simclr+t05_e1_s0_*/model.pt")
    payload = load_model_file(model)
    assert payload["method_config"]["hparams"]["temperature"] == 0.5
    assert payload["config"]["methods"]["simclr/t05"] == {"temperature": 0.5}

    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "knn_k10", *common]) == 0
    assert same_run_records(out, "digits", "simclr/t05", 1, 0) == [record_file]  # the run's record, same settings
    record = json.loads(record_file.read_text())
    assert {"knn_k20", "knn_k10_B2", "knn_k10_B3", "knn_k10_avg"} <= set(entry_table(record))
    assert record["method_config"]["hparams"]["temperature"] == 0.5

    # the SSL++ block classifier, on the blocks small_cnn has (its budget cut to 1 epoch: other evaluation
    # settings, so a record of their own)
    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "block_classifier", *common,
                 "--set", "evaluation.block_classifier.epochs=1"]) == 0
    (other,) = [p for p in same_run_records(out, "digits", "simclr/t05", 1, 0) if p != record_file]
    assert {"block_classifier_B2", "block_classifier_B3"} <= set(entry_table(json.loads(other.read_text())))

    # a model file of an older version (no settings in it) still works as before: the suite plus --set
    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    torch.save({k: v for k, v in payload.items() if k not in ("config", "method_config")}, old)
    assert main(["evaluate", "--checkpoint", str(old), "--protocols", "knn", "--out", str(tmp_path / "old_out"),
                 "--no-progress"]) == 2
    assert "unknown method variant 'simclr/t05'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(old), "--protocols", "knn", "--out", str(tmp_path / "old_out"),
                 "--no-progress", "--set", "methods.simclr/t05.temperature=0.5", "train.online_knn_every=0",
                 "dataset.options.test_fraction=0.75"]) == 0
