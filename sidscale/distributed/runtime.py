"""Process-group start-up and tear-down for DeepSpeed under deepspeed / torchrun / srun / plain python."""

from __future__ import annotations

import logging
import os
import random
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


class StartupError(RuntimeError):
    """The environment cannot run this job (printed as one line, exit code 2)."""


class DeepSpeedVersionError(StartupError):
    pass


class NoGPUError(StartupError):
    pass


# The oldest Linux NVIDIA driver each CUDA major release runs on (NVIDIA's CUDA compatibility
# tables; 12.x and 13.x rely on minor-version compatibility within the major release).
_MIN_DRIVER = {11: "450.80", 12: "525.60", 13: "580"}


def check_not_silently_on_cpu(accelerator_name: str) -> None:
    """Refuse DeepSpeed's CPU accelerator unless ``DS_ACCELERATOR=cpu`` asked for it.

    Without a usable GPU (a driver too old for torch's CUDA build, an empty ``CUDA_VISIBLE_DEVICES``)
    DeepSpeed falls back to its CPU accelerator with one warning, and the job then trains on gloo
    about a thousand times slower; on a cluster that looks like a hang, not an error."""
    if accelerator_name != "cpu" or os.environ.get("DS_ACCELERATOR", "").strip().lower() == "cpu":
        return
    cuda = torch.version.cuda
    if cuda is None:
        build = f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    else:
        major = int(cuda.split(".")[0])
        driver = _MIN_DRIVER.get(major)
        need = (f"which needs NVIDIA driver >= {driver} (nvidia-smi shows the driver version)" if driver
                else "check that the NVIDIA driver supports it (nvidia-smi)")
        build = f"torch {torch.__version__} is built for CUDA {cuda}, {need}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible!r}"
    raise NoGPUError(
        f"no usable GPU: torch.cuda.is_available() is {torch.cuda.is_available()}, so DeepSpeed picked its CPU "
        f"accelerator. {build}{shown}. Training on the CPU is about 1000x slower; to run on the CPU on "
        "purpose set DS_ACCELERATOR=cpu (slurm/distill.sh: SIDSCALE_CPU=1)")


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


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_port_low(path: str = EPHEMERAL_RANGE_FILE) -> int:
    """The lowest port the kernel hands to outgoing connections (Linux's default range starts at 32768)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(low: int | None = None, span: int = 16384) -> int:
    """A TCP port on 127.0.0.1 that is free now, for a local rendezvous (MASTER_PORT).

    Chosen at random BELOW the kernel's ephemeral range, never from it: a port that the kernel picked
    for ``bind(0)`` and that was then released can be taken, before rank 0 listens on it, as the local
    end of any outgoing connection on the host (another job's gloo mesh or TCPStore client). Rank 0
    then cannot listen, and the other ranks connect to a port that never answers until the rendezvous
    times out. The kernel never gives ports below that range to outgoing connections. ``low`` / ``span``:
    draw from ``[low - span, low)`` (default: the ``span`` ports under the ephemeral range)."""
    low = ephemeral_port_low() if low is None else low
    pick = random.SystemRandom()  # not the global generator: seeded runs would all draw the same ports
    for _ in range(64):
        port = pick.randrange(max(1024, low - span), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use (a service, or a rendezvous of another job): draw again
                continue
            return port
    with socket.socket() as s:  # everything drawn was busy: what the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list expanded, in order: ``"node[01-03],gpu7"`` -> node01 node02 node03 gpu7.

    Handles comma-separated entries, bracket groups of numbers and zero-padded ranges
    (``[1,3-5]``), and several groups in one name (``rack[1-2]-n[1-2]``, expanded left to right)."""
    hosts: list[str] = []
    depth, start = 0, 0
    for i, c in enumerate(nodelist + ","):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "," and depth == 0:
            entry = nodelist[start:i].strip()
            if entry:
                hosts += _expand_host(entry, nodelist)
            start = i + 1
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    if depth != 0:
        raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    return hosts


def _expand_host(entry: str, nodelist: str) -> list[str]:
    open_at = entry.find("[")
    if open_at < 0:
        return [entry]
    close_at = entry.index("]", open_at)
    prefix, body, rest = entry[:open_at], entry[open_at + 1:close_at], entry[close_at + 1:]
    numbers: list[str] = []
    for part in body.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"SLURM node list {nodelist!r}: cannot read the range {part!r}")
        width = len(lo)
        numbers += [str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1)]
    return [prefix + n + tail for n in numbers for tail in _expand_host(rest, nodelist)]


