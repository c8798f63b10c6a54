"""Run a benchmark's (method, seed, dataset) runs as independent jobs: locally N at a time, or on Slurm.

Each run is independent, so running them in separate processes buys two things the one-process loop
does not: a crash (or SIGKILL, or OOM kill) of one run cannot take the others down, and a machine with
more cores or GPUs than one run can use is kept busy.

    launch_local(job_fn, specs, jobs=2, log_dir="runs/logs")       # N jobs at a time on this machine
    launch_submitit(job_fn, specs, folder, cluster="slurm", ...)   # one Slurm job array (submitit)

`job_fn(spec) -> dict` must be a top-level function of an importable module (it is pickled by
reference); a spec is a plain dict with at least a unique "key" (e.g. "digits/simclr/seed0"). A job
that is run again must resume from its own epoch checkpoint (run_one does): that is what makes a
requeue after a Slurm pre-emption or time-out simply "call it again with the same spec".

Local jobs run in concurrent.futures process pools, one per job, whose workers come from a fork server
(multiprocessing's "forkserver" start method) that has imported the heavy modules (torch, Lightning, the
job's module) once, so a job costs a fork, not a fresh interpreter importing torch (measured on 2 cores:
0.06-0.08 s per job after a one-off ~4 s fork-server start, instead of ~4 s per job; see `launch_local`). As with any multiprocessing start method but "fork", a script that calls `launch_local`
must guard its top level with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from benchmarks.errors import ConfigError, StorageError

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # launch_local works without it; launch_submitit says how to install it
    submitit = None
    Checkpointable = object
    DelayedSubmission = None

log = logging.getLogger("benchmarks.launcher")

JobFn = Callable[[dict], dict]
Progress = Callable[[str], None]

# Imported once in the fork server. Importing must not initialise CUDA there (importing torch,
# torchvision and Lightning makes no CUDA device query; checked with torch 2.14): a forked child
# cannot use a CUDA context made before the fork, and CUDA_VISIBLE_DEVICES is only read when CUDA
# initialises, which is in each job, after its own GPU has been set.
DEFAULT_PRELOAD = ("torch", "torchvision", "pytorch_lightning")
TERMINATE_GRACE_S = 10.0
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class JobResult:
    """What one job gave back.

    `seconds`: local jobs, process start to exit; submitit jobs, the job's own run time when it
    completed, the time since submission when it failed.
    """

    key: str
    status: Literal["completed", "failed"]
    result: dict | None
    seconds: float
    log_path: Path | None  # the job's stdout+stderr (local), or submitit's stdout log
    reason: str | None = None  # why it failed: the exception's line, the signal, the exit status
    stderr_path: Path | None = None  # submitit's separate stderr log (None for local jobs)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def summarize(results: Sequence[JobResult]) -> str:
    """One line of counts, then each failed job with its reason and where its log is."""
    failed = [r for r in results if not r.ok]
    lines = [f"{len(results)} jobs: {len(results) - len(failed)} completed, {len(failed)} failed"]
    for r in failed:
        logs = ", ".join(str(p) for p in (r.log_path, r.stderr_path) if p is not None) or "no log"
        lines.append(f"  FAILED {r.key}: {r.reason} (log: {logs})")
    return "\n".join(lines)


def _check_specs(specs: Sequence[dict]) -> list[dict]:
    specs = list(specs)
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("key"), str) or not spec["key"]:
            raise ConfigError(f"launcher: job spec {i} has no 'key' string; every spec is a dict with a "
                              "unique 'key' such as 'digits/simclr/seed0'")
        if spec["key"] in seen:
            raise ConfigError(f"launcher: two job specs have the key '{spec['key']}'; give every job its "
                              "own key")
        seen.add(spec["key"])
    return specs


def log_names(keys: Sequence[str]) -> list[str]:
    """File-name-safe, unique log names for job keys ("digits/simclr/seed0" -> "digits_simclr_seed0.log")."""
    names, used = [], set()
    for key in keys:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "job"
        name, n = base, 1
        while name.lower() in used:  # "a/b" and "a_b" (or a case-insensitive file system) share no log
            n += 1
            name = f"{base}-{n}"
        used.add(name.lower())
        names.append(f"{name}.log")
    return names


def limit_threads(threads: int | None) -> None:
    """Cap this process's CPU threads: OMP/MKL_NUM_THREADS for libraries imported later (torch reads them
    when it loads), and torch.set_num_threads if torch is loaded already (e.g. by the fork server)."""
    if not threads:
        return
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- local jobs

def _job_main(job_fn: JobFn, spec: dict, env: dict, threads: int, log_path: str) -> tuple[str, object]:
    """Body of one job, in its pool's one worker process: log to its file, set threads and GPU, run.
    Returns ("ok", result) or ("error", the exception's line); sys.exit() and Ctrl+C end the process."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)  # fd level, so C libraries' and child processes' output lands in the log too
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    os.environ.update(env)
    limit_threads(threads)
    signal.signal(signal.SIGTERM, _terminated)
    print(f"== job {spec['key']} (pid {os.getpid()}, {threads} thread(s)"
          + (f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else "")
          + ")", flush=True)
    try:
        return "ok", job_fn(spec)
    except Exception as exc:
        traceback.print_exc()
        return "error", _exception_line(exc)
    except BaseException as exc:  # the pool's worker would catch these and live on: end it as a process would
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        code = exc.code if isinstance(exc, SystemExit) else 1  # sys.exit(code)'s status; 1 when stopped
        os._exit(0 if code is None else code & 0xFF if isinstance(code, int) else 1)


def _terminated(signum, frame):  # the launcher stops us (Ctrl+C): unwind, so the job's finally blocks run
    raise KeyboardInterrupt(f"stopped by the launcher ({signal.Signals(signum).name})")


def _exception_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    if exitcode == 0:
        return "exited without returning a result"
    return f"exited with status {exitcode}"


def _mp_context(preload: Sequence[str]):
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Takes effect when the fork server starts (the first launch in this process); later calls reuse it.
    ctx.set_forkserver_preload([m for m in dict.fromkeys(preload) if m and m != "__main__"])
    return ctx


class _WorkerContext:
    """The shared multiprocessing context (fork server), keeping the processes it starts for one job's pool:
    ProcessPoolExecutor has no public handle on its workers, and the launcher needs the exit status of a worker
    that died (a signal, os._exit) and to stop the worker on Ctrl+C."""

    def __init__(self, base):
        self.base = base
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
        self.processes.append(self.base.Process(*args, **kwargs))
        return self.processes[-1]

    def __getattr__(self, name):  # queues, locks, the start method: the shared context's
        return getattr(self.base, name)


class _GpuTurns:
    """The GPU a starting job sees: the free one that is next in turn, else the least busy (None: no GPUs)."""

    def __init__(self, gpus: Sequence[int] | None):
        self.load = {int(g): 0 for g in gpus or ()}
        self.turn = 0

    def take(self) -> int | None:
        if not self.load:
            return None
        ids = list(self.load)
        gpu = min(ids[self.turn:] + ids[:self.turn], key=self.load.__getitem__)
        self.load[gpu] += 1
        self.turn = (ids.index(gpu) + 1) % len(ids)
        return gpu

    def give_back(self, gpu: int | None) -> None:
        if gpu is not None:
            self.load[gpu] -= 1


@dataclass
class _LocalJob:
    """A running local job: a pool of its own with one worker, so a worker that dies breaks no other job's pool."""

    index: int
    gpu: int | None
    context: _WorkerContext
    pool: ProcessPoolExecutor
    future: Future
    started: float

    def result(self, key: str, log_path: Path) -> JobResult:
        """The finished job's JobResult; shuts its pool down first (joining the worker: its exit status is known)."""
        try:
            kind, payload = self.future.result()
        except BrokenProcessPool as exc:  # the worker died (its exit status says how), or its result was unreadable
            kind, payload = "error", "the job's result cannot be read back" if exc.__cause__ else None
        except Exception as exc:  # the spec could not be pickled to the worker, or the result back
            kind, payload = "error", f"the job's spec or result cannot be pickled ({_exception_line(exc)})"
        self.pool.shutdown(wait=True)
        seconds = time.perf_counter() - self.started
        exitcode = self.context.processes[0].exitcode if self.context.processes else None
        if kind == "ok":  # a crash while the worker shuts down does not undo a result already sent
            note = None if exitcode in (0, None) else f"{_exit_reason(exitcode)} after its result"
            return JobResult(key, "completed", payload, seconds, log_path, note)
        return JobResult(key, "failed", None, seconds, log_path, payload or _exit_reason(exitcode))


def _start_job(index: int, spec: dict, log_path: Path, run: partial, base_context, gpu: int | None) -> _LocalJob:
    context = _WorkerContext(base_context)
    # its worker is no daemon (Python >= 3.9), so a job may start processes of its own (DataLoader workers)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
    started = time.perf_counter()
    env = {"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}
    return _LocalJob(index, gpu, context, pool, pool.submit(run, spec, env, log_path=str(log_path)), started)


def launch_local(job_fn: JobFn, specs: Sequence[dict], jobs: int, log_dir: str | Path,
                 cpus: int | None = None, gpus: Sequence[int] | None = None,
                 preload: Sequence[str] | None = None,
                 progress: Progress | None = None) -> list[JobResult]:
    """Run `job_fn(spec)` for every spec, `jobs` at a time, each in its own process. Results in spec order.

    - Processes: each job gets a concurrent.futures ProcessPoolExecutor of its own with one worker, forked by
      the fork server all jobs share; a worker that dies breaks only its own job's pool.
    - Threads: each job gets max(1, cpus // concurrent jobs) CPU threads (torch.set_num_threads and
      OMP/MKL_NUM_THREADS); `cpus` defaults to os.cpu_count(); concurrent = min(jobs, len(specs)).
    - GPUs: with `gpus`, each job sees one (CUDA_VISIBLE_DEVICES), the free one that is next in turn
      (or the least busy one when there are more jobs than GPUs).
    - Logs: a job's stdout and stderr go to `<log_dir>/<key with / -> _>.log`.
    - A job that raises, exits non-zero or is killed by a signal is returned with status "failed",
      the reason and its log; the others go on. Ctrl+C (KeyboardInterrupt) stops every running job
      (SIGTERM, then SIGKILL after 10 s) and is raised again.
    - `preload`: modules the fork server imports once (default: torch, torchvision, Lightning and
      job_fn's module), so a job starts as a cheap fork. Measured on 2 cores (no-op job in a module that
      imports torch + Lightning, 8 jobs one at a time, runs interleaved with the earlier Process-and-Pipe
      launcher): 0.06-0.08 s per job (that launcher: 0.05-0.08 s) after a one-off 3.6-4.0 s while the fork
      server imports; 3.9-4.3 s per job with preload=[] (each job imports them itself). On the same cores
      busy with other work (load ~8): 0.06-0.27 s per job, median 0.13 s (that launcher: median 0.12 s),
      8-10 s with preload=[]. So ~30 short jobs cost ~6 s of start-up instead of ~2 minutes.
    - `progress`: called with one line per finished job ("[3/33] digits/simclr/seed0 finished in
      12.3 s"); default: the "benchmarks.launcher" logger at INFO.
    """
    specs = _check_specs(specs)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"--jobs: must be a positive number of jobs at a time, got {jobs!r}")
    if gpus is not None and not gpus:
        raise ConfigError("launcher: an empty GPU list was given; list the GPU ids to use, or none for CPU "
                          "jobs")
    _make_log_dir(Path(log_dir))
    if not specs:
        return []
    threads = max(1, (cpus or os.cpu_count() or 1) // min(jobs, len(specs)))
    base_context = _mp_context((*DEFAULT_PRELOAD, job_fn.__module__) if preload is None else preload)
    run, gpu_turns = partial(_job_main, job_fn, threads=threads), _GpuTurns(gpus)
    log_paths = [Path(log_dir) / name for name in log_names([s["key"] for s in specs])]
    results: list[JobResult | None] = [None] * len(specs)
    running: dict[Future, _LocalJob] = {}
    waiting = deque(range(len(specs)))
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                i = waiting.popleft()
                job = _start_job(i, specs[i], log_paths[i], run, base_context, gpu_turns.take())
                running[job.future] = job
            for job in sorted((running.pop(f) for f in wait(running, return_when=FIRST_COMPLETED).done),
                              key=lambda job: job.index):
                results[job.index] = job.result(specs[job.index]["key"], log_paths[job.index])
                gpu_turns.give_back(job.gpu)
                finished = sum(result is not None for result in results)
                (progress or log.info)(_progress_line(results[job.index], finished, len(specs)))
    except BaseException:
        _stop_all(list(running.values()))
        raise
    return results  # type: ignore[return-value]


def _make_log_dir(log_dir: Path) -> None:
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{log_dir}: cannot create the job log folder ({exc.strerror}); choose another "
                           "folder or fix its permissions") from exc


def _progress_line(r: JobResult, finished: int, total: int) -> str:
    if r.ok:
        return f"[{finished}/{total}] {r.key} finished in {r.seconds:.1f} s"
    return f"[{finished}/{total}] {r.key} FAILED after {r.seconds:.1f} s: {r.reason} (log: {r.log_path})"


def _stop_all(jobs: list[_LocalJob]) -> None:
    """SIGTERM every running job, give them TERMINATE_GRACE_S to unwind, then SIGKILL; then close their pools."""
    processes = [process for job in jobs for process in job.context.processes]
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(5)
    for job in jobs:
        job.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- submitit (Slurm)

REQUEUE_MARK = "ssl-bench: requeued"  # the one line a job writes to its log on each requeue (counted by the monitor)
ATTEMPT_MARK = "ssl-bench: attempt"  # the first line of each attempt (start or restart) in the job log


class RequeueableJob(Checkpointable):
    """`job_fn(spec)` as a submitit job that is requeued, with the same spec, when pre-empted or timed out.

    submitit owns the signals of a job (SLURM sends USR2 `signal_delay_s` before the time limit, or on a
    pre-emption); its handler calls checkpoint() and submits what it returns, up to `max_requeues` times.
    Nothing needs saving here: the job resumes from its own epoch checkpoint, so the requeued job is the
    same call. The trainer installs no second handler (benchmarks.training: Lightning's SLURM requeue is
    off), and the job log gets one line per attempt and one per requeue instead of submitit's chatter.
    Returns (result, seconds) so the launcher can report the job's time.
    """

    def __init__(self, job_fn: JobFn, threads: int | None = None):
        self.job_fn, self.threads = job_fn, threads

    def __call__(self, spec: dict):
        # submitit's own lines (loading pickles, "Caught signal ...", "Bypassing signal SIGTERM", "Exiting
        # gracefully ...") say in several lines what our one requeue line says; its errors stay
        logging.getLogger("submitit").setLevel(logging.ERROR)
        limit_threads(self.threads)
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "?"))
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"{ATTEMPT_MARK} {int(restarts) + 1} of {spec.get('key')} (SLURM job {job_id}"
              + (f"_{task}" if task is not None else "") + f", {self.threads or 'default'} thread(s))", flush=True)
        started = time.perf_counter()
        result = self.job_fn(spec)
        return result, time.perf_counter() - started

    def checkpoint(self, spec: dict):
        print(f"{REQUEUE_MARK} {spec.get('key')}: its time limit is near (or it was pre-empted); it stops now and "
              "resumes from its last epoch checkpoint when SLURM restarts it", flush=True)
        return DelayedSubmission(self, spec)


