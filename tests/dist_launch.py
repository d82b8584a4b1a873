"""Run the trainer as a real multi-process job on CPU (gloo), one process per rank.

Each rank is a separate process with RANK / WORLD_SIZE / MASTER_* in its environment, as ``srun``
starts them in slurm/distill.sh, running ``sidscale.train.main`` exactly as ``python
sidscale/train.py`` does. The processes come from a fork server that imported torch, DeepSpeed,
diffusers and transformers once per test session: a fresh interpreter spends ~7 s of CPU on those
imports, which was most of the cost of each of the suite's ~20 launches. The fork server is a
single-threaded process that has run no torch op, so the forked ranks start as clean as a new
interpreter, minus the imports. Tests that need a launcher or a signal-able process tree
(torchrun, SIGKILL, SIGUSR1, SLURM) start real interpreters instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from sidscale.distributed.runtime import free_port

REPO = Path(__file__).resolve().parent.parent
RENDEZVOUS_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What a rank imports before its first step (measured: ~7 s of CPU in a fresh interpreter).
PRELOAD = [
    "torch", "torch._dynamo", "torch._inductor.codecache", "functorch.compile", "torch.utils.tensorboard",
    "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.bf16_optimizer", "deepspeed.module_inject", "deepspeed.moe.utils", "deepspeed.ops.adam",
    "diffusers", "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.schedulers", "transformers", "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip", "webdataset", "tensorboard", "networkx", "sympy",
    "sidscale.train", "sidscale.models.teacher", "sidscale.distributed.engines", "sidscale.data.stream",
    "sidscale.data.prompts", "sidscale.data.shards",
]

_context = None


def _fork_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank_main(argv: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """One rank, in a process forked from the fork server: output to files, then main()."""
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
    code = 1
    try:
        from sidscale.train import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        out.flush()
        err.flush()
        os._exit(code)


def run_trainer(run_dir: Path, overrides: list[str], nproc: int = 2, config: str = "toy",
                timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``sidscale/train.py`` on ``nproc`` ranks. stdout / stderr: every rank's, rank 0's first;
    returncode: the first non-zero exit code of a rank, else 0."""
    argv = ["--config", config, "--run-dir", str(run_dir)]
    for o in overrides:
        argv += ["--set", o]
    port = str(free_port())
    base = dict(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    ctx = _fork_context()
    with tempfile.TemporaryDirectory(prefix="sidscale-launch-") as logs:
        paths = [(str(Path(logs) / f"{r}.out"), str(Path(logs) / f"{r}.err")) for r in range(nproc)]
        procs = [ctx.Process(target=_rank_main, args=(argv, dict(base, RANK=str(r), LOCAL_RANK=str(r)), o, e))
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
        stderr = "".join(Path(e).read_text(errors="replace") for _, e in paths if Path(e).is_file())
    code = next((c for c in codes if c != 0), 0)
    proc = subprocess.CompletedProcess(["sidscale/train.py", *argv], code, stdout, stderr)
    if check and code != 0:
        raise AssertionError(f"trainer failed (exit codes {codes}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return proc
