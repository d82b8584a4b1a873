"""Deterministic fault injection for the test suite (read from ``SIDSCALE_FAULT``; unset in production).

Tests of fault tolerance must not race the trainer (kill "at a random moment", poll for a file to
appear): they tell the trainer where to fail instead. ``SIDSCALE_FAULT`` holds one fault:

    point=<name>,step=<N>[,rank=<R>],action=<raise|config_error|signal|hang|slow>[,seconds=<S>]

(several faults: separated by ``;``).

- ``point``: where in the loop (``mid_step``: between the fake and the generator phase of the
  iteration that ends at step N; ``after_step``: after step N finished, before its checkpoint;
  ``in_save``: inside the save of step N, after the engine shards, before ``meta.json``;
  around rank 0's one-off work while the other ranks wait: ``teacher_fit`` (step 0: just before rank 0
  resolves / fits the toy teacher), ``prune`` (writing meta.json and pruning after the save of step N),
  ``export`` and ``toy_eval`` (at the end, step N = the final step); ``load_teacher``: step 0, as each
  rank loads the teacher files).
- ``rank``: only this rank (default: every rank).
- ``action``: ``raise`` a RuntimeError; ``config_error``: raise a ConfigError (an input error seen by
  this rank only, as a teacher file missing on one node's view of NFS); ``slow``: sleep ``seconds``
  (a slow machine or filesystem), then go on; ``signal`` this process with SIGUSR1 (what SLURM sends);
  ``hang``: write ``<SIDSCALE_FAULT_DIR>/reached_rank<R>`` and sleep until killed, so a test can
  SIGKILL the job at exactly that point.

The hook costs one dict lookup per call when unset.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "SIDSCALE_FAULT"
DIR_ENV = "SIDSCALE_FAULT_DIR"
POINTS = ("mid_step", "after_step", "in_save", "load_teacher", "teacher_fit", "prune", "export", "toy_eval")
ACTIONS = ("raise", "config_error", "signal", "sigterm_group", "hang", "slow")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    action: str
    rank: int | None = None
    seconds: float = 0.0  # action slow

    def spec(self) -> str:
        rank = "" if self.rank is None else f",rank={self.rank}"
        seconds = f",seconds={self.seconds:g}" if self.action == "slow" else ""
        return f"point={self.point},step={self.step}{rank},action={self.action}{seconds}"


def parse(spec: str) -> Fault:
    try:
        fields = dict(item.split("=", 1) for item in spec.split(","))
        fault = Fault(point=fields["point"], step=int(fields["step"]), action=fields["action"],
                      rank=int(fields["rank"]) if "rank" in fields else None,
                      seconds=float(fields.get("seconds", 0.0)))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{ENV}={spec!r}: expected point=<name>,step=<N>[,rank=<R>],action=<name>"
                         "[,seconds=<S>]") from e
    if fault.point not in POINTS or fault.action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: point must be one of {POINTS}, action one of {ACTIONS}")
    if (fault.action == "slow") != (fault.seconds > 0):
        raise ValueError(f"{ENV}={spec!r}: seconds=<S> > 0 goes with action=slow (and only with it)")
    return fault


_cached: tuple[str | None, tuple[Fault, ...]] = (None, ())


def active() -> tuple[Fault, ...]:
    """The configured faults: one, or several separated by ``;`` (e.g. rank 0 slowed at several points)."""
    global _cached
    spec = os.environ.get(ENV)
    if spec != _cached[0]:
        _cached = (spec, tuple(parse(s.strip()) for s in spec.split(";") if s.strip()) if spec else ())
    return _cached[1]


def maybe_fail(point: str, step: int, rank: int) -> None:
    """Trigger the configured fault(s) of this point, step and rank."""
    for fault in active():
        if fault.point == point and fault.step == step and fault.rank in (None, rank):
            _trigger(fault, rank)


def _trigger(fault: Fault, rank: int) -> None:
    if fault.action == "raise":
        raise InjectedFault(f"injected fault ({fault.spec()}) on rank {rank}")
    if fault.action == "config_error":
        from sidscale.config import ConfigError

        raise ConfigError(f"injected input error ({fault.spec()}) on rank {rank}")
    if fault.action == "slow":
        time.sleep(fault.seconds)
        return
    if fault.action == "signal":
        os.kill(os.getpid(), signal.SIGUSR1)
        return
    if fault.action == "sigterm_group":
        # As scancel / a time limit: SIGTERM to every process of the job step, DataLoader workers too,
        # sent by ANOTHER process (slurmstepd): torch's worker handler exits quietly on a SIGTERM
        # from its own parent but dies of one from anyone else, which is the case to reproduce.
        subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"], check=True, start_new_session=True)
        return
    marker_dir = Path(os.environ.get(DIR_ENV, "."))
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f"reached_rank{rank}").write_text(fault.spec())
    while True:  # until the test kills the job
        time.sleep(60)
