"""Real digits runs as jobs (benchmarks.launcher + runner.run_job): through submitit's local executor the
records are those of a sequential run; a local job killed mid-training is resumed by the rerun while the
others stay finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.records import iter_record_files, read_record, same_run_records
from benchmarks.runner import run_job

REPO = Path(__file__).resolve().parent.parent
SETS = ["dataset.options.test_fraction=0.75", "evaluation.protocols=[knn]", "train.online_knn_every=0"]
OVERRIDES = {"dataset": {"options": {"test_fraction": 0.75}}, "evaluation": {"protocols": ["knn"]},
             "train": {"online_knn_every": 0, "epochs": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: bitwise like the jobs


def comparable(record: dict) -> tuple:
    return (record["method"], record["seed"], record["fingerprints"]["run"], record["history"], record["metrics"])


@pytest.mark.slow
def test_three_runs_through_submitits_local_executor_equal_sequential_runs(tmp_path):
    from benchmarks.launcher import launch_submitit

    pytest.importorskip("submitit")
    jobs_out, seq_out = tmp_path / "jobs", tmp_path / "sequential"
    runs = [("simclr", 0), ("simclr", 1), ("carl", 0)]
    specs = [{"key": f"digits/{m}/seed{s}", "suite": "digits", "overrides": OVERRIDES, "method": m, "seed": s,
              "out": str(jobs_out), "work_dir": str(tmp_path / "jobs_work"), "data_root": "data", "imports": []}
             for m, s in runs]
    results = launch_submitit(run_job, specs, tmp_path / "submitit", "local", poll_s=0.5, cpus_per_task=1)
    assert [r.status for r in results] == ["completed"] * 3, [r.reason for r in results]
    for method, seeds in (("simclr", ["0", "1"]), ("carl", ["0"])):
        done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", method,
                               "--seeds", *seeds, "--epochs", "2", "--no-references", "--no-report", "--no-progress",
                               "--out", str(seq_out), "--work-dir", str(tmp_path / "seq_work"), "--set", *SETS],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    from_jobs = sorted(comparable(read_record(p)) for p in iter_record_files(jobs_out))
    sequential = sorted(comparable(read_record(p)) for p in iter_record_files(seq_out))
    assert len(from_jobs) == 3 and from_jobs == sequential  # same files (fingerprints), histories, metrics


@pytest.mark.slow
def test_a_killed_local_job_is_resumed_by_the_rerun_and_the_others_stay_finished(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    epochs = 40
    command = [sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "simclr", "byol",
               "--seeds", "0", "--epochs", str(epochs), "--no-references", "--no-report", "--no-progress",
               "--launcher", "local", "--jobs", "2", "--out", str(out), "--work-dir", str(work), "--set", *SETS]
    first = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim_lock, deadline = None, time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        checkpoints = list(work.glob(f"digits/byol_e{epochs}_s0_*/checkpoints/last.ckpt"))
        if checkpoints:
            victim_lock = checkpoints[0].parent.parent / ".lock"
            break
        time.sleep(0.05)
    assert victim_lock is not None, "the byol job never wrote its first checkpoint"
    pid = int(victim_lock.read_text().strip())  # the run lock holds the training process's pid
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 1, stderr  # one job failed
    assert "byol" in stderr and "SIGKILL" in stderr and ".log" in stderr  # reported with its log
    (simclr_record,) = same_run_records(out, "digits", "simclr", epochs, 0)
    assert not same_run_records(out, "digits", "byol", epochs, 0)
    simclr_bytes = simclr_record.read_bytes()

    second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    logs = {p.name: p.read_text() for p in (work / "digits" / "logs").glob("*.log")}
    byol_log = next(text for name, text in logs.items() if "byol" in name)
    simclr_log = next(text for name, text in logs.items() if "simclr" in name)
    assert "resuming from" in byol_log and f"of {epochs}" in byol_log  # the killed job went on from its checkpoint
    assert "skipped: finished record" in simclr_log  # the finished one was not redone
    assert simclr_record.read_bytes() == simclr_bytes
    (byol_record,) = same_run_records(out, "digits", "byol", epochs, 0)
    assert [h["epoch"] for h in read_record(byol_record)["history"]] == list(range(1, epochs + 1))
