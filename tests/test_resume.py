"""Interrupted runs resume from their last epoch checkpoint to bitwise the same record (CPU).

The module runs digits/SimCLR for 4 epochs twice, side by side: once uninterrupted, once
SIGKILLed after its first epoch checkpoint and rerun with the same command. Later tests
work on copies of the killed run's folders.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import training
from benchmarks.cli import main
from benchmarks.errors import CheckpointError, RunLockedError, StorageError
from benchmarks.records import entry_table, read_record, same_run_records
from benchmarks.runner import load_model_file, run_lock
from benchmarks.training import (
    SafeCheckpointIO,
    global_rng_state,
    load_checkpoint_file,
    set_global_rng_state,
)

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 4
# a quarter of digits for training keeps each epoch short; evaluation on kNN only
RUN_ARGS = ["--suite", "digits", "--methods", "simclr", "--epochs", str(EPOCHS), "--seeds", "0", "--no-references",
            "--no-report", "--no-progress", "--set", "dataset.options.test_fraction=0.75", "evaluation.protocols=[knn]",
            "train.online_knn_every=1"]
# one thread per process: the two runs side by side do not oversubscribe the cores
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def record_file(out: Path) -> Path:
    """The run's record (its name holds the settings fingerprint); exactly one is expected."""
    (path,) = same_run_records(out, "digits", "simclr", EPOCHS, 0)
    return path


def run_dir(work: Path) -> Path:
    """The run's folder (its name holds the training fingerprint); exactly one is expected."""
    (path,) = sorted((work / "digits").glob(f"simclr_e{EPOCHS}_s0_*"))
    return path


