"""Run the trainer as a real 2-process job on CPU (gloo).

The ranks are started directly, one process each with RANK / WORLD_SIZE / MASTER_* in its
environment, as ``srun`` starts them in slurm/distill.sh: that saves the ~3 s a torchrun agent costs
per launch (its own Python + torch import and rendezvous) on every one of the suite's ~20 launches.
torchrun itself is exercised by the tests that launch through it (the SIGKILL fault tests, the
memory-plan and comm checks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidscale.distributed.runtime import free_port

REPO = Path(__file__).resolve().parent.parent


def run_trainer(run_dir: Path, overrides: list[str], nproc: int = 2, config: str = "toy",
                timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``sidscale/train.py`` on ``nproc`` ranks. stdout / stderr: every rank's, rank 0's first;
    returncode: the first non-zero exit code of a rank, else 0."""
    cmd = [sys.executable, str(REPO / "sidscale" / "train.py"), "--config", config, "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    base.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    with tempfile.TemporaryDirectory(prefix="sidscale-launch-") as logs:
        # Files, not pipes: a chatty rank cannot block on a full pipe while the test waits on another.
        outs = [(open(Path(logs) / f"{r}.out", "w+"), open(Path(logs) / f"{r}.err", "w+")) for r in range(nproc)]
        procs = [subprocess.Popen(cmd, stdout=o, stderr=e, cwd=REPO, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)))
                 for r, (o, e) in enumerate(outs)]
        deadline = time.monotonic() + timeout
        try:
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            codes = [p.wait() for p in procs]
            codes = [c if c else -9 for c in codes]
        stdout, stderr = "", ""
        for o, e in outs:
            o.seek(0)
            e.seek(0)
            stdout, stderr = stdout + o.read(), stderr + e.read()
            o.close()
            e.close()
    code = next((c for c in codes if c != 0), 0)
    proc = subprocess.CompletedProcess(cmd, code, stdout, stderr)
    if check and code != 0:
        raise AssertionError(f"trainer failed (exit codes {codes}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return proc
