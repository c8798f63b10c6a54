"""benchmarks.launcher: runs as independent jobs (local processes from a fork server, submitit arrays).

The job functions are in tests/launcher_jobs.py: jobs import them by name in their own processes.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from benchmarks.errors import ConfigError
from benchmarks.launcher import (
    ArraySettings,
    RequeueableJob,
    launch_local,
    launch_submitit,
    log_names,
    submit_array,
    summarize,
)

try:
    from tests import launcher_jobs
except ImportError:  # pytest's rootdir-less import mode
    import launcher_jobs

REPO = Path(__file__).resolve().parent.parent
# The fork server starts once per test process, with the first call's preload: keep it small here.
PRELOAD = ["torch", launcher_jobs.__name__]


def run_local(job_fn, specs, tmp_path, jobs=2, **kwargs):
    lines: list[str] = []
    results = launch_local(job_fn, specs, jobs=jobs, log_dir=tmp_path / "logs", preload=PRELOAD,
                           progress=kwargs.pop("progress", lines.append), **kwargs)
    return results, lines


def test_results_in_spec_order_equal_a_sequential_call(tmp_path):
    specs = [{"key": f"toy/m{i}/seed0", "x": i, "sleep": 1.0 if i == 0 else 0} for i in range(4)]
    results, lines = run_local(launcher_jobs.toy_job, specs, tmp_path)
    assert [r.key for r in results] == [s["key"] for s in specs]
    assert [r.status for r in results] == ["completed"] * 4
    assert [r.result for r in results] == [launcher_jobs.toy_job(s) for s in specs]
    # the slow first job finished last, yet its result is first; one progress line per finished job
    assert len(lines) == 4 and "toy/m0/seed0" in lines[-1]
    assert all(re.fullmatch(r"\[\d/4\] toy/m\d/seed0 finished in \d+\.\d s", line) for line in lines), lines
    assert [r.log_path.name for r in results] == [f"toy_m{i}_seed0.log" for i in range(4)]


def test_two_jobs_run_at_the_same_time_in_their_own_processes(tmp_path):
    specs = [{"key": f"c/{i}", "sleep": 1.0, "timing": True} for i in range(2)]
    results, _ = run_local(launcher_jobs.toy_job, specs, tmp_path, jobs=2)
    a, b = (r.result for r in results)
    assert len({a["pid"], b["pid"], os.getpid()}) == 3
    assert max(a["started"], b["started"]) < min(a["ended"], b["ended"]), "the two jobs did not overlap"


def test_threads_are_split_and_each_job_gets_its_own_gpu(tmp_path):
    specs = [{"key": f"t/{i}", "threads": True, "gpu_env": True, "sleep": 0.5} for i in range(2)]
    results, _ = run_local(launcher_jobs.toy_job, specs, tmp_path, jobs=2, cpus=2, gpus=[5, 7])
    for r in results:  # cpus // jobs = 1 (torch's own default here would be 2: the machine's cores)
        assert (r.result["torch_threads"], r.result["omp"], r.result["mkl"]) == (1, "1", "1")
    # both ran at once (0.5 s each), so each took a free GPU of its own
    assert sorted(r.result["cuda_visible_devices"] for r in results) == ["5", "7"]


def test_failed_jobs_are_reported_with_their_logs_and_the_others_complete(tmp_path):
    specs = [{"key": "f/ok1", "x": 2}, {"key": "f/raise", "fail": "raise"},
             {"key": "f/kill", "fail": "sigkill"}, {"key": "f/exit", "fail": "exit"},
             {"key": "f/ok2", "x": 3}]
    results, lines = run_local(launcher_jobs.failing_job, specs, tmp_path, jobs=2)
    by_key = {r.key: r for r in results}
    assert [r.status for r in results] == ["completed", "failed", "failed", "failed", "completed"]
    assert by_key["f/ok1"].result["square"] == 4 and by_key["f/ok2"].result["square"] == 9
    assert by_key["f/raise"].reason == "ValueError: boom in f/raise"
    assert by_key["f/kill"].reason == "killed by SIGKILL"
    assert by_key["f/exit"].reason == "exited with status 3"
    raise_log = by_key["f/raise"].log_path.read_text()
    assert "about to fail" in raise_log and "Traceback" in raise_log and "ValueError: boom" in raise_log
    assert "about to be killed" in by_key["f/kill"].log_path.read_text()
    text = summarize(results)
    assert text.splitlines()[0] == "5 jobs: 2 completed, 3 failed"
    assert f"f/kill: killed by SIGKILL (log: {by_key['f/kill'].log_path})" in text
    assert "f/ok1" not in text
    assert sum("FAILED" in line for line in lines) == 3


def test_a_worker_that_dies_fails_only_its_own_job_while_another_runs_on(tmp_path):
    """Each job has a process pool of its own: a SIGKILLed or os._exit-ed worker breaks that one (a pool shared
    by all jobs would break for every job), the job running beside it completes, and the waiting jobs start."""
    specs = [{"key": "d/slow", "sleep": 5.0, "timing": True}, {"key": "d/kill", "fail": "sigkill"},
             {"key": "d/os_exit", "fail": "os_exit"}, {"key": "d/after", "x": 4, "timing": True}]
    results, lines = run_local(launcher_jobs.failing_job, specs, tmp_path, jobs=2)
    slow, kill, os_exit, after = results
    assert [r.status for r in results] == ["completed", "failed", "failed", "completed"], [r.reason for r in results]
    assert kill.reason == "killed by SIGKILL" and os_exit.reason == "exited with status 4"
    assert after.result == {"key": "d/after", "square": 16, "pid": after.result["pid"],
                            "started": after.result["started"], "ended": after.result["ended"]}
    assert after.result["ended"] < slow.result["ended"], "the slow job did not run beside the ones that died"
    assert lines[-1].startswith("[4/4] d/slow finished in")


def test_ctrl_c_stops_the_running_jobs_and_is_raised_again(tmp_path):
    pid_file = tmp_path / "hang.pid"
    specs = [{"key": "k/hang", "fail": "hang", "pid_file": str(pid_file)}, {"key": "k/quick", "sleep": 1.0}]

    def interrupt(line):
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_local(launcher_jobs.failing_job, specs, tmp_path, jobs=2, progress=interrupt)
    assert time.monotonic() - started < 15, "the launcher waited for the hanging job instead of stopping it"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hanging job (pid {pid}) is still running after Ctrl+C")


def test_bad_specs_are_refused_and_log_names_are_unique():
    with pytest.raises(ConfigError, match="two job specs have the key 'a/b'"):
        launch_local(launcher_jobs.toy_job, [{"key": "a/b"}, {"key": "a/b"}], jobs=1, log_dir="unused")
    with pytest.raises(ConfigError, match="--jobs"):
        launch_local(launcher_jobs.toy_job, [{"key": "a"}], jobs=0, log_dir="unused")
    names = log_names(["d/simclr/seed0", "d_simclr_seed0", "../x"])
    assert names == ["d_simclr_seed0.log", "d_simclr_seed0-2.log", "x.log"]


def test_submitit_local_executor_runs_jobs_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    # submitit's job processes import the job function by name: they need the repository on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    specs = [{"key": f"s/{i}", "x": i} for i in range(3)] + [{"key": "s/raise", "fail": "raise"}]
    lines: list[str] = []
    results = launch_submitit(launcher_jobs.failing_job, specs, tmp_path / "submitit", cluster="local",
                              time_min=5, poll_s=0.25, progress=lines.append)
    assert [r.key for r in results] == [s["key"] for s in specs]
    assert [r.status for r in results] == ["completed"] * 3 + ["failed"]
    assert [r.result for r in results[:3]] == [launcher_jobs.toy_job(s) for s in specs[:3]]
    assert all(r.log_path.is_file() and r.stderr_path.is_file() for r in results)
    failed = results[3]
    assert failed.reason == "ValueError: boom in s/raise"
    assert "ValueError: boom in s/raise" in failed.stderr_path.read_text()
    assert str(failed.stderr_path) in summarize(results) and len(lines) == 4


def test_checkpoint_requeues_the_same_spec():
    helpers = pytest.importorskip("submitit.helpers")
    wrapper = RequeueableJob(launcher_jobs.toy_job)
    spec = {"key": "digits/simclr/seed0", "x": 5}
    assert isinstance(wrapper, helpers.Checkpointable)
    again = wrapper.checkpoint(spec)
    assert isinstance(again, helpers.DelayedSubmission)
    assert again.function is wrapper and again.args == (spec,) and again.kwargs == {}
    result, seconds = again.result()  # the requeued job is the same call
    assert result == launcher_jobs.toy_job(spec) and seconds >= 0


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$FAKE_SBATCH_SCRIPT"
echo "Submitted batch job 4242"
"""


