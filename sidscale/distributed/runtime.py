"""Process-group start-up and tear-down for DeepSpeed under deepspeed / torchrun / srun / plain python."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_from_slurm() -> None:
    """Under ``srun`` without a launcher, map SLURM's variables onto torch's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")


def init_distributed(local_rank_arg: int | None = None) -> DistInfo:
    """Start the process group (gloo on CPU, nccl on CUDA) and return this rank's identity.

    A single process without a launcher gets RANK=0/WORLD_SIZE=1 and a free local port, so
    ``python sidscale/train.py`` works; otherwise deepspeed would probe mpi4py and fail.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if local_rank_arg is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        # NOTE: DeepSpeed JIT-builds a shared-memory allreduce op (~35 s) on CPU at start-up;
        # training does not use it, so skip the build.
        # (`import deepspeed.comm.torch as m` would bind the real torch: deepspeed.comm re-exports
        # a `torch` name that shadows its submodule, hence sys.modules.)
        import importlib

        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        device = torch.device("cpu")
    else:
        get_accelerator().set_device(local_rank)
        device = torch.device(get_accelerator().device_name(local_rank))
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def shutdown_distributed() -> None:
    # NOTE: without the barrier, about one exit in five aborted on gloo (environment_notes.md).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank (used so all ranks take the same branch)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())