# MASTER_PORT under a bare srun: one port per job (slurm/distill.sh uses the same formula), so two jobs
# sharing a first node collide only when their ids are 20000 apart.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


def _env_from_slurm() -> None:
    """Under ``srun`` without a launcher, map SLURM's variables onto torch's: rank, local rank, world
    size, and (when absent) the rendezvous: MASTER_ADDR = the job's first host, MASTER_PORT from the
    job id. A user's MASTER_ADDR / MASTER_PORT win."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") \
        or os.environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in os.environ and nodelist:
        os.environ["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if "MASTER_PORT" not in os.environ and job and job.isdigit():
        os.environ["MASTER_PORT"] = str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN)


def cuda_ordinal(local_rank: int, device_count: int) -> int:
    """The CUDA device this rank uses: its local rank, or ``local_rank % device_count`` when the site
    binds fewer GPUs to each task than there are local ranks (``--gpu-bind``, ``--gpus-per-task``:
    each task sees its own GPU as device 0)."""
    if device_count <= 0 or local_rank < device_count:
        return local_rank
    ordinal = local_rank % device_count
    logging.getLogger(__name__).info("LOCAL_RANK %d sees %d CUDA device(s): using device %d", local_rank,
                                     device_count, ordinal)
    return ordinal


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
    check_not_silently_on_cpu(get_accelerator().device_name())
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
        ordinal = cuda_ordinal(local_rank, torch.cuda.device_count())
        get_accelerator().set_device(ordinal)
        device = torch.device(get_accelerator().device_name(ordinal))
    if not torch.distributed.is_initialized():  # a short rendezvous first: sidscale.distributed.rendezvous
        init_with_rendezvous_timeout(lambda t: deepspeed.init_distributed(
            dist_backend="gloo" if on_cpu else "nccl", verbose=False, timeout=t), timeout_s)
        if comm.world_size() > 1:
            _make_long_work_group()
    return DistInfo(comm.rank(), comm.world_size(), local_rank, device)


def _make_long_work_group() -> None:
    """The gloo group of the waits for rank 0's long work, made while every rank is known to be here
    (``comm.long_work_group``). Its full mesh of TCP connections is the first gloo traffic between
    nodes: a wrong interface fails here, at start-up, not at the first checkpoint."""
    try:
        comm.long_work_group()
    except RuntimeError as e:
        raise RuntimeError(f"connecting the ranks' gloo group failed ({e}); gloo uses the interface this host's "
                           "name resolves to: set GLOO_SOCKET_IFNAME to the interface the nodes reach each "
                           "other on (e.g. ib0, eth0)") from e


def shutdown_distributed() -> None:
    """Orderly tear-down; only for paths every rank reaches together (a clean end, a requeue stop).

    NOTE: without the barrier, about one exit in five aborted on gloo (docs/environment.md). On an
    error path the barrier would wait for ranks that never come: use ``exit_now`` there."""
    if comm.is_distributed():
        comm.release_long_work_groups()
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
    # A failed wait for rank 0's long work says itself what it waited for (comm.LongWorkWaitError).
    hint = ("" if isinstance(exc, comm.LongWorkWaitError) else
            " If this is a communication error, another rank probably failed first: look for its traceback.")
    try:
        sys.stderr.write(prefixed)
        sys.stderr.write(f"sidscale: rank {rank} failed ({type(exc).__name__}: {summary}); exiting with code {code} "
                         f"without waiting for the other ranks.{hint}\n")
    finally:
        exit_now(code)
