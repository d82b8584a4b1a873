"""The FLUX family end to end: ``--config flux_dev`` on a tiny FLUX.1-dev-shaped diffusers directory
trains on 2 CPU ranks with ZeRO-3 (K = 4, the preset's flow settings, distinct guidance embeddings per
net), resumes bit for bit, and exports a FluxPipeline directory that plain diffusers loads; the
export's K-step samples are checked against the sampling loop written with diffusers' own modules.
In process (one rank): the trainer calls each net with its own role's guidance embedding and the
unshifted sigmas."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sidscale.checkpointing.files import find_resume_checkpoint, full_ema_from_checkpoint
from tests.helpers.dist_launch import run_trainer
from tests.helpers.reference_run import assert_identical

STEPS = 4
# distinct from each other and from the defaults: a net called with another role's scale shows
GUIDANCE = {"teacher": 2.5, "fake": 4.0, "generator": 1.5}


def overrides(teacher, stage: int = 3, max_steps: int = STEPS) -> list[str]:
    return [
        f"teacher.path={teacher}", "teacher.dtype=fp32", "teacher.resolution=64", "teacher.max_sequence_length=16",
        "train.precision=fp32", "train.global_batch=4", "train.micro_batch=1", f"train.max_steps={max_steps}",
        "train.ckpt_every=2", "train.preview_every=2", "train.log_every=1", "train.keep_last=5",
        "train.ema_halflife_kimg=0.01", "generator.lr=1e-3", "fake.lr=1e-3", "data.shards=indexed:toy",
        "eval.num_samples=0", "eval.teacher_steps=4", f"deepspeed.config=ds_configs/zero{stage}.json",
        "train.seed=11", "distilled_guidance.mode=per_role",
        *[f"distilled_guidance.{k}={v}" for k, v in GUIDANCE.items()],
        # the frozen teacher partitioned across the ranks (optimizer-less ZeRO-3 engine), as at FLUX scale
        *(["teacher.partitioned=true"] if stage == 3 else []),
    ]


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory):
    from sidscale.families.flux.tiny import write_tiny_flux_teacher

    return write_tiny_flux_teacher(tmp_path_factory.mktemp("flux") / "teacher", seed=0)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, flux_teacher):
    """The uninterrupted 4-step ZeRO-3 run with a partitioned teacher (one 2-rank launch), shared below."""
    run = tmp_path_factory.mktemp("flux-zero3") / "run"
    run_trainer(run, overrides(flux_teacher), config="flux_dev")
    return run


@pytest.mark.slow
def test_flux_dev_trains_with_zero3_resumes_exactly_and_exports(tmp_path, flux_teacher, full_run):
    """Restarted from the uninterrupted run's step-2 checkpoint (as after a preemption), the run ends
    bit-identical to it; the export is the EMA, loadable by FluxTransformer2DModel.from_pretrained."""
    from diffusers import FluxTransformer2DModel

    from sidscale.checkpointing import files as ckpt_lib

    split = tmp_path / "split"
    shutil.copytree(full_run, split, ignore=shutil.ignore_patterns("export", "step_00000004"))
    ckpt_lib.mark_latest(split, ckpt_lib.step_dir(split, 2))
    run = run_trainer(split, overrides(flux_teacher), config="flux_dev")
    assert "resumed from" in run.stdout and "(step 2)" in run.stdout
    assert "teacher placement: teacher.partitioned = true" in run.stderr
    assert_identical(split, full_run, STEPS)  # generator, fake, EMA and the data cursors, bit for bit

    ema = full_ema_from_checkpoint(find_resume_checkpoint(full_run))
    state = FluxTransformer2DModel.from_pretrained(full_run / "export" / "transformer").state_dict()
    assert ema.keys() == state.keys() and all(torch.equal(state[k], v) for k, v in ema.items())
    original = FluxTransformer2DModel.from_pretrained(flux_teacher / "transformer").state_dict()
    assert max((state[k] - original[k]).abs().max().item() for k in ema) > 1e-4  # it trained
    meta = json.loads((full_run / "export" / "sidscale.json").read_text())
    assert (meta["generator_steps"], meta["family"], meta["teacher_kind"]) == (4, "flux_flow", "flux")
    assert meta["schedule"] == {"type": "flow", "source": str(flux_teacher / "scheduler" / "scheduler_config.json"),
                                "distilled_guidance": GUIDANCE, "guidance_mode": "per_role"}
    assert (meta["latent_shape"], meta["max_sequence_length"]) == ([16, 8, 8], 16)
    assert (full_run / "samples").is_dir() and any((full_run / "samples").iterdir())  # previews ran


def test_export_is_a_self_contained_flux_pipeline(full_run, flux_teacher, tmp_path):
    """Copied elsewhere with the teacher gone, the export loads as a FluxPipeline and ``FewStepPipeline``
    samples K = 4 steps exactly as the loop written with diffusers' parts: encode_prompt, packing and ids,
    the transformer at timestep sigma with the GENERATOR's guidance embedding, the VAE."""
    from diffusers import FluxPipeline

    from sidscale.sample import FewStepPipeline, seeded_generator_noises

    moved = tmp_path / "elsewhere"
    shutil.copytree(full_run / "export", moved)
    hidden = flux_teacher.with_name("teacher-hidden")
    flux_teacher.rename(hidden)  # the teacher directory must not be needed any more
    try:
        pipe = FluxPipeline.from_pretrained(moved, local_files_only=True)
        ours = FewStepPipeline.from_export(moved)
        prompts, seeds = ["a red circle", "photo of a dog"], [3, 4]
        images = ours(prompts, seeds)
    finally:
        hidden.rename(flux_teacher)
    assert json.loads((moved / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=16)
        noises = seeded_generator_noises(seeds, [16, 8, 8], 4)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        x0 = torch.zeros_like(noises[0])
        for i, eps in enumerate(noises):  # docs/flow_matching.md 1.2: sigma_i = 1 - i/K, fresh noise per step
            sigma = 1 - i / 4
            x = (1 - sigma) * x0 + sigma * eps
            v = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 16, 8, 8),
                                 timestep=torch.full((2,), sigma), guidance=torch.full((2,), GUIDANCE["generator"]),
                                 pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=text_ids,
                                 img_ids=img_ids, return_dict=False)[0]
            x0 = x - sigma * FluxPipeline._unpack_latents(v, 64, 64, 8)
        vae = pipe.vae
        want = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, want, rtol=1e-4, atol=1e-4)
    assert images.shape == (2, 3, 64, 64)


