"""A 2-rank ZeRO-3 run with teacher.partitioned=true on the tiny toy teacher: it trains (previews and the
toy evaluation run the partitioned teacher on every rank), and resumed from its step-2 checkpoint it
ends bit for bit where the uninterrupted run ends (both engines' weights, the EMA, the data cursor).
Two launches: the uninterrupted run, and the resumed copy of it."""

from __future__ import annotations

import json
import shutil

import pytest

from sidscale.checkpointing import files as ckpt_lib
from tests.helpers.dist_launch import run_trainer
from tests.helpers.reference_run import assert_identical

STEPS = 4


def overrides(teacher, cache, ds_config) -> list[str]:
    return ["train.precision=fp32", "teacher.dtype=fp32", "teacher.resolution=8", f"teacher.path={teacher}",
            "train.global_batch=8", "train.micro_batch=2", "data.shards=indexed:toy", "train.seed=3",
            "generator.lr=1e-2", "fake.lr=1e-2", "train.ema_halflife_kimg=0.01", "train.log_every=1",
            f"train.max_steps={STEPS}", "train.ckpt_every=2", "train.preview_every=2", "train.keep_last=5",
            "train.export_at_end=true", "eval.num_samples=16", "eval.teacher_steps=2", f"teacher.cache_dir={cache}",
            f"deepspeed.config={ds_config}", "teacher.partitioned=true"]


@pytest.mark.slow
def test_partitioned_teacher_run_resumes_exactly(tmp_path, tiny_toy_teacher):
    from tests.helpers.teacher_partition_worker import write_ds_config

    # ZeRO-3 with no persistent parameters and no prefetch: the toy teacher's tensors (all below
    # zero3.json's 1e5-element persistence threshold) are really partitioned and gathered one by one
    ds_config = write_ds_config(tmp_path / "zero3_small.json")
    full = tmp_path / "full"
    proc = run_trainer(full, overrides(tiny_toy_teacher, tmp_path / "cache", ds_config))
    assert "teacher placement: teacher.partitioned = true" in proc.stderr + proc.stdout
    assert (full / "samples" / "step_00000002.png").is_file()  # the preview with the teacher's reference
    assert (full / "export").is_dir()
    # the toy evaluation's teacher numbers (made on both ranks) equal the replicated teacher's own
    from sidscale.config import TeacherConfig
    from sidscale.families.toy.evaluation import toy_quality
    from sidscale.families.toy.fit import load_toy_mixture
    from sidscale.families.unet_vp.loading import load_teacher

    teacher = load_teacher(TeacherConfig(kind="toy", path=str(tiny_toy_teacher), dtype="fp32", resolution=8))
    want = toy_quality(teacher, load_toy_mixture(tiny_toy_teacher), None, 16, 2, 1.5, 625)
    got = json.loads((full / "toy_eval.json").read_text())
    for key in ("frechet_teacher_ddim", "prompt_accuracy_teacher_ddim", "colour_accuracy_teacher_ddim"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key

    # the same run, stopped after its step-2 checkpoint, then resumed
    split = tmp_path / "split"
    shutil.copytree(full, split)
    shutil.rmtree(ckpt_lib.step_dir(split, STEPS))
    ckpt_lib.mark_latest(split, ckpt_lib.step_dir(split, 2))
    proc = run_trainer(split, overrides(tiny_toy_teacher, tmp_path / "cache", ds_config))
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout
    assert_identical(split, full, steps=STEPS)