def wait_for_run_dir(work: Path, proc: subprocess.Popen, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted((work / "digits").glob(f"simclr_e{EPOCHS}_s0_*")) if (work / "digits").is_dir() else []
        if found:
            return found[0]
        time.sleep(0.005)
    raise TimeoutError(f"no run folder under {work}")


def cli_command(out: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks", "run", *RUN_ARGS, "--out", str(out), "--work-dir", str(work), *extra]


def epochs_in(checkpoint: Path) -> int:
    """Completed epochs recorded in a checkpoint (readable at any time: it is replaced atomically)."""
    return len(load_checkpoint_file(checkpoint, mmap=True)["ssl_bench"]["history"])


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint: Path, min_epochs: int, timeout: float = 600) -> int:
    """Poll until `checkpoint` holds >= min_epochs epochs; returns the count seen (0 if the process ended)."""
    deadline, seen_mtime = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return 0
        if checkpoint.exists() and checkpoint.stat().st_mtime_ns != seen_mtime:
            seen_mtime = checkpoint.stat().st_mtime_ns
            epochs = epochs_in(checkpoint)
            if epochs >= min_epochs:
                return epochs
        time.sleep(0.005)
    raise TimeoutError(f"{checkpoint} did not reach {min_epochs} epochs in {timeout} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    a_out, a_work, b_out, b_work = root / "a_out", root / "a_work", root / "b_out", root / "b_work"
    env = ENV
    full = subprocess.Popen(cli_command(a_out, a_work), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(cli_command(b_out, b_work), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        checkpoint = wait_for_run_dir(b_work, victim) / "checkpoints" / "last.ckpt"
        wait_for_checkpoint(victim, checkpoint, min_epochs=1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_after = epochs_in(checkpoint)
    record_after_kill = bool(same_run_records(b_out, "digits", "simclr", EPOCHS, 0))
    _, full_err = full.communicate(timeout=600)
    assert full.returncode == 0, full_err
    resumed = subprocess.run(cli_command(b_out, b_work), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return {"root": root, "a_out": a_out, "a_work": a_work, "b_out": b_out, "b_work": b_work,
            "victim_rc": victim.returncode, "killed_after": killed_after, "record_after_kill": record_after_kill,
            "resumed": resumed}


@pytest.mark.slow  # uses the module's subprocess runs
def test_killed_run_resumes_to_bitwise_the_same_record(runs):
    assert runs["victim_rc"] == -signal.SIGKILL
    assert 1 <= runs["killed_after"] < EPOCHS, "the kill must land mid-run for this test to mean anything"
    assert not runs["record_after_kill"]
    assert f"after epoch {runs['killed_after']} of {EPOCHS}" in runs["resumed"].stderr
    full, resumed = read_record(record_file(runs["a_out"])), read_record(record_file(runs["b_out"]))
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, EPOCHS + 1))
    assert resumed["history"] == full["history"]  # every loss and online kNN value, exactly
    assert resumed["metrics"] == full["metrics"]
    assert resumed["config"] == full["config"] and resumed["fingerprints"] == full["fingerprints"]
    # the step log of the epochs before the kill survived the resume: every step is logged once
    steps = [row.split(",") for row in (run_dir(runs["b_work"]) / "logs" / "version_0" / "metrics.csv")
             .read_text().splitlines()]
    header, rows = steps[0], steps[1:]
    logged = sorted(int(r[header.index("step")]) for r in rows if r[header.index("train_loss")])
    full_steps = [row.split(",") for row in (run_dir(runs["a_work"]) / "logs" / "version_0" / "metrics.csv")
                  .read_text().splitlines()]
    full_logged = sorted(int(r[full_steps[0].index("step")]) for r in full_steps[1:]
                         if r[full_steps[0].index("train_loss")])
    assert logged == full_logged
    # and the final weights themselves
    model_a = load_model_file(run_dir(runs["a_work"]) / "model.pt")["state_dict"]
    model_b = load_model_file(run_dir(runs["b_work"]) / "model.pt")["state_dict"]
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _non_plain(obj, where="checkpoint") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in ([where] if not isinstance(k, (str, int)) else [])
                + _non_plain(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_plain(v, f"{where}[{i}]")]
    return [] if isinstance(obj, PLAIN) else [f"{where}: {type(obj).__name__}"]


@pytest.mark.slow  # uses the module's subprocess runs
def test_epoch_checkpoint_holds_only_plain_data(runs):
    checkpoint = torch.load(run_dir(runs["b_work"]) / "checkpoints" / "last.ckpt", weights_only=True)
    assert _non_plain(checkpoint) == []
    extra = checkpoint["ssl_bench"]
    assert len(extra["history"]) == EPOCHS and extra["format"] == training.CHECKPOINT_FORMAT
    assert set(extra["rng"]) >= {"torch", "numpy", "python"}
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == checkpoint["global_step"]  # scheduler state kept
    assert list((run_dir(runs["b_work"]) / "checkpoints").iterdir()) == [
        run_dir(runs["b_work"]) / "checkpoints" / "last.ckpt"]  # no temp files, no extra checkpoints


def _copy_run(runs, tmp_path) -> tuple[Path, Path]:
    out, work = tmp_path / "out", tmp_path / "work"
    shutil.copytree(runs["b_out"], out)
    shutil.copytree(runs["b_work"], work)
    return out, work


def _main(out: Path, work: Path, *flags: str, sets: tuple[str, ...] = ()) -> int:
    """The CLI in this process; `sets` extend RUN_ARGS' --set list."""
    return main(["run", *RUN_ARGS, *sets, "--out", str(out), "--work-dir", str(work), *flags])


@pytest.mark.slow  # uses the module's subprocess runs
def test_changed_settings_never_return_the_old_record(runs, tmp_path, capsys, caplog):
    out, work = _copy_run(runs, tmp_path)
    old_record = record_file(out)
    record_before = old_record.read_bytes()

    # the same settings: skipped, and it says so
    assert _main(out, work) == 0
    assert f"skipped: finished record {old_record} (same settings" in capsys.readouterr().out
    assert old_record.read_bytes() == record_before

    # another hyperparameter and learning rate: a new record trained from scratch in its own folder, never the
    # old numbers; the old record is kept and the note names the keys that differ
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        assert _main(out, work, sets=("methods.simclr.temperature=0.5", "optimizer.lr=1e-3")) == 0
    printed = capsys.readouterr().out
    assert "resuming" not in caplog.text
    assert "method_config.hparams.temperature" in printed and "method_config.optimizer.lr" in printed
    new = [p for p in same_run_records(out, "digits", "simclr", EPOCHS, 0) if p != old_record]
    assert len(new) == 1 and old_record.read_bytes() == record_before
    changed = read_record(new[0])
    assert changed["method_config"]["hparams"]["temperature"] == 0.5 and changed["method_config"]["optimizer"]["lr"] == 1e-3
    assert changed["history"][0]["loss"] != read_record(old_record)["history"][0]["loss"]

    # evaluation settings are not part of training: the finished checkpoint is reused (nothing retrains) for a
    # record of its own
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        assert _main(out, work, sets=("evaluation.knn.ks=[10]",)) == 0
    assert f"after epoch {EPOCHS} of {EPOCHS}" in caplog.text
    (reevaluated,) = [read_record(p) for p in same_run_records(out, "digits", "simclr", EPOCHS, 0)
                      if read_record(p)["fingerprints"]["evaluation"] != read_record(old_record)["fingerprints"]["evaluation"]]
    assert set(entry_table(reevaluated)) == {"knn_k10"} and reevaluated["history"] == read_record(old_record)["history"]

    # --restart with the same settings trains from scratch and replaces that record
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        assert _main(out, work, "--restart") == 0
    assert "resuming" not in caplog.text
    restarted = read_record(old_record)  # replaced: retrained from scratch (here with this process's threads)
    assert [h["epoch"] for h in restarted["history"]] == list(range(1, EPOCHS + 1))
    assert restarted["created"] >= read_record_bytes(record_before)["created"]
    assert restarted["fingerprints"] == read_record_bytes(record_before)["fingerprints"]


def read_record_bytes(data: bytes) -> dict:
    import json

    return json.loads(data)


@pytest.mark.slow  # uses the module's subprocess runs
def test_a_foreign_checkpoint_in_the_run_folder_is_refused(runs, tmp_path, capsys):
    out, work = _copy_run(runs, tmp_path)
    original = run_dir(work)
    sets = ("methods.simclr.temperature=0.5",)
    assert _main(out, work, sets=sets) == 0
    capsys.readouterr()
    (target,) = [d for d in (work / "digits").glob(f"simclr_e{EPOCHS}_s0_*") if d != original]
    # another run's checkpoint copied into the folder these settings train in: resuming would mix two runs
    shutil.copy(original / "checkpoints" / "last.ckpt", target / "checkpoints" / "last.ckpt")
    (target / "model.pt").unlink()
    assert _main(out, work, "--force", sets=sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "belongs to a run with another config" in err and "--restart" in err


@pytest.mark.slow  # uses the module's subprocess runs
def test_damaged_checkpoint_is_refused_before_training(runs, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    shutil.copytree(runs["b_work"], work)
    checkpoint = run_dir(work) / "checkpoints" / "last.ckpt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    assert _main(out, work) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: cannot be loaded" in err and "--restart" in err
    assert not out.exists()


class _Payload:
    """Unpickling this would create the marker file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_with_arbitrary_objects_are_not_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    for name, payload in [("last.ckpt", {"state_dict": {}, "ssl_bench": _Payload(marker)}),
                          ("model.pt", {"format": "ssl-bench-model/1", "extra": _Payload(marker)})]:
        torch.save(payload, tmp_path / name)
    with pytest.raises(CheckpointError, match="only complete checkpoints holding tensors and plain data"):
        load_checkpoint_file(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model_file(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "last.ckpt", weights_only=False)  # ours ignores the flag
    assert not marker.exists()


def test_global_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": global_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), np.random.normal(), [random.random() for _ in range(4)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_global_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(4), np.random.rand(4), np.random.normal(), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, path)

    def disk_full(obj, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.torch, "save", disk_full)
    with pytest.raises(StorageError, match="No space left on device"):
        io.save_checkpoint({"epoch": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_one_run_cannot_be_trained_by_two_processes_at_once(tmp_path):
    run_dir = tmp_path / "digits" / "simclr_e4_s0"
    with run_lock(run_dir, "digits/simclr seed 0"):
        with pytest.raises(RunLockedError, match=rf"another process \(pid {os.getpid()}\) is running it"):
            with run_lock(run_dir, "digits/simclr seed 0"):
                pass
    with run_lock(run_dir, "digits/simclr seed 0"):  # released on exit (and by the OS when a holder dies)
        pass


@pytest.mark.slow
def test_ctrl_c_stops_with_a_resume_hint(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # many epochs, so the run is still training when the signal lands, however fast the machine
    long_epochs = 200
    # A shell starts background jobs with SIGINT ignored and Python keeps an inherited SIG_IGN, so
    # under `pytest &` the child would never see Ctrl+C: give it the default disposition back.
    proc = subprocess.Popen(cli_command(out, work, "--epochs", str(long_epochs)), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(work.glob("digits/simclr_e*_s0_*")):
            time.sleep(0.01)
        (folder,) = work.glob(f"digits/simclr_e{long_epochs}_s0_*")
        assert wait_for_checkpoint(proc, folder / "checkpoints" / "last.ckpt", min_epochs=1) >= 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume from the last epoch checkpoint" in err
    assert not same_run_records(out, "digits", "simclr", long_epochs, 0)
