"""The FLUX family's pieces against diffusers' own FluxPipeline on a tiny FLUX.1-dev-shaped directory:
prompt encoding (bit-equal to ``encode_prompt``), 2x2 latent packing and image ids, the network call
(timestep = sigma, the per-role guidance embedding), the teacher's multi-step sampler (the pipeline's
dynamically shifted sigmas, with and without true CFG), the decode, and the loading errors."""

from __future__ import annotations

import shutil

import pytest
import torch

PROMPTS = ["a red circle", "photo of a dog"]
SEQ = 16  # T5 tokens of the tests (FLUX.1-dev: 512)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from sidscale.families.flux.tiny import write_tiny_flux_teacher

    return write_tiny_flux_teacher(tmp_path_factory.mktemp("flux") / "teacher", seed=0)


@pytest.fixture(scope="module")
def pipe(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_cfg(flux_dir, *extra):
    """flux_dev with the per-role guidance embedding (teacher 3.5, fake = teacher's, G 1.0), which these
    tests compare with FluxPipeline; the preset's official coupling is tests/families/test_flux_guidance.py's."""
    from sidscale.config import load_config

    return load_config("flux_dev", [f"teacher.path={flux_dir}", "teacher.dtype=fp32", "teacher.resolution=64",
                                    f"teacher.max_sequence_length={SEQ}", "distilled_guidance.mode=per_role",
                                    "distilled_guidance.teacher=3.5", *extra])


@pytest.fixture(scope="module")
def teacher(flux_dir):
    from sidscale.families import family_for_kind

    return family_for_kind("flux").load_teacher(flux_cfg(flux_dir), "cpu")


def test_conditioning_is_flux_pipeline_encode_prompt_bit_for_bit(teacher, pipe):
    long = "a red circle " * 10  # longer than 16 T5 tokens: truncated the same way
    prompts = [*PROMPTS, long]
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=SEQ)
        npe, npooled, _ = pipe.encode_prompt([""], None, max_sequence_length=SEQ)
    ids = teacher.conditioner.tokenize(prompts)
    assert ids.shape == (3, 77 + SEQ)
    cond = teacher.conditioner.encode_ids(ids)  # the trainer's path: ids from the data workers
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], pooled)
    assert pe.shape == (3, SEQ, 48) and pooled.shape == (3, 16)  # T5 states; CLIP-L pooled (no CLIP rows)
    empty = teacher.conditioner.empty(2)
    assert torch.equal(empty["encoder_hidden_states"][1], npe[0]) and torch.equal(empty["pooled_projections"][1],
                                                                                  npooled[0])
    assert torch.equal(text_ids, torch.zeros(SEQ, 3))  # what FluxVelocity passes as txt_ids


