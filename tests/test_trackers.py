"""Experiment trackers through Lightning's loggers: a tiny run logged with MLflow to a local folder."""

from __future__ import annotations

import pytest

from benchmarks.cli import main
from benchmarks.records import entry_table, iter_record_files, read_record


@pytest.mark.slow
def test_a_tiny_run_logged_with_mlflow_has_its_metrics_in_the_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracker-test")
    code = main(["run", "--suite", "digits", "--methods", "simclr", "--epochs", "2", "--seeds", "0", "--no-references",
                 "--no-report", "--no-progress", "--logger", "mlflow", "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "work"), "--set", "dataset.options.test_fraction=0.75",
                 "evaluation.protocols=[knn, clustering]", "train.online_knn_every=1", "train.log_every_n_steps=1"])
    assert code == 0
    (record_file,) = iter_record_files(tmp_path / "out")
    record = read_record(record_file)
    assert record["config"]["train"]["logger"] == "mlflow"  # the chosen tracker is in the record

    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("tracker-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    # the per-epoch loss and the online kNN monitor arrived, one value per epoch, equal to the record's history
    losses = client.get_metric_history(run.info.run_id, "epoch_loss")
    knn = client.get_metric_history(run.info.run_id, "online_knn_top1")
    assert [round(m.value, 5) for m in sorted(losses, key=lambda m: m.step)] == \
        [round(h["loss"], 5) for h in record["history"]]
    assert len(knn) == 2 and all(0 <= m.value <= 100 for m in knn)
    assert client.get_metric_history(run.info.run_id, "train_loss")  # per-step loss too
    # the resolved settings as hyperparameters, and every evaluation metric of the record, in the same run
    params = run.data.params
    assert params["config.train.batch_size"] == str(record["config"]["train"]["batch_size"])
    assert params["method_config.hparams.temperature"] == str(record["method_config"]["hparams"]["temperature"])
    assert params["config.train.threads"] == str(record["config"]["train"]["threads"])
    assert {"knn_k20", "clustering"} <= set(entry_table(record))
    for key, values in entry_table(record).items():
        for metric, value in values.items():
            assert run.data.metrics[f"eval/{key}/{metric}"] == pytest.approx(value)


@pytest.mark.slow
def test_tensorboard_gets_the_settings_and_the_evaluation_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = main(["run", "--suite", "digits", "--methods", "simclr", "--epochs", "1", "--seeds", "0", "--no-references",
                 "--no-report", "--no-progress", "--logger", "tensorboard", "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "work"), "--set", "dataset.options.test_fraction=0.75",
                 "evaluation.protocols=[knn, clustering]", "train.online_knn_every=0"])
    assert code == 0
    record = read_record(iter_record_files(tmp_path / "out")[0])
    (hparams,) = (tmp_path / "work").rglob("tensorboard/version_0/hparams.yaml")
    text = hparams.read_text()
    assert "config.train.batch_size" in text and "method_config.hparams.temperature" in text
    events = EventAccumulator(str(hparams.parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for key in ("knn_k20", "clustering"):
        for metric, value in entry_table(record)[key].items():
            tag = f"eval/{key}/{metric}"
            assert tag in scalars
            assert events.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-6)


def test_a_tracker_that_is_not_installed_stops_the_run_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    missing = {"tensorboard", "tensorboardX"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in missing else real_find_spec(name, *a, **k))
    out, work = tmp_path / "out", tmp_path / "work"
    code = main(["run", "--suite", "digits", "--methods", "simclr", "--seeds", "0", "--epochs", "1",
                 "--logger", "tensorboard", "--out", str(out), "--work-dir", str(work), "--no-report",
                 "--no-references", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.logger: tensorboard is not installed" in err and "pip install tensorboard" in err
    assert not out.exists() and not work.exists()
