"""The start-up rendezvous gets a short timeout of its own, then the process group the configured one.

``init_process_group``'s timeout bounds both the rendezvous (every rank connecting) and every later
collective, so with one value a rank that dies before the process group exists (a crash or a signal
during imports) left the others waiting the whole ``dist.timeout_s``. Here the group is created with
``SIDSCALE_RENDEZVOUS_TIMEOUT_S`` (default 180 s, never more than ``dist.timeout_s``), every rank meets
in one barrier within it (NCCL creates its communicator there), and only then are the group's and
the store's timeouts raised to ``dist.timeout_s``. Raise the variable where ranks start far apart
(a cold shared filesystem making imports take minutes on some nodes).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch.distributed as dist

from sidscale.distributed import comm

RENDEZVOUS_TIMEOUT_ENV = "SIDSCALE_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 180.0


class RendezvousError(RuntimeError):
    pass


def rendezvous_timeout_s(timeout_s: float) -> float:
    """``SIDSCALE_RENDEZVOUS_TIMEOUT_S`` (default 180), capped at the collectives' ``timeout_s``."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    try:
        value = DEFAULT_RENDEZVOUS_TIMEOUT_S if raw in (None, "") else float(raw)
    except ValueError:
        raise RendezvousError(f"{RENDEZVOUS_TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)") from None
    if value <= 0:
        raise RendezvousError(f"{RENDEZVOUS_TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)")
    return min(value, float(timeout_s))


def init_with_rendezvous_timeout(start: Callable[[datetime.timedelta], None], timeout_s: float) -> None:
    """``start(timeout)`` creates the default process group; it and a first barrier get the short
    rendezvous timeout, then the group and its store get ``timeout_s`` for the rest of the job."""
    short = rendezvous_timeout_s(timeout_s)
    try:
        start(datetime.timedelta(seconds=short))
        comm.barrier()  # every rank is there: from now on a missing peer is a failure, not a late start
    except Exception as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise RendezvousError(
            f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: the process group start-up "
            f"at {where} did not complete within {short:g} s ({RENDEZVOUS_TIMEOUT_ENV}): another rank died or never "
            f"started (look for its error), or the ranks start further apart than that (raise "
            f"{RENDEZVOUS_TIMEOUT_ENV}). Cause: {type(e).__name__}: {str(e).strip()[:500]}") from e
    if short < timeout_s and dist.is_initialized():
        long = datetime.timedelta(seconds=float(timeout_s))
        dist.distributed_c10d._get_default_group().set_timeout(long)
        dist.distributed_c10d._get_default_store().set_timeout(long)
