"""One writer per run directory: an OS lock on ``RUN/.lock`` held by rank 0 for the job's life.

A second job started on the same run directory (a resubmission while the first still runs, or
ranks orphaned by a killed launcher that keep training and saving) is refused with a message naming
the holder (host, pid, SLURM job id, start time). The lock is ``fcntl.lockf`` (POSIX record locks,
which NFSv4 and Lustre honour across nodes), so it is released by the OS when the holder dies for
any reason, SIGKILL included: a crashed or preempted job never blocks its own requeue.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sidscale.config import ConfigError

LOCK_NAME = ".lock"


class RunDirLockedError(ConfigError):
    pass


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class RunLock:
    """Held from ``acquire`` until ``release`` or process exit (the OS drops it with the fd)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace") or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = ", ".join(f"{k} {v}" for k, v in holder.items() if v) or "unknown holder"
            raise RunDirLockedError(
                f"--run-dir {self.path.parent} is in use by another job ({who}; lock {self.path}). Two jobs "
                "writing one run would corrupt its checkpoints: wait for it to end (or kill its processes; the "
                "lock is released when they exit), or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
