"""A real single-node SLURM (munged + slurmctld + slurmd from Debian's slurm-wlm and munge) for the tests.

`SlurmCluster(folder).start()` writes a slurm.conf and a munge key under `folder`, starts exactly three
daemons (each in the foreground, as a child of this process, so `stop()` ends exactly those) on free
loopback ports, waits until the node is idle, and returns the environment (`SLURM_CONF`) that sbatch,
squeue and scontrol need. Everything runs as the current user (root in CI: SlurmUser=root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "srun", "scancel")


def missing_programs() -> list[str]:
    """The daemons and client commands that are not installed (apt: slurm-wlm, munge)."""
    found = {name: shutil.which(name) or (Path("/usr/sbin") / name if (Path("/usr/sbin") / name).exists() else None)
             for name in DAEMONS + CLIENTS}
    return [name for name, path in found.items() if not path]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, folder: Path, cpus: int | None = None, memory_mb: int = 16000):
        self.folder = Path(folder)
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.memory_mb = memory_mb
        self.processes: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def _write_config(self) -> Path:
        f = self.folder
        for sub in ("state", "spool", "log", "run"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname()
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        conf = f / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=sslbench-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"AuthInfo=socket={f / 'run' / 'munge.socket'}",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "OverTimeLimit=0",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=30",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]))
        return conf

    def start(self, timeout_s: float = 60.0) -> dict[str, str]:
        conf = self._write_config()
        f = self.folder
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        log = open(f / "log" / "daemons.out", "ab")
        munge = [_program("munged"), "--foreground", "--force", f"--key-file={f / 'munge.key'}",
                 f"--socket={f / 'run' / 'munge.socket'}", f"--pid-file={f / 'run' / 'munged.pid'}",
                 f"--log-file={f / 'log' / 'munged.log'}", f"--seed-file={f / 'run' / 'munged.seed'}"]
        self.processes.append(subprocess.Popen(munge, stdout=log, stderr=log, env=self.env))
        self._wait_for(lambda: (f / "run" / "munge.socket").exists(), timeout_s, "munged")
        for daemon in ("slurmctld", "slurmd"):
            self.processes.append(subprocess.Popen([_program(daemon), "-D", "-f", str(conf)], stdout=log,
                                                   stderr=log, env=self.env))
        self._wait_for(self._node_idle, timeout_s, "slurmctld/slurmd (node idle)")
        return self.env

    def _node_idle(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {self.folder / 'log'}")
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return done.returncode == 0 and done.stdout.strip().startswith("idle")

    @staticmethod
    def _wait_for(condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM exactly the daemons this object started (slurmd first), then SIGKILL what is left."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.processes = []