def _submitit_reason(exc: BaseException) -> str:
    """The job's own exception line out of submitit's FailedJobError text (trace between '----' lines)."""
    lines = [line for line in str(exc).splitlines()]
    bars = [i for i, line in enumerate(lines) if line.startswith("-----")]
    if len(bars) >= 2:
        trace = [line for line in lines[bars[0] + 1:bars[1]] if line.strip()]
        if trace:
            return trace[-1].strip()
    return _exception_line(exc)


#: sbatch's refusals -> the flag (and suite key) that changes what it refused
SBATCH_FLAGS = (
    ("gres", "--slurm-gpus (launcher.slurm.gpus_per_node; 0 for a CPU run)"),
    ("partition", "--slurm-partition (launcher.slurm.partition; `sinfo -s` lists them)"),
    ("account", "--slurm-account (launcher.slurm.account; `sacctmgr show assoc user=$USER` lists yours)"),
    ("time limit", "--slurm-time-min (launcher.slurm.time_min; `sinfo -o '%P %l'` gives each partition's limit)"),
    ("memory", "--slurm-mem-gb (launcher.slurm.mem_gb)"),
    ("node configuration is not available", "--slurm-cpus / --slurm-mem-gb / --slurm-gpus (a node has fewer; "
                                            "`sinfo -N -o '%N %c %m %G'` lists what nodes have)"),
    ("cpu", "--slurm-cpus (launcher.slurm.cpus_per_task)"),
    ("qos", "launcher.slurm.extra (slurm_qos)"),
)


