"""The one place where sidscale calls torch.distributed collectives (DeepSpeed's own are its business).

The rule this module enforces: a tensor handed to a collective lives on the process group's
communication device: ``cuda:<local rank>`` under NCCL, the CPU under gloo. NCCL rejects CPU
tensors at the first call ("No backend type associated with device type cpu"), so a CPU flag
all-reduced from the training loop would stop a GPU job before its first step, while every CPU
test (gloo) passes. Every helper below moves its tensors to ``comm_device()`` and hands results
back where the caller wants them; tests/robustness/test_robust.py fails if any other module of sidscale
or tools calls a torch.distributed collective directly, so the rule cannot erode.

Why this and not a per-device backend (``init_process_group("cpu:gloo,cuda:nccl")``), which would
make CPU-tensor collectives legal too: that adds a second, gloo, transport between all ranks
(a TCP full mesh beside NCCL's, at every job size), under a configuration DeepSpeed's comm layer
is not tested with, and it would still route the per-step stop flag through a different transport
than the step's gradients. One NCCL process group, the setup DeepSpeed documents and tests, plus
this module, is the smaller surface. The cost is one tiny host->device copy and a device->host
read for each flag (the stop poll once per step), which is negligible next to an SD iteration.

Object collectives (``broadcast_object``, ``all_gather_object``) pickle into byte tensors on
``torch.cuda.current_device()`` under NCCL, so they are only correct after
``torch.cuda.set_device(local_rank)``: sidscale.distributed.runtime.init_distributed does that
before the process group exists. All helpers are no-ops (or local identities) without a process
group, so single-process tools and unit tests run unchanged.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def device_for_backend(backend: str, cuda_index: int) -> torch.device:
    """The device a backend's collectives take tensors on: cuda for NCCL, the CPU for gloo / mpi.

    ``backend`` is what ``dist.get_backend()`` reports ("nccl", "gloo", or a per-device string such
    as "cpu:gloo,cuda:nccl", for which the CPU works and avoids device syncs)."""
    b = backend.lower()
    if "nccl" in b and "cpu:" not in b:
        return torch.device("cuda", cuda_index)
    return torch.device("cpu")


def comm_device() -> torch.device:
    """Where tensors for this process group's collectives must live (the CPU without a group)."""
    if not is_distributed():
        return torch.device("cpu")
    backend = str(dist.get_backend())
    if "nccl" in backend.lower():
        return device_for_backend(backend, torch.cuda.current_device())
    return device_for_backend(backend, 0)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The reduction of ``tensor`` over all ranks (``op``: sum | min | max), on the comm device.

    The input is not modified when it has to be moved; it is reduced in place when it already
    lives on the comm device."""
    if not is_distributed():
        return tensor
    t = tensor.to(comm_device())
    dist.all_reduce(t, op=_OPS[op])
    return t


def all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank (a collective: all ranks must call)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    return bool(all_reduce(t, "min").item())


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on at least one (a collective: all ranks must call)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    return bool(all_reduce(t, "max").item())


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on every rank), each on ``tensor``'s device."""
    if not is_distributed():
        return [tensor.clone()]
    t = tensor.to(comm_device())
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    # NOTE: .to is a no-op when the caller's tensor already lives on the comm device (GPU runs);
    # it brings the parts back to the host for CPU tensors (e.g. ZeRO-Offload partitions).
    return [p.to(tensor.device) for p in parts]


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (a collective: all ranks must call)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


# How long the other ranks wait for rank 0's one-off work (export, toy evaluation, checkpoint pruning,
# the toy teacher's fit). Not dist.timeout_s: that bounds collectives between working ranks, and this
# work has no bound of its own (a FLUX export copies tens of GB; a busy CPU machine evaluates slowly).
LONG_WORK_TIMEOUT_S = 24 * 3600


class LongWorkWaitError(RuntimeError):
    """A rank's wait for rank 0's long work failed: rank 0 died, or ran past the wait's limit."""


_long_work_groups: dict[float, tuple[Any, Any]] = {}  # timeout -> (the world it belongs to, its gloo group)


