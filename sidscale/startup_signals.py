"""Stop signals that arrive while a rank is still starting (imports take seconds; SLURM may signal a
job right after it starts) are recorded instead of killing the rank (SIGUSR1's default action is to
terminate). ``sidscale/train.py`` installs this as its first statement, before the slow imports;
``preemption.StopSignal`` takes the recorded signals over, so the job stops after its first step
like for any other stop request. Only the standard library is imported here: it must be cheap.
Signals that ``slurm/distill.sh``'s per-rank shell caught before it became this process arrive in
``SIDSCALE_STARTUP_SIGNALS`` (names, e.g. "USR1") and are recorded the same way.
A signal during the interpreter's own start-up, before train.py runs, still has its default action.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PENDING: list[int] = []


def _record(signum: int, frame: object) -> None:
    PENDING.append(signum)


def install() -> None:
    """Record SIGUSR1 / SIGTERM from now on (until ``StopSignal`` installs its own handler), and the
    ones the launching shell caught for this process (``SIDSCALE_STARTUP_SIGNALS``)."""
    for name in os.environ.pop("SIDSCALE_STARTUP_SIGNALS", "").split():
        signum = getattr(signal, f"SIG{name}", None)
        if signum in STOP_SIGNALS:
            PENDING.append(int(signum))
    for s in STOP_SIGNALS:
        try:
            signal.signal(s, _record)
        except ValueError:  # not the main thread: nothing to install
            pass


def take() -> list[int]:
    """The signals recorded so far (then forgotten)."""
    out = list(PENDING)
    PENDING.clear()
    return out