def _fake_slurm(tmp_path, monkeypatch, sbatch_script: str) -> None:
    """sbatch (the given script) and srun on PATH, where submitit looks for them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(sbatch_script)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ["PATH"]]))


def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    _fake_slurm(tmp_path, monkeypatch, FAKE_SBATCH)
    monkeypatch.setenv("FAKE_SBATCH_SCRIPT", str(tmp_path / "submitted.sh"))
    specs = [{"key": f"cifar10/simclr/seed{i}"} for i in range(4)]
    settings = ArraySettings(partition="gpu", time_min=90, gpus_per_node=1, cpus_per_task=8, mem_gb=32,
                             account="lab", array_parallelism=2, extra={"slurm_qos": "high"})
    jobs = submit_array(launcher_jobs.toy_job, specs, tmp_path / "submitit", "slurm", settings)
    assert [job.job_id for job in jobs] == [f"4242_{i}" for i in range(4)]
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("--array=0-3%2", "--partition=gpu", "--time=90", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--mem=32GB", "--account=lab", "--qos=high", "--signal=USR2@90", "--job-name=ssl-bench"):
        assert f"#SBATCH {line}\n" in script, line
    with pytest.raises(ConfigError, match="submitit refused the job parameters"):
        submit_array(launcher_jobs.toy_job, specs, tmp_path / "submitit", "slurm",
                     ArraySettings(extra={"slurm_qqos": "high"}))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="--launcher slurm: no Slurm here"):
        submit_array(launcher_jobs.toy_job, specs, tmp_path / "submitit", "slurm")


REFUSING_SBATCH = """#!/bin/sh
echo "sbatch: error: Invalid generic resource (gres) specification" >&2
exit 1
"""


def test_a_refusing_sbatch_gives_one_line_naming_the_flag_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    _fake_slurm(tmp_path, monkeypatch, REFUSING_SBATCH)
    specs = [{"key": f"digits/simclr/seed{i}"} for i in range(2)]
    with pytest.raises(ConfigError) as caught:
        submit_array(launcher_jobs.toy_job, specs, tmp_path / "submitit", "slurm", ArraySettings(gpus_per_node=1))
    message = str(caught.value)
    assert "\n" not in message
    assert "sbatch: error: Invalid generic resource (gres) specification" in message and "--slurm-gpus" in message
    assert list((tmp_path / "submitit").iterdir()) == []  # no half-made submission


def test_the_monitor_reports_requeues_and_results_from_the_job_logs(tmp_path, monkeypatch):
    """watch_slurm_jobs with a queue that says what squeue would: a job that went through two attempts, then
    finished (its result file), and one that left the queue without a result."""
    import pickle

    from benchmarks import launcher

    class Paths:
        def __init__(self, folder, job_id):
            self.stdout = folder / f"{job_id}_0_log.out"
            self.stderr = folder / f"{job_id}_0_log.err"
            self.result_pickle = folder / f"{job_id}_0_result.pkl"

    class Job:
        def __init__(self, job_id):
            self.job_id, self.paths = job_id, Paths(tmp_path, job_id)

        def result(self):
            return pickle.loads(self.paths.result_pickle.read_bytes())

    jobs = [Job("7_0"), Job("7_1")]
    specs = [{"key": "digits/simclr/seed0"}, {"key": "digits/carl/seed0"}]
    jobs[0].paths.stdout.write_text(f"{launcher.ATTEMPT_MARK} 1 of x\n{launcher.ATTEMPT_MARK} 2 of x\n")
    jobs[0].paths.result_pickle.write_bytes(pickle.dumps(({"status": "completed"}, 3.5)))
    polls = iter([{"7_1": "RUNNING"}, {}, {}, {}])
    monkeypatch.setattr(launcher, "_queue_states", lambda ids: next(polls))
    lines: list[str] = []
    results = launcher.watch_slurm_jobs(jobs, specs, poll_s=0.01, say=lines.append)
    assert [r.status for r in results] == ["completed", "failed"]
    assert results[0].result == {"status": "completed"}
    assert "left the queue without a result" in results[1].reason
    text = "\n".join(lines)
    assert "digits/simclr/seed0] requeued by SLURM (1 time so far)" in text
    assert "finished in 3.5 s after 1 requeue(s)" in text and "digits/carl/seed0 FAILED" in text
    assert "SLURM jobs: 0 pending, 1 running, 0 requeued, 1 done, 0 failed" in text
