"""Process-group start-up and tear-down for DeepSpeed under deepspeed / torchrun / srun / plain python."""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch

from sidscale.config import DistConfig
from sidscale.distributed import comm
from sidscale.distributed.rendezvous import init_with_rendezvous_timeout

# The DeepSpeed versions sidscale was tested with. sidscale relies on DeepSpeed internals (the
# shared-memory op builder patched below, ZeRO-3's ``ds_tensor`` / ``ds_numel`` / ``ds_shape``
# partition attributes, the engines' ``was_step_applied``), which change without notice between
# minor releases; setup.cfg pins the same range.
DEEPSPEED_SUPPORTED = (">=0.19.8", "<0.20")
ALLOW_UNTESTED_DEEPSPEED_ENV = "SIDSCALE_ALLOW_UNTESTED_DEEPSPEED"
DEFAULT_TIMEOUT_S = DistConfig().timeout_s
EXIT_FAILURE = 1  # any uncaught error on any rank; distinct from EXIT_REQUEUE (75), which SLURM requeues


class DeepSpeedVersionError(RuntimeError):
    pass


def check_deepspeed_version(installed: str | None = None) -> str:
    """Fail clearly when the installed DeepSpeed is outside the tested range; returns its version.

    ``SIDSCALE_ALLOW_UNTESTED_DEEPSPEED=1`` turns the error into a warning (at your own risk)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if installed is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("deepspeed")
        except PackageNotFoundError:
            raise DeepSpeedVersionError(f"deepspeed is not installed; sidscale needs deepspeed"
                                        f"{','.join(DEEPSPEED_SUPPORTED)}") from None
    spec = SpecifierSet(",".join(DEEPSPEED_SUPPORTED))
    try:
        ok = Version(installed) in spec
    except InvalidVersion:
        ok = False
    if not ok:
        msg = (f"installed deepspeed {installed} is outside the tested range deepspeed{spec} (sidscale patches "
               f"DeepSpeed internals that change between releases); install it with "
               f"pip install 'deepspeed{spec}', or set {ALLOW_UNTESTED_DEEPSPEED_ENV}=1 to run anyway")
        if os.environ.get(ALLOW_UNTESTED_DEEPSPEED_ENV) == "1":
            logging.getLogger(__name__).warning("%s", msg)
        else:
            raise DeepSpeedVersionError(msg)
    return installed


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


def init_distributed(local_rank_arg: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Start the process group (gloo on CPU, nccl on CUDA) and return this rank's identity.

    A single process without a launcher gets RANK=0/WORLD_SIZE=1 and a free local port, so
    ``python sidscale/train.py`` works; otherwise deepspeed would probe mpi4py and fail.
    ``timeout_s`` bounds every collective (config key ``dist.timeout_s``): a rank that waits longer
    for a peer fails instead of hanging; under NCCL the watchdog then ends the process.
    """
    check_deepspeed_version()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # NCCL: on a collective timeout or a communicator error the watchdog ends this process
    # instead of leaving it blocked (3 = SkipCleanUp: no ncclCommAbort, which can itself hang).
    # Read when the process group is created, so it must be set before; a user's value wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        device = torch.device("cpu")
    else:
        # Before the process group exists: NCCL's barrier and the object collectives
        # (broadcast_object_list, all_gather_object) use torch.cuda.current_device(), and without
        # set_device every rank would talk through GPU 0.
        get_accelerator().set_device(local_rank)
        device = torch.device(get_accelerator().device_name(local_rank))
    if not torch.distributed.is_initialized():  # a short rendezvous first: sidscale.distributed.rendezvous
        init_with_rendezvous_timeout(lambda t: deepspeed.init_distributed(
            dist_backend="gloo" if on_cpu else "nccl", verbose=False, timeout=t), timeout_s)
    return DistInfo(comm.rank(), comm.world_size(), local_rank, device)


def shutdown_distributed() -> None:
    """Orderly tear-down; only for paths every rank reaches together (a clean end, a requeue stop).

    NOTE: without the barrier, about one exit in five aborted on gloo (environment_notes.md). On an
    error path the barrier would wait for ranks that never come: use ``exit_now`` there."""
    if comm.is_distributed():
        comm.barrier()
        torch.distributed.destroy_process_group()


def _flush_all() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass


def exit_now(code: int) -> NoReturn:
    """End this process at once with ``code``: no barrier, no process-group tear-down, no atexit.

    The other ranks are not waited for: their pending collectives fail when this process's
    sockets close (gloo) or at the NCCL watchdog (``dist.timeout_s``), and launchers (torchrun,
    srun --wait) end them. Waiting in a barrier here is what hung a job on one rank's error.

    A single rank has nobody to wait for: it raises SystemExit instead, so a caller of ``main()`` in
    the same process (the tests, a notebook) gets the code and keeps running."""
    _flush_all()
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        raise SystemExit(code)
    os._exit(code)


def fail_fast(exc: BaseException, rank: int, code: int = EXIT_FAILURE) -> NoReturn:
    """Print this rank's traceback (each line prefixed with the rank) and ``exit_now(code)``."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    prefixed = "".join(f"[rank {rank}] {line}\n" for line in text.splitlines())
    summary = (str(exc).splitlines() or [""])[0][:200]
    try:
        sys.stderr.write(prefixed)
        sys.stderr.write(f"sidscale: rank {rank} failed ({type(exc).__name__}: {summary}); exiting with code {code} "
                         "without waiting for the other ranks. If this is a communication error, another rank "
                         "probably failed first: look for its traceback.\n")
    finally:
        exit_now(code)