def test_packing_and_image_ids_are_diffusers(pipe):
    from diffusers import FluxPipeline

    from sidscale.families.flux.adapter import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 16, 6, 10)  # not square: a swapped row / column shows
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10)) and packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(latent_image_ids(3, 5, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even sides"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def test_velocity_is_the_transformer_call_with_each_roles_guidance(flux_dir, pipe):
    """timestep = sigma in [0, 1] (the pipeline passes t / 1000), packed latents and ids, and the guidance
    embedding of the role: teacher and fake their configured scales (fake null = teacher's), G 1.0."""
    from diffusers import FluxPipeline

    from sidscale.families import family_for_kind
    from sidscale.families.flux.adapter import FluxSchedule

    family = family_for_kind("flux")
    t = family.load_teacher(flux_cfg(flux_dir, "distilled_guidance.teacher=2.5",
                                     "distilled_guidance.generator=1.5"), "cpu")
    assert t.schedule.guidance == {"teacher": 2.5, "fake": 2.5, "generator": 1.5}  # fake null -> the teacher's
    t2 = family.load_teacher(flux_cfg(flux_dir, "distilled_guidance.fake=4.0"), "cpu")
    assert t2.schedule.guidance == {"teacher": 3.5, "fake": 4.0, "generator": 1.0}

    x, sigma = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8])
    cond = t.conditioner.encode(PROMPTS)

    def direct(g: float) -> torch.Tensor:
        out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 16, 8, 8), timestep=sigma,
                               guidance=torch.full((2,), g), pooled_projections=cond["pooled_projections"],
                               encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=torch.zeros(SEQ, 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                               return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, 64, 64, 8)

    with torch.no_grad():
        got = {r: family.prediction_fn(t.net, t.schedule, role=r)(x, sigma, cond) for r in ("teacher", "fake",
                                                                                                  "generator")}
        want = {g: direct(g) for g in (2.5, 1.5)}
    assert torch.equal(got["teacher"], want[2.5]) and torch.equal(got["fake"], want[2.5])
    assert torch.equal(got["generator"], want[1.5])
    assert (got["teacher"] - got["generator"]).abs().max() > 1e-3  # the embedding matters
    assert family.prediction_fn(t.net, t.schedule).guidance == 1.5  # default role: the generator (sampling)
    with pytest.raises(ValueError, match="role 'student'"):
        family.prediction_fn(t.net, t.schedule, role="student")
    with pytest.raises(TypeError, match="FluxSchedule"):
        family.prediction_fn(t.net, FluxSchedule.__mro__[1]())
    # the bench's teachers use FluxSchedule(): the distilled_guidance defaults of the config
    from sidscale.config import Config
    from sidscale.families.flux.adapter import guidance_from_config

    assert FluxSchedule().guidance == guidance_from_config(Config())


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_teacher_sampler_is_flux_pipeline(teacher, pipe, true_cfg):
    """FluxPipeline's own loop: linspace(1, 1/N, N) shifted by mu(image tokens), Euler steps, guidance
    embedding 3.5; with true CFG the negative prompt is "" (the conditioner's E(""))."""
    from diffusers import FluxPipeline

    from sidscale.families.flux.adapter import unpack_latents

    family = teacher.family
    x_T = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = teacher.conditioner.encode(PROMPTS), teacher.conditioner.empty(2)
    ours = family.teacher_sampler(teacher, cond, uncond, true_cfg, 3, x_T=x_T)
    extra = {}
    if true_cfg != 1.0:
        extra = dict(negative_prompt_embeds=uncond["encoder_hidden_states"],
                     negative_pooled_prompt_embeds=uncond["pooled_projections"], true_cfg_scale=true_cfg)
    with torch.no_grad():
        packed = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                      num_inference_steps=3, guidance_scale=3.5, height=64, width=64, output_type="latent",
                      latents=FluxPipeline._pack_latents(x_T, 2, 16, 8, 8), **extra).images
    torch.testing.assert_close(ours, unpack_latents(packed, 8, 8), rtol=1e-5, atol=1e-5)
    # the dynamic shift at 16 image tokens (mu = 0.5 + 0.65 * (16 - 256) / 3840), not the plain linspace
    sigmas = family.teacher_sigmas(teacher, 3)
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    import math

    want = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in (1.0, 2 / 3, 1 / 3)] + [0.0]
    assert sigmas == pytest.approx(want, abs=1e-6)


def test_decode_is_the_pipelines(teacher, pipe):
    from diffusers import FluxPipeline

    x0 = torch.randn(1, 16, 8, 8)
    ours = teacher.family.decode(teacher.vae, x0, teacher.scaling_factor, teacher.shift_factor)
    with torch.no_grad():
        # FluxPipeline's decode path for packed latents: unpack, / scaling + shift, VAE
        lat = FluxPipeline._unpack_latents(FluxPipeline._pack_latents(x0, 1, 16, 8, 8), 64, 64, 8)
        want = pipe.vae.decode(lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    assert torch.equal(ours, want) and ours.shape == (1, 3, 64, 64)
    assert (teacher.scaling_factor, teacher.shift_factor) == (pytest.approx(0.3611), pytest.approx(0.1159))


def test_flux_teacher_loads_with_clear_errors(flux_dir, teacher, tmp_path):
    from sidscale.config import ConfigError, load_config
    from sidscale.errors import TeacherDirError

    family = teacher.family
    assert teacher.latent_shape == (16, 8, 8) and not any(p.requires_grad for p in teacher.net.parameters())
    with pytest.raises(ConfigError, match="teacher.resolution = 72: must be a multiple of 16"):
        family.load_teacher(flux_cfg(flux_dir, "teacher.resolution=72"), "cpu")
    with pytest.raises(ConfigError, match="teacher.t5 = False: expected true for teacher.kind flux"):
        flux_cfg(flux_dir, "teacher.t5=false")
    with pytest.raises(ConfigError, match="teacher.max_sequence_length = 600: expected at most 512"):
        flux_cfg(flux_dir, "teacher.max_sequence_length=600")
    with pytest.raises(ConfigError, match="distilled_guidance.teacher = -1.0: expected a value >= 0"):
        flux_cfg(flux_dir, "distilled_guidance.teacher=-1")
    with pytest.raises(ConfigError, match="only kinds flux have a guidance embedding"):
        load_config("sd35_medium", ["distilled_guidance.generator=3.5"])
    for missing in ("text_encoder_2", "tokenizer", "transformer"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(flux_dir, broken)
        shutil.rmtree(broken / missing)
        with pytest.raises(TeacherDirError, match=f"missing {missing}/; a flux teacher directory must contain "
                                                  "transformer/, scheduler/, vae/, text_encoder/"):
            family.load_teacher(flux_cfg(broken), "cpu")
    with pytest.raises(TeacherDirError, match="not a directory \\(the preset's placeholder"):
        family.load_teacher(load_config("flux_dev"), "cpu")
