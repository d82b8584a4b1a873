"""The SD3 / SD3.5 family end to end on 2 CPU ranks: ``--config sd35_medium`` on a tiny SD3.5-shaped
diffusers directory trains with ZeRO-2 and ZeRO-3 (K = 4 generator steps, the preset's flow
settings), resumes bit for bit, and exports a pipeline directory that plain diffusers loads. The
export's K-step samples are checked against the sampling loop written out with diffusers' own
pipeline pieces (encode_prompt, the transformer, the VAE)."""

from __future__ import annotations

import json

import pytest
import torch

from sidscale.checkpointing.files import find_resume_checkpoint, full_ema_from_checkpoint
from tests.helpers.dist_launch import run_trainer
from tests.helpers.reference_run import assert_identical

STEPS = 4


def overrides(teacher, stage: int, max_steps: int = STEPS) -> list[str]:
    return [
        f"teacher.path={teacher}", "teacher.dtype=fp32", "teacher.resolution=64", "teacher.max_sequence_length=16",
        "train.precision=fp32", "train.global_batch=4", "train.micro_batch=1", f"train.max_steps={max_steps}",
        "train.ckpt_every=2", "train.preview_every=2", "train.log_every=1", "train.keep_last=5",
        "train.ema_halflife_kimg=0.01", "generator.lr=1e-3", "fake.lr=1e-3", "data.shards=indexed:toy",
        "eval.num_samples=0", "eval.teacher_steps=2", f"deepspeed.config=ds_configs/zero{stage}.json",
        "train.seed=11",
    ]


