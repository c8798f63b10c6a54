"""Toy job functions for tests/test_launcher.py.

They live in their own importable module because job functions are pickled by reference: the job
processes (a fork server's children, submitit's job processes) import them by name.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def toy_job(spec: dict) -> dict:
    """A pure function of the spec (so a sequential call gives the same dict), with optional side jobs."""
    started = time.time()
    if spec.get("sleep"):
        time.sleep(spec["sleep"])
    out = {"key": spec["key"], "square": spec.get("x", 0) ** 2}
    if spec.get("timing"):
        out.update(pid=os.getpid(), started=started, ended=time.time())
    if spec.get("threads"):
        import torch

        out.update(torch_threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"),
                   mkl=os.environ.get("MKL_NUM_THREADS"))
    if spec.get("gpu_env"):
        out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return out


def failing_job(spec: dict) -> dict:
    """toy_job, except for specs that ask to fail: raise, SIGKILL itself, exit, or wait to be stopped."""
    mode = spec.get("fail")
    if mode == "raise":
        print("about to fail", flush=True)
        raise ValueError(f"boom in {spec['key']}")
    if mode == "sigkill":
        print("about to be killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        sys.exit(3)
    if mode == "os_exit":  # no Python unwinding: the process is simply gone
        os._exit(4)
    if mode == "hang":
        with open(spec["pid_file"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
    return toy_job(spec)