def _world() -> Any:
    return dist.GroupMember.WORLD


def long_work_group(timeout_s: float = LONG_WORK_TIMEOUT_S):
    """The gloo group the long-work waits use (one per timeout, made once per process group: creating
    a group connects every pair of ranks, too costly for every checkpoint at hundreds of ranks).

    NOTE: making the group waits for every rank for up to ``timeout_s``, so a rank that died before
    would hold the others for that long: ``runtime.init_distributed`` makes the default one at
    start-up, right after every rank has joined, and a later wait finds a dead rank by its closed
    sockets. A collective the first time (per timeout): all ranks must call."""
    world = _world()
    cached = _long_work_groups.get(timeout_s)
    if cached is None or cached[0] is not world:  # none yet, or made for a process group since destroyed
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        _long_work_groups[timeout_s] = cached = (world, group)
    return cached[1]


def release_long_work_groups() -> None:
    """Tear the long-work groups down in step on every rank (a clean end only: a collective).

    Each group is first met in a barrier, so no rank closes its sockets while a peer still has an
    operation on them, then destroyed here, not left to the interpreter's exit (this module's cache
    would otherwise keep it alive past ``destroy_process_group``)."""
    for world, group in list(_long_work_groups.values()):
        if world is _world():
            dist.barrier(group=group)
            dist.destroy_process_group(group)
    _long_work_groups.clear()


def broadcast_object_after_long_work(work: Callable[[], T], timeout_s: float = LONG_WORK_TIMEOUT_S,
                                     what: str = "its long work") -> T:
    """``work()`` on rank 0, its result on every rank, the others waiting up to ``timeout_s``.

    For rank 0's one-off work that can outlast ``dist.timeout_s`` (the elastic checkpoint conversion,
    the export, the toy evaluation, checkpoint pruning, the toy teacher's fit): the wait runs on a
    gloo group of its own (CPU tensors) with its own timeout, so no NCCL collective is pending while
    rank 0 works and the NCCL watchdog has nothing to time out. If rank 0 dies, the others' wait ends
    when its sockets close. A failed wait raises ``LongWorkWaitError`` naming ``what`` (a phrase:
    "the export"). A collective: all ranks must call."""
    if not is_distributed() or world_size() == 1:
        return work()
    group = long_work_group(timeout_s)
    box = [work() if rank() == 0 else None]
    started = time.monotonic()
    try:
        dist.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
    except RuntimeError as e:  # gloo: a timeout or a closed connection
        if rank() == 0:
            raise
        waited = time.monotonic() - started
        cause = ("rank 0 ran past the limit" if waited >= 0.9 * timeout_s else
                 "rank 0 stopped before finishing: its own output says why")
        reason = (str(e).splitlines() or [""])[0][:200]
        raise LongWorkWaitError(f"rank {rank()} waited {waited:.0f} s (limit {timeout_s:.0f} s) for rank 0 to finish "
                                f"{what}: {cause} ({type(e).__name__}: {reason})") from e
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (a collective: all ranks must call)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)  # uses torch.cuda.current_device() under NCCL (set_device first)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def decide_on_rank0(decide: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Evaluate ``decide`` on rank 0 only and return its result on every rank.

    For decisions taken from the filesystem (is a checkpoint complete, which one to resume):
    on a shared filesystem with client caching (NFS, Lustre) ranks can see different states of the
    same directory, and ranks that branch differently around a collective hang or corrupt a save.
    A collective: all ranks must call."""
    return broadcast_object(decide(*args, **kwargs) if rank() == 0 else None)


def gather_to_rank0(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape and dtype on every rank) on rank 0, in rank order, each on
    the comm device; ``None`` on the other ranks, which receive nothing (nothing full-size is ever
    gathered on every rank). A collective: all ranks must call."""
    if not is_distributed():
        return [tensor]
    t = tensor.to(comm_device())
    parts = [torch.empty_like(t) for _ in range(world_size())] if rank() == 0 else None
    dist.gather(t, parts, dst=0)
    return parts