@pytest.fixture(scope="module")
def sd3_teacher(tmp_path_factory):
    from sidscale.families.sd3.tiny import write_tiny_sd3_teacher

    return write_tiny_sd3_teacher(tmp_path_factory.mktemp("sd3") / "teacher", seed=0, sd35=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, sd3_teacher):
    """The uninterrupted 4-step run per ZeRO stage (made once, shared by the tests below)."""
    runs: dict[int, object] = {}

    def get(stage: int):
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp(f"sd3-zero{stage}") / "run"
            run_trainer(runs[stage], overrides(sd3_teacher, stage), config="sd35_medium")
        return runs[stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sd35_trains_resumes_exactly_and_exports(tmp_path, sd3_teacher, full_run, stage):
    """Restarted from the uninterrupted run's step-2 checkpoint (as after a preemption), the run ends
    bit-identical to it."""
    import shutil

    from sidscale.checkpointing import files as ckpt_lib

    full = full_run(stage)
    split = tmp_path / "split"
    shutil.copytree(full, split, ignore=shutil.ignore_patterns("export", "step_00000004"))
    ckpt_lib.mark_latest(split, ckpt_lib.step_dir(split, 2))
    assert ckpt_lib.find_resume_checkpoint(split) == ckpt_lib.step_dir(split, 2)
    run = run_trainer(split, overrides(sd3_teacher, stage), config="sd35_medium")
    assert "resumed from" in run.stdout and "(step 2)" in run.stdout
    assert_identical(split, full, STEPS)  # generator, fake, EMA and the data cursors, bit for bit

    from diffusers import SD3Transformer2DModel

    ema = full_ema_from_checkpoint(find_resume_checkpoint(full))
    state = SD3Transformer2DModel.from_pretrained(full / "export" / "transformer").state_dict()
    assert all(torch.equal(state[k], v) for k, v in ema.items())
    original = SD3Transformer2DModel.from_pretrained(sd3_teacher / "transformer").state_dict()
    assert max((state[k] - original[k]).abs().max().item() for k in ema) > 1e-4  # it trained
    meta = json.loads((full / "export" / "sidscale.json").read_text())
    assert (meta["generator_steps"], meta["family"], meta["schedule"]["type"]) == (4, "mmdit_flow", "flow")


@pytest.fixture(scope="module")
def sd3_export(full_run):
    return full_run(2) / "export"


def test_export_is_a_self_contained_diffusers_pipeline(sd3_export, sd3_teacher, tmp_path):
    """Copied to another place with the teacher gone, the export loads as a StableDiffusion3Pipeline
    and ``FewStepPipeline`` samples K = 4 steps exactly as the loop written with diffusers' parts."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    from sidscale.sample import FewStepPipeline, seeded_generator_noises

    moved = tmp_path / "elsewhere"
    shutil.copytree(sd3_export, moved)
    hidden = sd3_teacher.with_name("teacher-hidden")
    sd3_teacher.rename(hidden)  # the teacher directory must not be needed any more
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(moved, local_files_only=True)
        ours = FewStepPipeline.from_export(moved)
        prompts, seeds = ["a red circle", "photo of a dog"], [3, 4]
        images = ours(prompts, seeds)
    finally:
        hidden.rename(sd3_teacher)
    meta = json.loads((moved / "sidscale.json").read_text())
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=meta["max_sequence_length"])
        noises = seeded_generator_noises(seeds, meta["latent_shape"], 4)
        x0 = torch.zeros_like(noises[0])
        for i, eps in enumerate(noises):  # docs/flow_matching.md 1.2: sigma_i = 1 - i/K, fresh noise per step
            sigma = 1 - i / 4
            x = (1 - sigma) * x0 + sigma * eps
            v = pipe.transformer(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled,
                                 timestep=torch.full((2,), 1000.0 * sigma), return_dict=False)[0]
            x0 = x - sigma * v
        vae = pipe.vae
        want = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, want, rtol=1e-4, atol=1e-4)
    assert images.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name,zero", [("sd3_medium", 2), ("sd35_medium", 2), ("sd35_large", 3)])
def test_sd3_presets_carry_sid_dit_settings(name, zero):
    """The released SiD-DiT recipe (docs/flow_matching.md 1.2-1.6), valid on 8 ranks."""
    import math

    from sidscale.config import load_config, validate

    cfg = load_config(name)
    validate(cfg, world_size=8)
    m = cfg.method
    assert (cfg.teacher.kind, cfg.teacher.resolution, cfg.teacher.max_sequence_length) == ("sd3", 1024, 77)
    assert (m.generator_steps, m.gen_weighting, m.gen_loss_scale, m.alpha, m.sigma_init) == (
        4, "one_minus_sigma", 100.0, 1.0, 1.0)
    assert (m.sigma_logit_mean, m.sigma_logit_std) == (pytest.approx(math.log(2)), 1.6)
    assert (cfg.generator.lr, tuple(cfg.generator.betas), cfg.train.global_batch) == (1e-6, (0.0, 0.999), 256)
    assert cfg.teacher.grad_checkpointing and cfg.generator.grad_checkpointing and cfg.fake.grad_checkpointing
    assert cfg.deepspeed.config == f"ds_configs/zero{zero}.json"


def test_sd3_teacher_loads_with_clear_errors(sd3_teacher):
    from sidscale.config import ConfigError, load_config
    from sidscale.core.schedule import FlowSchedule
    from sidscale.families import family_for_kind

    family = family_for_kind("sd3")

    def cfg(*extra):
        return load_config("sd35_medium", [f"teacher.path={sd3_teacher}", "teacher.dtype=fp32",
                                           "teacher.resolution=64", *extra])

    teacher = family.load_teacher(cfg(), "cpu")
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.latent_shape == (16, 8, 8)
    assert (teacher.scaling_factor, teacher.shift_factor) == (pytest.approx(1.5305), pytest.approx(0.0609))
    assert not any(p.requires_grad for p in teacher.net.parameters())
    with pytest.raises(ConfigError, match="teacher.resolution = 72: must be a multiple of 16"):
        family.load_teacher(cfg("teacher.resolution=72"), "cpu")
    with pytest.raises(ConfigError, match="exceed the transformer's pos_embed_max_size"):
        family.load_teacher(cfg("teacher.resolution=256"), "cpu")
    with pytest.raises(ConfigError, match="teacher.attention = 'eager'"):
        family.load_teacher(cfg("teacher.attention=eager"), "cpu")
