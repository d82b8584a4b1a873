"""Run the trainer's ``main()`` inside the test process, as one rank.

A one-rank run needs no launcher: ``init_distributed`` starts a single-process gloo group from the
environment. Running it in-process saves the ~8 s start-up (Python, torch, DeepSpeed, process
group) that a subprocess pays, for every test that only needs one rank or only checks how the
trainer rejects its input. Everything ``main()`` changes in the process (environment variables,
signal handlers, the default process group, logging handlers, thread count) is restored after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from sidscale.distributed.runtime import free_port

RENDEZVOUS_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _deepspeed_group_state() -> dict:
    """DeepSpeed caches process groups in module globals of ``deepspeed.utils.groups``; they outlive
    ``destroy_process_group`` and would be reused by the next run's engines. Their pristine values
    (taken before any run) are restored after each run."""
    from deepspeed.utils import groups

    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(groups).items()
            if k.startswith("_") and k[1:2].isupper() and (v is None or isinstance(v, dict))}


_PRISTINE_GROUPS = _deepspeed_group_state()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def single_rank_environment(extra_env: dict[str, str] | None = None):
    """os.environ, signal handlers and threads as a fresh one-rank process would have them."""
    saved_env = dict(os.environ)
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    saved_threads = torch.get_num_threads()
    for k in RENDEZVOUS_KEYS:
        os.environ.pop(k, None)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                      TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    try:
        yield
    finally:
        if torch.distributed.is_initialized():  # a failed run may leave its group behind
            torch.distributed.destroy_process_group()
        from deepspeed.utils import groups

        for k, v in _PRISTINE_GROUPS.items():
            setattr(groups, k, dict(v) if isinstance(v, dict) else v)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in saved_handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(saved_threads)


def run_main(run_dir: Path, overrides: list[str], config: str = "toy",
             extra_env: dict[str, str] | None = None) -> Result:
    """``python sidscale/train.py --config CONFIG --run-dir RUN --set ...`` as one rank, in-process.

    stdout, stderr and every log record (the trainer's warnings go through ``logging``) are captured.
    """
    from sidscale.train import main

    argv = ["--config", config, "--run-dir", str(run_dir)]
    for o in overrides:
        argv += ["--set", o]
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # what main()'s basicConfig sets in a fresh process
    try:
        with single_rank_environment(extra_env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # a one-rank failure ends main() this way (runtime.exit_now)
                code = e.code if isinstance(e.code, int) else 1
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    return Result(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def one_rank_trainer(run_dir: Path, overrides: list[str], config: str = "toy"):
    """A ``Trainer`` built as ``main()`` builds it, as one in-process rank (torn down on exit)."""
    from sidscale.config import load_config, validate
    from sidscale.distributed.runtime import init_distributed
    from sidscale.trainer import Trainer

    cfg = load_config(config, overrides)
    with single_rank_environment():
        validate(cfg, 1)
        trainer = Trainer(cfg, Path(run_dir), init_distributed())
        try:
            yield trainer
        finally:
            trainer.prompts.close()


@contextlib.contextmanager
def one_rank_group():
    """A one-rank process group (and this rank's ``DistInfo``) for tests that build engines in-process."""
    from sidscale.distributed.runtime import init_distributed

    with single_rank_environment():
        yield init_distributed()
