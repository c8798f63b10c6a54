"""The cifar10 suite end to end on a generated CIFAR-10 fixture (real on-disk format), and without CIFAR-10."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from benchmarks.backbones import build_backbone
from benchmarks.cli import main
from benchmarks.config import load_suite
from benchmarks.data import load_split
from benchmarks.records import metric_value, read_record, same_run_records
from benchmarks.runner import build_augment, load_model_file

try:
    from tests import fixtures
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cifar10_suite_end_to_end_on_the_fixture(tmp_path, capsys):
    root = fixtures.make_cifar10(tmp_path / "data", n_train=32, n_test=20)  # two steps of 16
    out, work = tmp_path / "out", tmp_path / "work"
    sets = ["evaluation.protocols=[knn]", "evaluation.knn.ks=[1, 5]"]
    assert main(["run", "--suite", "cifar10", "--data-root", str(root), "--epochs", "1", "--batch-size", "16",
                 "--seeds", "0", "--methods", "simclr", "--no-references", "--out", str(out), "--work-dir", str(work),
                 "--no-report", "--no-progress", "--set", *sets]) == 0
    assert "[cifar10] simclr seed 0: status completed" in capsys.readouterr().out
    (path,) = same_run_records(out, "cifar10", "simclr", 1, 0)
    record = read_record(path)
    assert (record["suite"], record["dataset"], record["backbone"]) == ("cifar10", "CIFAR-10", "resnet18_cifar")
    assert (record["epochs"], record["batch_size"], record["seed"]) == (1, 16, 0)
    assert record["config"]["augment"]["views"][0]["scale"] == [0.08, 1.0]  # the suite's own pipeline
    (epoch,) = record["history"]
    assert epoch["epoch"] == 1 and epoch["loss"] > 0 and 0 <= epoch["online_knn_top1"] <= 100
    assert {(e["protocol"], e["settings"]["k"]) for e in record["metrics"]} == {("knn", 1), ("knn", 5)}

    # independent check of the whole chain: the saved model's clean features + scikit-learn's 1-NN
    model = load_model_file(record["checkpoint"])
    assert (model["suite"], model["method"], model["backbone"]) == ("cifar10", "simclr", "resnet18_cifar")
    backbone = build_backbone("resnet18_cifar", 3)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in model["state_dict"].items()
                              if k.startswith("backbone.")})
    backbone.eval()
    clean = build_augment(load_suite("cifar10")).clean
    train, test = load_split("cifar10", "train", root), load_split("cifar10", "test", root)
    with torch.no_grad():
        train_f, test_f = backbone(clean(train.images)).numpy(), backbone(clean(test.images)).numpy()
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(train_f, train.labels.numpy())
    expected = 100.0 * (knn.predict(test_f) == test.labels.numpy()).mean()
    assert metric_value(record, "knn", "top1", k=1) == pytest.approx(expected, abs=1e-4)


def test_cifar10_suite_without_cifar10_stops_within_seconds(tmp_path):
    missing = tmp_path / "nonexistent"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "cifar10", "--data-root", str(missing),
                           "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--no-report"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.startswith("error: CIFAR-10 not found. Looked for:")
    assert str(missing / "cifar-10-batches-py" / "data_batch_1") in err  # the path
    assert "Expected layout:" in err and "data_batch_5, test_batch, batches.meta" in err  # the layout
    assert "--download" in err and "https://www.cs.toronto.edu/~kriz/cifar.html" in err  # how to get it
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    # before any training or model build (no out/work folder above); the bound is loose on purpose: the check
    # itself takes 3-4 s on an idle 2-core machine, more on a busy one, and timings belong to benchmarks
    assert elapsed < 30, f"took {elapsed:.1f} s"
