"""Graceful stop on SIGUSR1 / SIGTERM (SLURM preemption, time limit): finish the step, save, exit.

The handler only records the signal; the training loop polls ``stop_requested()`` between
iterations, which all-reduces the flag so every rank stops after the SAME step (one rank may
get the signal later than another). A second signal while the checkpoint is being written is
recorded and ignored, so it cannot tear the save.
"""

from __future__ import annotations

import logging
import signal

from sidscale.distributed import comm

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "stopped early on request, run me again" (slurm/distill.sh requeues)


class StopSignal:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        from sidscale import startup_signals

        self.received: list[int] = startup_signals.take()  # signals that came during start-up
        if self.received:
            print("sidscale: a stop signal came during start-up; stopping after the first step", flush=True)
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        # NOTE: logging from a signal handler is not re-entrant safe; a print is enough here.
        print(f"sidscale: received signal {signal.Signals(signum).name}; stopping after this step", flush=True)

    def stop_requested(self) -> bool:
        """True on every rank when any rank got a signal (a collective: all ranks must call)."""
        # NOTE: comm puts the flag on the comm device (a CPU tensor would fail under NCCL); the
        # .item() is one small host sync per step, the price of every rank stopping at the same step.
        return comm.any_rank(bool(self.received))

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