def sbatch_refusal(message: str) -> str:
    """One line for a refused submission: sbatch's own words, then the flag that changes what it refused."""
    said = " ".join(line.strip() for line in message.strip().splitlines()
                    if line.strip() and not line.lstrip().startswith(("Traceback", "File ")))
    said = re.sub(r"^.*?(sbatch: error:)", r"\1", said) or "no message"
    lowered = said.lower()
    flag = next((flag for word, flag in SBATCH_FLAGS if word in lowered), "the --slurm-* flags (launcher.slurm.*)")
    return f"--launcher slurm: sbatch refused the job array ({said[:400]}); change {flag}"


@dataclass(frozen=True)
class ArraySettings:
    """submit_array's settings (what `--slurm-*` / launcher.slurm give), each mapped onto submitit's parameter
    (time_min -> timeout_min; partition, account, array_parallelism, signal_delay_s -> slurm_<name>). `extra`:
    further `executor.update_parameters` keywords, passed as they are (e.g. {"slurm_qos": "high",
    "slurm_constraint": "a100", "slurm_additional_parameters": {...}}). `threads`: CPU threads of each job
    (default: cpus_per_task)."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    array_parallelism: int | None = None
    name: str = "ssl-bench"
    max_requeues: int = 100
    signal_delay_s: int | None = None
    threads: int | None = None
    extra: dict | None = None

    def executor_parameters(self, cluster: str) -> dict:
        """submitit's `update_parameters` keywords: the ones set, and no slurm_* ones off SLURM."""
        # no GPU: no --gpus-per-node line at all (a cluster without GPUs may refuse any gres request, even of 0)
        params = {"name": self.name, "timeout_min": int(self.time_min), "gpus_per_node": self.gpus_per_node or None,
                  "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb, "slurm_partition": self.partition,
                  "slurm_account": self.account, "slurm_array_parallelism": self.array_parallelism,
                  "slurm_signal_delay_s": self.signal_delay_s}
        params = {k: v for k, v in params.items() if v is not None}
        if cluster != "slurm":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        return {**params, **(self.extra or {})}


