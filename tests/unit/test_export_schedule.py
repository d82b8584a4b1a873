"""The export samples with the schedule training used (issue 12, fault 8).

Training reads the teacher's ``scheduler/scheduler_config.json``; the export must carry exactly that
schedule, whatever ``cfg.schedule`` says, and ``sidscale.sample`` (hence fid_eval) must use it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

# Betas unlike cfg.schedule's defaults (scaled_linear 0.00085 .. 0.012): at t_init = 625 this
# schedule's abar is 0.019, the SD schedule's 0.138.
OTHER_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                   "prediction_type": "epsilon", "clip_sample": False}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from sidscale.families.toy.tiny import write_tiny_toy_teacher

    path = write_tiny_toy_teacher(tmp_path_factory.mktemp("teacher") / "teacher", sample_size=8)
    DDPMScheduler(**OTHER_SCHEDULER).save_pretrained(path / "scheduler")
    return path


def _trainer_sampling_meta(teacher_dir: Path) -> dict:
    """``Trainer.sampling_meta`` of a run on this teacher (the real method, on the attributes it reads)."""
    from sidscale.config import load_config
    from sidscale.families.unet_vp.loading import load_teacher
    from sidscale.method.sid_lsg import MethodSettings
    from sidscale.outputs import sampling_meta

    cfg = load_config("toy", [f"teacher.path={teacher_dir}"])
    assert cfg.schedule.beta_schedule == "scaled_linear"  # the config disagrees with the teacher
    teacher = load_teacher(cfg.teacher, "cpu")
    run = SimpleNamespace(cfg=cfg, settings=MethodSettings.from_config(cfg.method), teacher=teacher,
                          family=teacher.family,
                          schedule=teacher.schedule, step=3, images_seen=12)
    return sampling_meta(run)


def test_export_samples_with_the_teachers_schedule(teacher_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from sidscale.export import export_generator
    from sidscale.sample import FewStepPipeline as OneStepPipeline
    from sidscale.sample import seeded_latent_noise

    meta = json.loads(json.dumps(_trainer_sampling_meta(teacher_dir)))  # as it is stored
    gen = UNet2DConditionModel.from_pretrained(teacher_dir / "unet").eval()
    out = export_generator(gen.state_dict(), dict(gen.config), tmp_path / "export", meta)
    pipe = OneStepPipeline.from_export(out)
    prompts, seeds = ["a red circle", "a blue square"], [4, 5]
    x0 = pipe.latents(prompts, seeds)

    # independent: diffusers' own alphas_cumprod of the teacher's scheduler, docs/method.md 1's formulas
    abar = DDPMScheduler.from_pretrained(teacher_dir / "scheduler").alphas_cumprod[625].double()
    z = seeded_latent_noise(seeds, meta["latent_shape"]).double()
    x_in = (1 - abar).sqrt() * z
    with torch.no_grad():
        cond = pipe.conditioner.encode(prompts)["encoder_hidden_states"]
        eps = gen(x_in.float(), torch.full((2,), 625), encoder_hidden_states=cond).sample.double()
    expected = (x_in - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)


def test_old_export_meta_uses_the_teachers_schedule_or_says_why_not(teacher_dir, tmp_path, caplog):
    """Exports written before the fix hold cfg.schedule's betas, which training never used: they load
    with the teacher's schedule (what the run trained with) and a warning; without the teacher's
    scheduler file they fail with a message naming the file."""
    from sidscale.export import export_schedule

    old = {"prediction_type": "epsilon", "teacher_path": str(teacher_dir), "t_init": 625,
           "schedule": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                        "beta_schedule": "scaled_linear"}}
    with caplog.at_level(logging.WARNING, logger="sidscale.export"):
        schedule = export_schedule(old, "old/sidscale.json")
    assert torch.equal(schedule.alphas_cumprod, DDPMScheduler(**OTHER_SCHEDULER).alphas_cumprod)
    assert "not what training used" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"old/sidscale.json: .*scheduler_config.json, which is missing"):
        export_schedule({**old, "teacher_path": str(tmp_path / "gone")}, "old/sidscale.json")
    bad = {**old, "schedule": {"num_train_timesteps": 1000, "alphas_cumprod": [0.5, 0.9]}}
    with pytest.raises(ValueError, match="1000 non-increasing values"):
        export_schedule(bad, "x/sidscale.json")
