"""Run the trainer as a real multi-process job on CPU (gloo), one process per rank.

Each rank is a separate process with RANK / WORLD_SIZE / MASTER_* in its environment, as ``srun``
starts them in slurm/distill.sh, running ``sidscale.train.main`` exactly as ``python
sidscale/train.py`` does. The processes come from a fork server that imported torch, DeepSpeed,
diffusers and transformers once per test session: a fresh interpreter spends ~7 s of CPU on those
imports, which was most of the cost of each of the suite's launches. The fork server is a
single-threaded process that has run no torch op, so the forked ranks start as clean as a new
interpreter, minus the imports. ``run_script_ranks`` does the same for a worker script that would
otherwise run under torchrun (with torchrun's rendezvous variables), and ``Launch(forked_ranks=True)``
starts forked ranks in the background, each in a session of its own, for the tests that signal or kill
them. Tests whose subject is the launch itself (torchrun, the fail-fast of a launcher, SLURM) start real
interpreters instead. (The memory plan's 2-rank measured peak runs forked too: its allocation trace starts
before the trainer is built, so a forked rank measures what a fresh one does, tests/unit/test_perf.py.)
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sidscale.distributed.runtime import free_port
from sidscale.testing import fault_injection
from sidscale.testing.processes import is_gone, process_tree
from tests.helpers.inprocess import RENDEZVOUS_KEYS

REPO = Path(__file__).resolve().parents[2]
ENV = dict(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO))
# What a rank imports before its first step (measured: ~7 s of CPU in a fresh interpreter).
PRELOAD = [
    "torch", "torch._dynamo", "torch._inductor.codecache", "functorch.compile", "torch.utils.tensorboard",
    "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.bf16_optimizer", "deepspeed.module_inject", "deepspeed.moe.utils", "deepspeed.ops.adam",
    "diffusers", "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.schedulers", "diffusers.models.transformers.transformer_sd3", "transformers",
    "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
    "transformers.models.clip.tokenization_clip", "webdataset", "tensorboard", "networkx", "sympy",
    "sidscale.train", "sidscale.families.unet_vp.loading", "sidscale.distributed.engines", "sidscale.data.stream",
    "sidscale.data.prompts", "sidscale.data.shards", "sidscale.families.unet_vp.adapter",
    "sidscale.families.sd3.adapter",
    "diffusers.models.transformers.transformer_flux", "sidscale.families.flux.adapter",
    # What DeepSpeed imports in the first engine's optimizer check (ZeRO's list of supported optimizers
    # takes in its Muon optimizer, whose import loads torch.compile's inductor: ~1.5 s of each rank's
    # ~5 s of CPU), and the rest a rank imported on its way to its first step (PIL's image plugins for
    # the previews, DeepSpeed's expert-parallel injection, sidscale's method and memory plan).
    "deepspeed.runtime.zero.muon.muon_optimizer", "torch._inductor.compile_fx", "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin", "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.PpmImagePlugin", "packaging.specifiers",
    "torch.utils.serialization", "deepspeed.comm.mori", "deepspeed.module_inject.auto_ep_layer",
    "deepspeed.ops.triton_ops", "sidscale.method.sid", "sidscale.method.adversarial", "sidscale.core.ema",
    "sidscale.perf.placement", "sidscale.families.presets", "sidscale.startup_signals",
]

_context = None


def _fork_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.helpers.fork_server_preload"])
    return _context


def _start_forked_rank(env: dict[str, str], out_path: str, err_path: str):
    """What a process forked from the fork server does first to look like a launched rank: output to
    files, the rank's environment, default signal handlers, no inherited log handlers, fork as the start
    method and the rank's thread count. Returns the output files (flushed at exit by the caller)."""
    out = open(out_path, "w", buffering=1)
    err = open(err_path, "w", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    for k in RENDEZVOUS_KEYS:
        os.environ.pop(k, None)
    os.environ.update(env)
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    root = logging.getLogger()
    for h in list(root.handlers):  # main()'s basicConfig installs its own stderr handler
        root.removeHandler(h)
    # A process made by the fork server inherits "forkserver" as its start method; a rank started by a
    # launcher has the platform default (fork): its DataLoader workers must start the same way.
    multiprocessing.set_start_method("fork", force=True)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    return out, err


def _run_and_exit(out, err, body: Callable[[], int], exit_none: int) -> None:
    """``body()``'s exit code as this forked rank's (a traceback and 1 on an exception; ``sys.exit(None)``
    is ``exit_none``), after flushing its output files."""
    code = 1
    try:
        code = body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (exit_none if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        out.flush()
        err.flush()
        os._exit(code)


def _rank_main(argv: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """One rank, in a process forked from the fork server: output to files, then main()."""
    out, err = _start_forked_rank(env, out_path, err_path)

    def body() -> int:
        from sidscale.train import main

        return main(argv)

    _run_and_exit(out, err, body, exit_none=1)


def _run_forked(target, args: tuple, base_env: dict[str, str], nproc: int,
                timeout: float) -> tuple[list[int], str, str]:
    """``target(*args, env, out_path, err_path)`` on ``nproc`` ranks forked from the fork server (env:
    ``base_env`` plus RANK / LOCAL_RANK); every rank's exit code (-9: killed at ``timeout``), then all
    ranks' stdout and stderr, rank 0's first."""
    ctx = _fork_context()
    with tempfile.TemporaryDirectory(prefix="sidscale-launch-") as logs:
        paths = [(str(Path(logs) / f"{r}.out"), str(Path(logs) / f"{r}.err")) for r in range(nproc)]
        procs = [ctx.Process(target=target, args=(*args, dict(base_env, RANK=str(r), LOCAL_RANK=str(r)), o, e))
                 for r, (o, e) in enumerate(paths)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        timed_out = [p for p in procs if p.exitcode is None]
        for p in timed_out:
            p.kill()
            p.join()
        codes = [p.exitcode if p not in timed_out else -9 for p in procs]
        stdout = "".join(Path(o).read_text(errors="replace") for o, _ in paths if Path(o).is_file())
        stderr = "".join(f"{RANK_HEADER.format(rank=r)}{Path(e).read_text(errors='replace')}"
                         for r, (_, e) in enumerate(paths) if Path(e).is_file())
    return codes, stdout, stderr


RANK_HEADER = "\n===== rank {rank} stderr =====\n"


def rank_tails(stderr: str, chars: int = 2500) -> str:
    """The end of EVERY rank's part of a forked launch's stderr (each after its ``RANK_HEADER``), for a
    failure message: the last characters of the whole text would show only the last rank's, and the
    rank that failed first (whose error the others only wait on) is often rank 0."""
    marker = RANK_HEADER.split("{rank}")[0]
    parts = stderr.split(marker)
    return "".join((marker if i else "") + (p if len(p) <= chars else p[:30] + "\n...\n" + p[-chars:])
                   for i, p in enumerate(parts))


def run_trainer(run_dir: Path, overrides: list[str], nproc: int = 2, config: str = "toy",
                timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
                codes_out: list[int] | None = None) -> subprocess.CompletedProcess:
    """``sidscale/train.py`` on ``nproc`` ranks. stdout / stderr: every rank's, rank 0's first;
    returncode: the first non-zero exit code of a rank, else 0. ``env``: added to each rank's
    environment (e.g. ``SIDSCALE_FAULT``); ``codes_out``: receives every rank's exit code (-9: killed
    at ``timeout``)."""
    argv = ["--config", config, "--run-dir", str(run_dir)]
    for o in overrides:
        argv += ["--set", o]
    port = str(free_port())
    base = dict(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env or {}))
    codes, stdout, stderr = _run_forked(_rank_main, (argv,), base, nproc, timeout)
    if codes_out is not None:
        codes_out.extend(codes)
    code = next((c for c in codes if c != 0), 0)
    proc = subprocess.CompletedProcess(["sidscale/train.py", *argv], code, stdout, stderr)
    if check and code != 0:
        raise AssertionError(f"trainer failed (exit codes {codes}):\n{stdout[-3000:]}\n{rank_tails(stderr)}")
    return proc


def _script_rank_main(script: str, args: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """One rank running ``script`` as ``__main__`` with ``args``, in a process forked from the fork server."""
    import runpy

    out, err = _start_forked_rank(env, out_path, err_path)
    sys.argv = [script, *args]

    def body() -> int:
        runpy.run_path(script, run_name="__main__")
        return 0

    _run_and_exit(out, err, body, exit_none=0)


def run_script_ranks(script: Path, args: list[str], nproc: int = 2,
                     timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc script args`` for a test worker script whose subject is not the
    launch (what the ranks compute, not how they were started): the same rendezvous variables as
    torchrun sets, but each rank forked from the fork server (no interpreter start-up and imports).
    stdout / stderr: every rank's, rank 0's first; returncode: the first non-zero exit code (-9: killed
    at ``timeout``)."""
    port = str(free_port())
    base = dict(ENV, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, GROUP_RANK="0")
    codes, stdout, stderr = _run_forked(_script_rank_main, (str(script), args), base, nproc, timeout)
    code = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess([str(script), *args], code, stdout, stderr)


def _session_rank_main(argv: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """``_rank_main`` in a session (and process group) of its own, as ``Popen(start_new_session=True)``
    starts a direct rank: a signal to the rank's process group reaches the rank and its DataLoader
    workers, never the fork server or pytest."""
    os.setsid()
    _rank_main(argv, env, out_path, err_path)


class _ForkedRank:
    """The part of ``subprocess.Popen`` that ``Launch`` uses, for a rank forked from the fork server."""

    stdout = None

    def __init__(self, process):
        self.process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
        return self.process.exitcode


class Launch:
    """A trainer started in the background, in a session of its own (apart from pytest's, so a kill
    never reaches the test runner); output goes to files, not pipes, which a chatty run could fill.

    Ranks: torchrun's (default); ``direct_ranks``: one interpreter per rank with RANK / WORLD_SIZE in
    its environment, as ``srun`` starts them (each rank's own exit code is visible: torchrun would turn
    75 into 1); ``forked_ranks``: the same, but each rank forked from the fork server, in a session of
    its own (no interpreter start-up; for the tests whose subject is what a signal or a kill does to the
    ranks and their checkpoints, not how they were started)."""

    def __init__(self, run_dir: Path, overrides: list[str], log_dir: Path, direct_ranks: bool = False,
                 fault: fault_injection.Fault | None = None, forked_ranks: bool = False):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.marker_dir = log_dir / "fault_reached"
        env = dict(ENV)
        if fault is not None:
            env.update({fault_injection.ENV: fault.spec(), fault_injection.DIR_ENV: str(self.marker_dir)})
        train = [str(REPO / "sidscale" / "train.py"), "--config", "toy", "--run-dir", str(run_dir)]
        train += [a for o in overrides for a in ("--set", o)]
        if forked_ranks or direct_ranks:
            port = str(free_port())
            rank_envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=port) for r in range(2)]
        if forked_ranks:
            ctx = _fork_context()
            self.procs = []
            for r, rank_env in enumerate(rank_envs):
                process = ctx.Process(target=_session_rank_main,
                                      args=(train[1:], rank_env, str(log_dir / f"rank{r}.out"),
                                            str(log_dir / f"rank{r}.stderr.out")))
                process.start()
                self.procs.append(_ForkedRank(process))
        elif direct_ranks:
            self.procs = [self._popen([sys.executable, *train], f"rank{r}", rank_env)
                          for r, rank_env in enumerate(rank_envs)]
        else:
            self.procs = [self._popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                       f"--master_port={free_port()}", *train], "torchrun", env)]

    def _popen(self, cmd: list[str], name: str, env: dict) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.out", "w")  # closed in wait()
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, **env), start_new_session=True)

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.out")))

    def ranks_at_fault(self) -> int:
        """How many ranks have reached an injected ``hang`` (and wait there to be killed)."""
        return len(list(self.marker_dir.glob("reached_rank*")))

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait_until(self, condition, timeout: float = 300, poll: float = 0.2, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.running(), f"trainer exited before {what}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"timeout waiting for {what}:\n{self.output()[-4000:]}"
            time.sleep(poll)

    def kill(self) -> None:
        """SIGKILL every process of the launch at once, like a node failure or the OOM killer taking
        the job. NOTE: torchrun starts each worker in a session of its own, so killing torchrun's
        process group alone would leave the ranks running: kill each process group of the tree."""
        tree = [pid for p in self.procs for pid in process_tree(p.pid)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.wait()
        deadline = time.monotonic() + 10
        while (alive := [pid for pid in tree if not is_gone(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"processes {alive} survived SIGKILL"

    def wait(self, timeout: float = 300) -> list[int]:
        codes = [p.wait(timeout=timeout) for p in self.procs]
        for p in self.procs:
            if p.stdout is not None:
                p.stdout.close()
        return codes
