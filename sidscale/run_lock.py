"""One writer per run directory: an OS lock on ``RUN/.lock`` held by rank 0 for the job's life.

A second job started on the same run directory (a resubmission while the first still runs, or
ranks orphaned by a killed launcher that keep training and saving) is refused with a message naming
the holder (host, pid, SLURM job id, start time). The lock is ``fcntl.lockf`` (POSIX record locks,
which NFSv4 and Lustre honour across nodes), so it is released by the OS when the holder dies for
any reason, SIGKILL included: a crashed or preempted job never blocks its own requeue. The run
directory itself is flock'ed too, so deleting ``.lock`` by hand does not let a second job in
(``RunLock``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from sidscale.config import ConfigError

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


class RunDirLockedError(ConfigError):
    pass


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class RunLock:
    """Held from ``acquire`` until ``release`` or process exit (the OS drops it with the fds).

    Two locks: ``fcntl.flock`` on the run directory itself, then ``fcntl.lockf`` on ``RUN/.lock``
    (which holds the holder's identity for the message). The directory lock survives a ``.lock``
    deleted by hand (a new ``.lock`` file would be free to lock, and a second job would get in).
    Where directories cannot be flock'ed (NFS emulates flock with POSIX locks, which need a file open
    for writing), ``.lock`` alone is the lock, as before."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def _refuse(self, holder: dict, note: str = "") -> RunDirLockedError:
        who = ", ".join(f"{k} {v}" for k, v in holder.items() if v) or "unknown holder"
        return RunDirLockedError(
            f"--run-dir {self.path.parent} is in use by another job ({who}; lock {self.path}{note}). Two jobs "
            "writing one run would corrupt its checkpoints: wait for it to end (or kill its processes; the "
            "lock is released when they exit), or choose another --run-dir")

    def _lock_dir(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise self._refuse(_read_holder(self.path), note=", which was deleted or replaced while the job "
                               "holds the run directory") from None
        except OSError as e:  # no flock on directories here (NFS): .lock alone guards the run
            os.close(dir_fd)
            log.info("run lock: %s cannot be flock'ed (%s); the lock is %s alone", self.path.parent, e, self.path)
            return
        self._dir_fd = dir_fd

    def acquire(self) -> RunLock:
        self._lock_dir()
        try:
            self._lock_file()
        except BaseException:
            self.release()
            raise
        return self

    def _lock_file(self) -> None:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise RunDirLockedError(f"{self.path} is not a regular file (a directory or a link): it is the run's lock "
                                    "file, which sidscale creates; remove it (rmdir) and start again")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(self.path)
            os.close(fd)
            raise self._refuse(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        for name in ("_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)  # closing the descriptor drops the lock
                setattr(self, name, None)


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_bytes()[:4096].decode("utf-8", errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
