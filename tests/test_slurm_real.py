"""`--launcher slurm` against a real single-node SLURM (slurmctld + slurmd + munged, Debian's slurm-wlm and munge,
installed by .ci/run): the digits array with the suite's default SLURM settings, a job requeued mid-training
with `scontrol requeue`, records bitwise those of the same runs without a launcher at the same thread count;
and a run whose time limit is far shorter than the run, requeued at every limit until it finishes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from slurm_cluster import SlurmCluster, missing_programs

from benchmarks.records import iter_record_files, read_record

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

missing = missing_programs()
if missing:
    pytest.skip(f"no SLURM here ({', '.join(missing)} not installed; .ci/run installs slurm-wlm and munge with "
                "apt-get, which this machine lacks)", allow_module_level=True)

FAST = ["evaluation.protocols=[knn, clustering]", "train.online_knn_every=0", "launcher.slurm.poll_s=2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    env = cluster.start()
    yield {**env, "PYTHONUNBUFFERED": "1"}
    cluster.stop()


@pytest.fixture
def prompt_requeues(slurm):
    """slurmctld holds a requeued job for about 2 minutes (its begin time is set ahead: Reason=BeginTime); like an
    admin's `scontrol update StartTime=now`, this lets it start again at once, so a test of many requeues takes
    minutes, not tens of minutes. Nothing else about the job changes."""
    stop = threading.Event()

    def release():
        while not stop.wait(1.0):
            out = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i %r"], env=slurm,
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                job, _, reason = line.partition(" ")
                if reason.strip() == "BeginTime":
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm,
                                   capture_output=True)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=10)


def _squeue(env) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], env=env, capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _comparable(path: Path) -> dict:
    record = read_record(path)
    predictions = np.load(path.with_name(path.stem + ".predictions.npz"))
    return {"metrics": record["metrics"], "history": record["history"], "clusters": record["clusters"],
            "fingerprints": record["fingerprints"], "threads": record["config"]["train"]["threads"],
            "predictions": {name: predictions[name].tolist() for name in sorted(predictions.files)}}


def test_default_flags_array_with_a_requeue_gives_the_records_of_plain_runs(slurm, prompt_requeues, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "simclr", "carl",
               "--seeds", "0", "--epochs", "30", "--no-references", "--no-report", "--out", str(out),
               "--work-dir", str(work), "--launcher", "slurm", "--set", *FAST]
    proc = subprocess.Popen(command, cwd=REPO, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, requeued = [], None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if requeued is None:  # requeue the first job that has written an epoch checkpoint, mid-training
            for ckpt in work.glob("digits/*/checkpoints/last.ckpt"):
                running = [j for j, state in _squeue(slurm).items() if state == "RUNNING"]
                stem = ckpt.parent.parent.name
                for job in running:
                    log = next(work.glob(f"submitit/*/{job}/{job}_0_log.out"), None)
                    if log is not None and stem.split("_e30")[0] in log.read_text():
                        subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
                        requeued = stem
                        break
                if requeued:
                    break
        assert time.monotonic() < deadline, "".join(lines)
    assert proc.wait(timeout=60) == 0, "".join(lines)
    text = "".join(lines)
    # the first lines: the job ids, where the logs are and how to cancel; no GPU asked for a CPU suite
    assert "submitted SLURM job array" in text and "scancel" in text and "logs:" in text
    assert "0 GPU(s)" in text and "1 CPU(s) (1 thread(s))" in text
    script = next(work.glob("submitit/*/*_submission.sh"), None) or next(work.glob("submitit/*/*/*.sh"))
    assert "--gpus-per-node" not in script.read_text() and "--cpus-per-task=1" in script.read_text()
    assert requeued is not None, "no job was requeued mid-training: " + text
    assert "requeued by SLURM" in text

    # the same runs without a launcher, at the same thread count
    plain = tmp_path / "plain"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "simclr",
                           "carl", "--seeds", "0", "--epochs", "30", "--no-references", "--no-report", "--threads",
                           "1", "--out", str(plain), "--work-dir", str(tmp_path / "plain-work"), "--no-progress",
                           "--set", *FAST], cwd=REPO, env=slurm, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    slurm_files, plain_files = iter_record_files(out), iter_record_files(plain)
    assert [p.name for p in slurm_files] == [p.name for p in plain_files] and len(slurm_files) == 2
    for a, b in zip(slurm_files, plain_files):
        assert _comparable(a) == _comparable(b), a.name
        record = read_record(a)
        assert record["provenance"]["pretraining"]["threads"] == 1
        assert record["attempts"] == (2 if a.name.startswith(requeued.split("_e30")[0] + "_e30") else 1)
        # the wall time counts every attempt
        assert record["wall_time_s"] > 0


def test_a_time_limit_far_shorter_than_the_run_is_requeued_until_it_finishes(slurm, prompt_requeues, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    # 1 minute per job; SLURM signals 45 s before the limit (slurmctld checks time limits every 30 s, so the
    # signal comes 15-45 s into an attempt and the kill at the limit never overlaps it); ~150 s of training
    command = [sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "simclr", "--seeds", "0",
               "--epochs", "500", "--no-references", "--no-report", "--out", str(out), "--work-dir", str(work),
               "--launcher", "slurm", "--slurm-time-min", "1", "--set", "launcher.slurm.signal_delay_s=45",
               "evaluation.protocols=[knn]", "train.online_knn_every=0", "launcher.slurm.poll_s=5"]
    done = subprocess.run(command, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (record_file,) = iter_record_files(out)
    record = read_record(record_file)
    assert record["status"] == "completed" and len(record["history"]) == 500
    assert record["attempts"] >= 5, record["attempts"]
    log = next(work.glob("submitit/*/*/*_log.out")).read_text()
    assert log.count("ssl-bench: requeued") >= 4
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert "SLURM auto-requeueing enabled" not in log + next(work.glob("submitit/*/*/*_log.err")).read_text()
    assert done.stdout.count("requeued by SLURM") >= 4


def test_a_partition_sbatch_refuses_ends_in_one_error_line_and_no_submission(slurm, tmp_path):
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "simclr",
                           "--seeds", "0", "--epochs", "1", "--no-references", "--no-report", "--out",
                           str(tmp_path / "out"), "--work-dir", str(work), "--launcher", "slurm",
                           "--slurm-partition", "nosuchpartition"],
                          cwd=REPO, env=slurm, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --launcher slurm: sbatch refused the job array (sbatch: error:"), last
    assert "partition" in last.lower() and "--slurm-partition" in last and "Traceback" not in done.stderr
    assert list((work / "submitit").iterdir()) == []
    assert not list((tmp_path / "out").rglob("*.json"))
