"""Run the trainer under a real 2-process launch (torchrun, gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sidscale.distributed.runtime import free_port

REPO = Path(__file__).resolve().parent.parent


def run_trainer(run_dir: Path, overrides: list[str], nproc: int = 2, config: str = "toy",
                timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "sidscale" / "train.py"),
           "--config", config, "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