def submit_array(job_fn: JobFn, specs: Sequence[dict], folder: str | Path,
                 cluster: Literal["local", "slurm", "debug"] = "slurm",
                 settings: ArraySettings | None = None) -> list:
    """Submit every spec as one submitit job array (no waiting); returns the submitit jobs in spec order.

    submitit asks SLURM for a USR2 signal `settings.signal_delay_s` (default 90) s before the time limit and on
    pre-emption; RequeueableJob then requeues the job, at most `settings.max_requeues` times. A refusal by
    sbatch (or a submitit failure) raises ConfigError with sbatch's message and the flag to change, and leaves
    no file of the submission behind (every submission gets a folder of its own under `folder`, removed when
    the submission fails).
    """
    specs = _check_specs(specs)
    if submitit is None:
        raise ConfigError(f"--launcher {cluster}: the submitit package is not installed; "
                          "pip install submitit")
    if cluster not in ("local", "slurm", "debug"):
        raise ConfigError(f"--launcher: unknown cluster '{cluster}'; allowed: local, slurm, debug")
    if cluster == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise ConfigError("--launcher slurm: no Slurm here (sbatch/srun are not on PATH); run on a Slurm "
                          "login node, or use --launcher local")
    if not specs:
        return []
    settings = settings or ArraySettings()
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        submission = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=folder))
    except OSError as exc:
        raise StorageError(f"{folder}: cannot create the submitit folder ({exc.strerror or exc}); use another "
                           "--work-dir") from exc
    try:
        executor = submitit.AutoExecutor(folder=str(submission / "%j"), cluster=cluster,
                                         slurm_max_num_timeout=settings.max_requeues)
        try:
            executor.update_parameters(**settings.executor_parameters(cluster))
        except (NameError, AssertionError, ValueError) as exc:  # submitit's ways of refusing a parameter
            raise ConfigError(f"launcher: submitit refused the job parameters ({_exception_line(exc)})") from exc
        threads = settings.threads if settings.threads is not None else settings.cpus_per_task
        if threads is None and cluster == "local":  # every local job runs at once: share the cores
            threads = max(1, (os.cpu_count() or 1) // len(specs))
        try:
            return executor.map_array(RequeueableJob(job_fn, threads), specs)
        except Exception as exc:  # submitit's FailedJobError / FailedSubmissionError / CalledProcessError
            raise ConfigError(sbatch_refusal(str(exc))) from None
    except BaseException:
        shutil.rmtree(submission, ignore_errors=True)
        raise


@dataclass
class _Watched:
    """What the monitor knows of one job of the array."""

    index: int
    state: str = "PENDING"
    requeues: int = 0
    missing_polls: int = 0  # polls since the job left the queue without a result file


def _queue_states(job_ids: set[str]) -> dict[str, str] | None:
    """{array task id "123_4": SLURM state} of the jobs still in the queue (squeue), or None when squeue fails."""
    command = ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(sorted(job_ids))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        # squeue refuses ids that have left the queue entirely ("Invalid job id specified"): none in the queue
        return {} if "invalid job id" in done.stderr.lower() else None
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = state
    return states


def _count_marks(path: Path, mark: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return sum(line.startswith(mark) for line in handle)
    except OSError:
        return 0


class StatusLine:
    """Where the monitor writes: a terminal gets one status line rewritten in place (and events above it);
    a log file gets plain lines, the status only when it changes."""

    def __init__(self, say: Progress, stream=None):
        self.say = say
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = ""
        self.shown = False

    def event(self, line: str) -> None:
        self._clear()
        self.say(line)

    def status(self, line: str) -> None:
        if self.tty:
            self._clear()
            self.stream.write(line)
            self.stream.flush()
            self.shown = True
        elif line != self.last:
            self.say(line)
        self.last = line

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def watch_slurm_jobs(jobs: list, specs: Sequence[dict], poll_s: float, say: Progress,
                     stream=None, started: float | None = None) -> list[JobResult]:
    """Wait for a submitted SLURM array: a status line (pending / running / requeued / done / failed) every
    `poll_s` seconds, and a line for each finished, failed or requeued job as it happens. A job is done when
    its result file is there; a job that leaves the queue without one has failed (cancelled, killed, out of
    requeues). Results in spec order."""
    line = StatusLine(say, stream)
    started = time.perf_counter() if started is None else started
    watched = {job.job_id: _Watched(i) for i, job in enumerate(jobs)}
    results: list[JobResult | None] = [None] * len(specs)
    finished = 0
    while finished < len(specs):
        queue = _queue_states({str(job.job_id).split("_")[0] for job in jobs})
        for job in jobs:
            w = watched[job.job_id]
            if results[w.index] is not None:
                continue
            key = specs[w.index]["key"]
            stdout, stderr = Path(job.paths.stdout), Path(job.paths.stderr)
            # every attempt writes one ATTEMPT_MARK line: a requeue by submitit at the time limit, `scontrol
            # requeue` by an admin and a pre-emption alike
            requeues = max(0, _count_marks(stdout, ATTEMPT_MARK) - 1)
            if requeues > w.requeues:
                w.requeues = requeues
                line.event(f"[{key}] requeued by SLURM ({requeues} time{'s' if requeues != 1 else ''} so far); it "
                           f"resumes from its last epoch checkpoint (log: {stdout})")
            if queue is not None and job.job_id in queue:
                w.state, w.missing_polls = queue[job.job_id], 0
            if not job.paths.result_pickle.exists():
                if queue is not None and job.job_id not in queue:
                    w.missing_polls += 1  # a requeue takes the job out of the queue for a moment
                if w.missing_polls < 3:
                    continue
            finished += 1
            if job.paths.result_pickle.exists():
                try:
                    result, seconds = job.result()
                    results[w.index] = JobResult(key, "completed", result, seconds, stdout, None, stderr)
                    line.event(f"[{finished}/{len(specs)}] {key} finished in {seconds:.1f} s"
                               + (f" after {w.requeues} requeue(s)" if w.requeues else ""))
                    continue
                except Exception as exc:  # FailedJobError (it raised), UncompletedJobError (out of requeues)
                    reason = _submitit_reason(exc)
            else:
                reason = (f"left the queue without a result in state {w.state} (cancelled, killed, or over its time "
                          "limit without a requeue)")
            results[w.index] = JobResult(key, "failed", None, time.perf_counter() - started, stdout, reason, stderr)
            line.event(f"[{finished}/{len(specs)}] {key} FAILED: {reason} (logs: {stdout}, {stderr})")
        states = [watched[job.job_id] for job in jobs]
        done = sum(r is not None and r.ok for r in results)
        failed = sum(r is not None and not r.ok for r in results)
        waiting = [w for w in states if results[w.index] is None]
        running = sum(w.state in ("RUNNING", "COMPLETING") for w in waiting)
        requeued = sum(w.requeues > 0 for w in waiting)
        line.status(f"SLURM jobs: {len(waiting) - running} pending, {running} running, {requeued} requeued, {done} "
                    f"done, {failed} failed ({time.perf_counter() - started:.0f} s)")
        if finished < len(specs):
            time.sleep(poll_s)
    line._clear()
    return results  # type: ignore[return-value]


def launch_submitit(job_fn: JobFn, specs: Sequence[dict], folder: str | Path,
                    cluster: Literal["local", "slurm", "debug"] = "slurm", *, poll_s: float = 10.0,
                    progress: Progress | None = None, stream=None, **options) -> list[JobResult]:
    """Submit every spec as one job array (submit_array; `options` are ArraySettings' fields), wait for all,
    results in spec order.

    cluster: "slurm" (sbatch), "local" (submitit's LocalExecutor: every job at once on this machine,
    mainly to try the path; `launch_local` limits concurrency) or "debug" (in this process, one after
    another; submitit opens pdb on a failure). Pre-empted or timed-out jobs are requeued
    (RequeueableJob) and resume from their epoch checkpoint. SLURM: the first lines give the job ids, the
    log folder and how to cancel, then `watch_slurm_jobs` reports. A failed job is returned with status
    "failed", its reason and its submitit stdout/stderr logs; the others still finish. Ctrl+C cancels
    local jobs; SLURM jobs keep running (the message says how to scancel them).
    """
    specs = _check_specs(specs)
    say = progress or log.info
    submitted = time.perf_counter()
    settings = ArraySettings(**options)
    jobs = submit_array(job_fn, specs, folder, cluster, settings)
    if cluster == "slurm" and jobs:
        array_id = str(jobs[0].job_id).split("_")[0]
        at_once = min(len(specs), settings.array_parallelism or 256)
        say(f"submitted SLURM job array {array_id} ({len(specs)} jobs, at most {at_once} at a time as SLURM "
            f"schedules them); logs: {Path(jobs[0].paths.stdout).parent.parent}/<job id>/; cancel with "
            f"`scancel {array_id}`")
        try:
            return watch_slurm_jobs(jobs, specs, poll_s, say, stream, submitted)
        except KeyboardInterrupt:
            print(f"interrupted; the jobs keep running on the cluster (scancel {array_id} stops them; rerunning "
                  "the same command skips the runs they finish)", file=sys.stderr)
            raise
    index_of = {id(job): i for i, job in enumerate(jobs)}
    results: list[JobResult | None] = [None] * len(specs)
    try:
        done = (iter(jobs) if cluster == "debug"
                else submitit.helpers.as_completed(jobs, poll_frequency=poll_s))
        for n, job in enumerate(done, start=1):
            i = index_of[id(job)]
            key = specs[i]["key"]
            stdout, stderr = Path(job.paths.stdout), Path(job.paths.stderr)
            try:
                result, seconds = job.result()
                results[i] = JobResult(key, "completed", result, seconds, stdout, None, stderr)
                say(f"[{n}/{len(specs)}] {key} finished in {seconds:.1f} s")
            except Exception as exc:  # FailedJobError (it raised), UncompletedJobError (killed, cancelled)
                seconds = time.perf_counter() - submitted
                results[i] = JobResult(key, "failed", None, seconds, stdout, _submitit_reason(exc), stderr)
                say(f"[{n}/{len(specs)}] {key} FAILED: {results[i].reason} (logs: {stdout}, {stderr})")
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        raise
    return results  # type: ignore[return-value]
