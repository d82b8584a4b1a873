"""What the SLURM tests read back from a job: a field of its state, and of a finished sidscale job its
weights and a report of its logs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from sidscale.checkpointing.files import find_resume_checkpoint, full_ema_from_checkpoint, read_meta


def job_field(env: dict, job: str, name: str) -> str:
    """``name``'s value in ``scontrol show job`` of ``job`` (e.g. JobState, Restarts, ExitCode); "" if absent."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60,
                         env=env).stdout
    m = re.search(rf"\b{name}=(\S*)", out)
    return m.group(1) if m else ""


def weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, generator + fake net + EMA weights in fp32) of the run's resume checkpoint."""
    ckpt = find_resume_checkpoint(run_dir)
    flat = {f"{tag}.{k}": v for tag in ("generator", "fake")
            for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}
    flat.update({f"ema.{k}": v for k, v in full_ema_from_checkpoint(ckpt).items()})
    return read_meta(ckpt)["step"], flat


def job_report(run_dir: Path) -> str:
    """The tails of the batch log (``RUN_DIR.out``) and of every rank's log, for a failure message."""
    parts = [Path(f"{run_dir}.out")] + sorted((run_dir / "logs").glob("rank*.log"))
    return "\n".join(f"== {p}\n{p.read_text()[-2500:]}" for p in parts if p.is_file())
