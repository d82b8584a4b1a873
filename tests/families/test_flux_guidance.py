"""FLUX guidance mode ``official`` (SiD-DiT's released FLUX code) against a loop written here from the
published formulas, on tiny FLUX.1-dev-shaped transformers: both losses and the generator's gradient.

The formulas (docs/flow_matching.md 1.2-1.5, 1.7): a FLUX net called at guidance scale ``s`` gets ``s`` as its
guidance embedding; for s in {0, 1} that single conditional call is the prediction, otherwise
``v(u) + s (v(c) - v(u))`` with both branches at embedding s. The fake update uses s = k1 on the fake net,
the generator update s = k2 on the fake net and s = k4 on the teacher; the generator always runs at
embedding 1 without CFG, step i at sigma_i = 1 - i/K, gradient through its last step only.
"""

from __future__ import annotations

import pytest
import torch

from sidscale.families.flux.adapter import FAMILY, FluxGuidedVelocity, FluxSchedule, FluxVelocity
from sidscale.method import MethodSettings, StepNoise, fake_step, generator_step

B, C, H, W, L, K = 2, 16, 4, 4, 5, 3
OFFICIAL = FluxSchedule(guidance={"teacher": None, "fake": None, "generator": 1.0}, mode="official")


def _net(seed: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    from sidscale.families.flux.tiny import tiny_flux_transformer_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FluxTransformer2DModel(**tiny_flux_transformer_config())
        # diffusers zero-initialises the output projections: give them weights so every input matters
        for p in net.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    return net


# ----------------------------------------------------------------------------- the published loop
def velocity(net, x, sigma, cond, g: float) -> torch.Tensor:
    """The released code's network call: packed latents, timestep = sigma, guidance embedding g."""
    from diffusers import FluxPipeline

    b = x.shape[0]
    out = net(hidden_states=FluxPipeline._pack_latents(x, b, C, H, W), timestep=sigma,
              guidance=torch.full((b,), float(g)), pooled_projections=cond["pooled_projections"],
              encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=torch.zeros(L, 3),
              img_ids=FluxPipeline._prepare_latent_image_ids(b, H // 2, W // 2, "cpu", torch.float32),
              return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, H * 8, W * 8, 8)


def denoise_velocity(net, x_t, sigma, cond, uncond, s: float) -> torch.Tensor:
    if s in (0.0, 1.0):
        return velocity(net, x_t, sigma, cond, s)
    v_u, v_c = velocity(net, x_t, sigma, uncond, s), velocity(net, x_t, sigma, cond, s)  # two separate calls
    return v_u + s * (v_c - v_u)


def generate(gen, noises, cond, k: int) -> torch.Tensor:
    x0 = torch.zeros_like(noises[0])
    for i in range(k):
        sigma = torch.full((B,), 1 - i / K)
        x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noises[i]
        with torch.set_grad_enabled(torch.is_grad_enabled() and i == k - 1):
            x0 = x - sigma.view(-1, 1, 1, 1) * velocity(gen, x, sigma, cond, 1.0)
    return x0


def published_losses(gen, fake, teacher, noise, cond, uncond, k1, k2, k4, k):
    s = noise.t.view(-1, 1, 1, 1)
    noises = [noise.z] + [noise.z_more[:, i] for i in range(K - 1)]
    with torch.no_grad():
        x_g = generate(gen, noises, cond, k)
    x_t = (1 - s) * x_g + s * noise.eps
    loss_fake = (denoise_velocity(fake, x_t, noise.t, cond, uncond, k1) - (noise.eps - x_g)).square().sum() / B

    x_g = generate(gen, noises, cond, k)
    x_t = (1 - s) * x_g + s * noise.eps
    y_fake = x_t - s * denoise_velocity(fake, x_t, noise.t, cond, uncond, k2)
    y_real = x_t - s * denoise_velocity(teacher, x_t, noise.t, cond, uncond, k4)
    loss_gen = ((y_real - y_fake) * (y_fake - x_g) * (1 - s)).sum() * 100.0 / B  # alpha = 1
    return loss_fake, loss_gen


# ----------------------------------------------------------------------------- the comparison
def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    noise = StepNoise(z=r(B, C, H, W), eps=r(B, C, H, W), t=torch.tensor([0.3, 0.8]),
                      drop=torch.zeros(B, dtype=torch.bool), z_more=r(B, K - 1, C, H, W))
    cond = {"encoder_hidden_states": r(B, L, 48), "pooled_projections": r(B, 16)}
    uncond = {"encoder_hidden_states": r(B, L, 48), "pooled_projections": r(B, 16)}
    return noise, cond, uncond


@pytest.mark.parametrize("k1, k2, k4", [(2.5, 4.0, 3.0), (1.0, 0.0, 1.0)], ids=["true-cfg", "scales-1-and-0"])
def test_official_mode_equals_the_published_formulas(k1, k2, k4):
    gen, fake, teacher = _net(1), _net(2).requires_grad_(False), _net(3).requires_grad_(False)
    noise, cond, uncond = _inputs(7)
    settings = MethodSettings(cfg_train_fake=k1, cfg_eval_fake=k2, cfg_eval_real=k4, alpha=1.0, prompt_dropout=0.0,
                              gen_loss_scale=100.0, generator_steps=K, gen_weighting="one_minus_sigma")
    k = 2  # of K = 3: one step without gradient, then the step with it

    fns = {r: FAMILY.prediction_fn(n, OFFICIAL, role=r)
           for r, n in (("generator", gen), ("fake", fake), ("teacher", teacher))}
    assert isinstance(fns["fake"], FluxGuidedVelocity) and isinstance(fns["teacher"], FluxGuidedVelocity)
    assert type(fns["generator"]) is FluxVelocity and fns["generator"].guidance == 1.0
    loss_fake, _ = fake_step(fns["generator"], fns["fake"], OFFICIAL, noise, cond, uncond, settings, B, k=k)
    loss_gen, _ = generator_step(fns["generator"], fns["fake"], fns["teacher"], OFFICIAL, noise, cond, uncond,
                                 settings, B, k=k)
    ours = torch.autograd.grad(loss_gen, list(gen.parameters()), allow_unused=True)

    want_fake, want_gen = published_losses(gen, fake, teacher, noise, cond, uncond, k1, k2, k4, k)
    want = torch.autograd.grad(want_gen, list(gen.parameters()), allow_unused=True)

    torch.testing.assert_close(loss_fake, want_fake, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_gen, want_gen, rtol=1e-5, atol=1e-5)
    assert abs(float(want_gen.detach())) > 1e-3  # teacher != fake: a loss that can tell scales apart
    used = [(a, b) for a, b in zip(ours, want, strict=True) if b is not None]
    assert used and all(a is not None for a, _ in used)
    norm = torch.sqrt(sum(b.square().sum() for _, b in used))
    assert norm > 0
    for a, b in used:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(norm))


def test_official_mode_differs_from_per_role_at_the_same_scales():
    """The coupling matters: per_role at embedding 3.5 with the same cfg_* scales is another loss."""
    gen, fake, teacher = _net(1), _net(2).requires_grad_(False), _net(3).requires_grad_(False)
    noise, cond, uncond = _inputs(7)
    settings = MethodSettings(cfg_train_fake=2.5, cfg_eval_fake=4.0, cfg_eval_real=3.0, prompt_dropout=0.0,
                              generator_steps=K, gen_weighting="one_minus_sigma")
    per_role = FluxSchedule(guidance={"teacher": 3.5, "fake": 3.5, "generator": 1.0})
    losses = []
    for schedule in (OFFICIAL, per_role):
        fns = [FAMILY.prediction_fn(n, schedule, role=r) for r, n in
               (("generator", gen), ("fake", fake), ("teacher", teacher))]
        losses.append(generator_step(*fns, schedule, noise, cond, uncond, settings, B, k=1)[0].detach())
    assert not torch.allclose(losses[0], losses[1], rtol=1e-3)


def test_official_net_refuses_a_bare_call_and_the_schedule_checks_its_roles():
    fn = FAMILY.prediction_fn(_net(1), OFFICIAL, role="teacher")
    noise, cond, _ = _inputs(0)
    with pytest.raises(RuntimeError, match="through guided_eps"):
        fn(noise.z, noise.t, cond)
    with pytest.raises(ValueError, match=r"guidance\['teacher'\] = 3.5 in mode official"):
        FluxSchedule(guidance={"teacher": 3.5, "fake": None, "generator": 1.0}, mode="official")
    with pytest.raises(ValueError, match="mode 'cfg'"):
        FluxSchedule(mode="cfg")
    meta = OFFICIAL.meta("x")
    assert meta["guidance_mode"] == "official"
    assert FAMILY.schedule_from_meta({"schedule": meta}, "here") == OFFICIAL
    # an export written before the mode existed reads as per_role
    old = {"schedule": {"distilled_guidance": {"teacher": 3.5, "fake": 3.5, "generator": 1.0}}}
    assert FAMILY.schedule_from_meta(old, "here").mode == "per_role"


def test_config_mode_official_refuses_per_role_embeddings():
    from sidscale.config import ConfigError, load_config

    cfg = load_config("flux_dev", [])
    assert cfg.distilled_guidance.mode == "official"
    with pytest.raises(ConfigError, match="distilled_guidance"):
        load_config("flux_dev", ["distilled_guidance.teacher=2.0"])
    with pytest.raises(ConfigError, match="distilled_guidance.mode"):
        load_config("flux_dev", ["distilled_guidance.mode=both"])
    assert load_config("flux_dev", ["distilled_guidance.mode=per_role", "distilled_guidance.teacher=2.0"])
