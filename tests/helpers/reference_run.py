"""Settings and comparisons of the shared uninterrupted fp32 reference run (conftest.fp32_reference_run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from sidscale.checkpointing.files import find_resume_checkpoint, full_ema_from_checkpoint, read_meta

MAX_STEPS = 6
BASE = [
    "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "teacher.dtype=fp32",
    "teacher.resolution=8", "data.shards=toy", "data.num_workers=1", "eval.num_samples=0",
    "train.export_at_end=false", "train.seed=3", "generator.lr=1e-2", "fake.lr=1e-2",
    "train.ema_halflife_kimg=0.01", "train.log_every=1", f"train.max_steps={MAX_STEPS}", "train.ckpt_every=2",
    "train.preview_every=2", "train.keep_last=5",
    # the preview's teacher reference in 2 DDIM steps, not 25 (its content is tests/trainer/test_preview.py's business)
    "eval.teacher_steps=2",
]


def overrides(teacher: Path) -> list[str]:
    return BASE + [f"teacher.path={teacher}"]


def final_state(run_dir: Path, steps: int = MAX_STEPS) -> dict:
    """Both engines' fp32 weights, the full EMA and each rank's data cursor at the newest checkpoint."""
    ckpt = find_resume_checkpoint(run_dir)
    assert ckpt is not None and read_meta(ckpt)["step"] == steps, f"{run_dir}: not finished ({ckpt})"
    out: dict = {f"{tag}.{k}": v for tag in ("generator", "fake")
                 for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}
    out.update({f"ema.{k}": v for k, v in full_ema_from_checkpoint(ckpt).items()})
    for r in range(int(read_meta(ckpt)["world_size"])):  # the data cursor
        out[f"data.rank{r}"] = torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=False)["data"]
    return out


def assert_identical(run_dir: Path, reference: Path, steps: int = MAX_STEPS) -> None:
    got, want = final_state(run_dir, steps), final_state(reference, steps)
    assert got.keys() == want.keys()
    for k, v in want.items():
        same = torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v
        assert same, f"{k} differs from the uninterrupted run"


def stopped_at(run_dir: Path, step: int, dest: Path) -> Path:
    """``dest`` as a run stopped at ``step`` leaves it: a copy of ``run_dir``'s checkpoint of that step, and
    ``latest`` naming it."""
    name = f"step_{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / name, dest / "checkpoints" / name)
    (dest / "checkpoints" / "latest").write_text(name + "\n")
    return dest