def _record_trainer_calls(flux_teacher, run_dir, extra: list[str]) -> dict[str, dict[str, set]]:
    """One in-process rank, ZeRO-2, K = 4, 3 steps: hooks on the three networks record the guidance
    embeddings, timesteps and batch sizes the trainer feeds them."""
    from sidscale.config import load_config
    from sidscale.distributed.runtime import init_distributed
    from sidscale.trainer import Trainer
    from tests.helpers.inprocess import single_rank_environment

    cfg = load_config("flux_dev", [*overrides(flux_teacher, stage=2), "train.global_batch=1", *extra])
    seen: dict[str, dict[str, set]] = {}
    with single_rank_environment():
        info = init_distributed()
        trainer = Trainer(cfg, run_dir, info)
        nets = {"generator": trainer.gen_engine.module, "fake": trainer.fake_engine.module,
                "teacher": trainer.teacher.net}
        for role, net in nets.items():
            seen[role] = {"guidance": set(), "timestep": set(), "batch": set()}

            def record(module, args, kwargs, role=role):
                seen[role]["guidance"].update(kwargs["guidance"].tolist())
                seen[role]["timestep"].update(round(t, 6) for t in kwargs["timestep"].tolist())
                seen[role]["batch"].add(kwargs["hidden_states"].shape[0])

            net.register_forward_pre_hook(record, with_kwargs=True)
        for _ in range(3):
            trainer.train_step()
    return seen


def test_trainer_official_guidance_feeds_each_calls_cfg_scale_as_the_embedding(flux_teacher, tmp_path):
    """distilled_guidance.mode official (the preset's): fake net at k1 (fake update) and k2 (generator
    update), teacher at k4, each with true CFG (batch 2 for micro-batch 1); generator at 1.0 without."""
    seen = _record_trainer_calls(flux_teacher, tmp_path / "run", [
        "distilled_guidance.mode=official", "distilled_guidance.teacher=3.5", "distilled_guidance.fake=null",
        "method.cfg_train_fake=2.0", "method.cfg_eval_fake=3.0", "method.cfg_eval_real=4.5"])
    assert {r: s["guidance"] for r, s in seen.items()} == {"generator": {1.5}, "fake": {2.0, 3.0},
                                                           "teacher": {4.5}}
    assert {r: s["batch"] for r, s in seen.items()} == {"generator": {1}, "fake": {2}, "teacher": {2}}


def test_trainer_calls_each_net_with_its_roles_guidance_and_unshifted_sigmas(flux_teacher, tmp_path):
    """Mode per_role: each net at its own fixed embedding, whatever the phase."""
    seen = _record_trainer_calls(flux_teacher, tmp_path / "run", [])
    assert {r: s["guidance"] for r, s in seen.items()} == {r: {g} for r, g in GUIDANCE.items()}
    # G at its K levels 1, 0.75, 0.5, 0.25 (not shifted), teacher / fake at loss sigmas in (0, 1): timestep = sigma
    assert seen["generator"]["timestep"] <= {1.0, 0.75, 0.5, 0.25} and 1.0 in seen["generator"]["timestep"]
    assert all(0 < s < 1 for s in seen["teacher"]["timestep"] | seen["fake"]["timestep"])
    assert seen["teacher"]["timestep"] <= seen["fake"]["timestep"]  # the generator phase: same sigma for both
