"""The data-aided adversarial method (method/adversarial.py) against independent computations.

The references here are written from the published formulas: logits read with a forward PRE-hook on
the module that follows the read-out point (the UNet's mid block, the transformers' proj_out), the
binary cross-entropy from ``F.binary_cross_entropy_with_logits``, lambda from its definition, the real
sample noised by hand. The networks are the toy family's tiny diffusers UNet (VP and flow).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from sidscale.core.noise import StepNoise
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.families.shared.readout import transformer_readout, unet_readout
from sidscale.families.toy.adapter import UNetVelocity
from sidscale.families.unet_vp.adapter import UNetEps
from sidscale.families.unet_vp.tiny import build_tiny_unet
from sidscale.method.adversarial import (
    adversarial_fake_step,
    adversarial_generator_step,
    adversarial_mix,
    disc_loss_per_sample,
    generator_active,
)
from sidscale.method.base import Batch, PredictionFns
from sidscale.method.sid import SiD
from sidscale.method.sid_lsg import MethodSettings, fake_step, generator_step

B, C, RES = 3, 3, 8
CHW = C * RES * RES


def adv_settings(**kw):
    return types.SimpleNamespace(**{"enabled": True, "disc_scale": 1.0, "gen_scale": 1.0, "disc_warmup_kimg": 20.0,
                                    "mix_after_kimg": 40.0, "mix_weight": 0.5, "logit_clamp": 10.0, **kw})


def settings(flow: bool, **kw) -> MethodSettings:
    base = {"cfg_train_fake": 1.5, "cfg_eval_fake": 1.5, "cfg_eval_real": 2.0, "prompt_dropout": 0.0,
            "gen_weighting": "one_minus_sigma" if flow else "sid_legacy", "adversarial": adv_settings()}
    return MethodSettings(**{**base, **kw})


def nets(flow: bool):
    """generator, fake, teacher: three different tiny UNets (in_channels 3, 8 px), wrapped as the family does."""
    schedule = FlowSchedule() if flow else VPSchedule.from_settings()
    wrap = (lambda n: UNetVelocity(n)) if flow else (lambda n: UNetEps(n, schedule))
    raw = [build_tiny_unet(seed, sample_size=RES) for seed in (1, 2, 3)]
    return raw, [wrap(n) for n in raw], schedule


def inputs(flow: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.2, 0.55, 0.9]) if flow else torch.tensor([50, 400, 900])
    noise = StepNoise(z=torch.randn(B, C, RES, RES, generator=g), eps=torch.randn(B, C, RES, RES, generator=g),
                      t=t, drop=torch.zeros(B, dtype=torch.bool))
    cond = {"encoder_hidden_states": torch.randn(B, 4, 32, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(1, 4, 32, generator=g).expand(B, -1, -1)}
    real_x = torch.randn(B, C, RES, RES, generator=g).clamp(-1, 1)
    real_cond = {"encoder_hidden_states": torch.randn(B, 4, 32, generator=g)}
    return noise, cond, uncond, real_x, real_cond


class PreHookLogits:
    """Reference read-out: the INPUT of the UNet's mid block (= the last down block's output), channel mean."""

    def __init__(self, unet):
        self.seen = []
        self.handle = unet.mid_block.register_forward_pre_hook(
            lambda m, args: self.seen.append(args[0].float().mean(1).flatten(1)))

    def close(self):
        self.handle.remove()


def bce(logits, label):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(label)), reduction="none")


def x_t_by_hand(schedule, x0, eps, t, flow):
    if flow:
        s = t.view(-1, 1, 1, 1).float()
        return (1 - s) * x0 + s * eps
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def test_schedule_in_images_seen_is_strictly_after_each_threshold():
    adv = adv_settings(disc_warmup_kimg=20.0, mix_after_kimg=40.0, mix_weight=0.5)
    assert not generator_active(adv, 0) and not generator_active(adv, 20_000) and generator_active(adv, 20_001)
    assert adversarial_mix(adv, 40_000) == 0.0 and adversarial_mix(adv, 40_001) == 0.5


def test_disc_loss_is_the_bce_of_real_and_generated_with_clamp():
    g = torch.Generator().manual_seed(0)
    l_real, l_fake = 4 * torch.randn(B, 16, generator=g), 4 * torch.randn(B, 16, generator=g)
    l_real[0, 0], l_fake[1, 3] = 25.0, -30.0  # outside the clamp: read as +-10
    want = CHW * 0.5 * (bce(l_real.clamp(-10, 10), 1).mean(1) + bce(l_fake.clamp(-10, 10), 0).mean(1))
    torch.testing.assert_close(disc_loss_per_sample(l_real, l_fake, 10.0, CHW), want)
    lr = l_real.clone().requires_grad_()
    disc_loss_per_sample(lr, l_fake, 10.0, CHW).sum().backward()
    assert lr.grad[0, 0] == 0 and (lr.grad[0, 1:] != 0).all()  # clamped logit: no gradient


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_fake_phase_is_dsm_plus_disc_bce_on_same_noise(flow):
    raw, (gen, fake, _), schedule = nets(flow)
    s = settings(flow)
    noise, cond, uncond, real_x, real_cond = inputs(flow)
    loss, stats = adversarial_fake_step(gen, fake, unet_readout(raw[1]), schedule, noise, cond, uncond,
                                        real_x, real_cond, s, loss_normaliser=B)
    loss.backward()
    got = {n: p.grad.clone() for n, p in raw[1].named_parameters()}
    raw[1].zero_grad(set_to_none=True)
    # reference: the DSM loss (its own tests check it) with the generated logits read in the same call (a CFG
    # batch [uncond; cond]: its conditional half), the real sample noised by hand with the same eps and t
    hook = PreHookLogits(raw[1])
    try:
        dsm, _ = fake_step(gen, fake, schedule, noise, cond, uncond, s, loss_normaliser=B)
        fake(x_t_by_hand(schedule, real_x, noise.eps, noise.t, flow), noise.t, real_cond)
    finally:
        hook.close()
    l_fake, l_real = hook.seen[0][B:], hook.seen[1]
    disc = CHW * 0.5 * (bce(l_real, 1).mean(1) + bce(l_fake, 0).mean(1))
    want = dsm + disc.sum() / B
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["loss_disc"], disc.sum().detach() / B, rtol=1e-5, atol=1e-5)
    assert stats["disc_real_acc"] == (l_real.mean(1) > 0).float().mean()
    want.backward()
    scale = max(g.abs().max() for g in got.values())
    for n, p in raw[1].named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-5 * scale)


def test_disc_term_trains_the_fake_nets_encoder_only():
    """With the DSM weight at 0, only the read-out's ancestors (down path, embeddings) get gradient:
    the mid block, up path and conv_out do not (the discriminator is the encoder's features)."""
    raw, (gen, fake, _), schedule = nets(False)
    s = settings(False, fake_loss_scale=0.0)
    noise, cond, uncond, real_x, real_cond = inputs(False)
    loss, _ = adversarial_fake_step(gen, fake, unet_readout(raw[1]), schedule, noise, cond, uncond,
                                    real_x, real_cond, s, loss_normaliser=B)
    loss.backward()
    grads = {n: p.grad for n, p in raw[1].named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("down_blocks.1."))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items()
               if n.startswith(("mid_block.", "up_blocks.", "conv_out.")))


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_generator_phase_mixes_sid_and_lambda_weighted_nonsaturating_loss(flow, mix):
    raw, (gen, fake, teacher), schedule = nets(flow)
    s = settings(flow, gen_loss_scale=3.0, adversarial=adv_settings(gen_scale=0.7))
    noise, cond, uncond, *_ = inputs(flow, seed=1)
    for p in [*raw[1].parameters(), *raw[2].parameters()]:
        p.requires_grad_(False)
    loss, stats = adversarial_generator_step(gen, fake, teacher, unet_readout(raw[1]), schedule, noise, cond,
                                             uncond, s, loss_normaliser=B, mix=mix)
    loss.backward()
    got = {n: p.grad.clone() for n, p in raw[0].named_parameters()}
    raw[0].zero_grad(set_to_none=True)

    ref_hook = PreHookLogits(raw[1])
    try:
        sid_loss, _ = generator_step(gen, fake, teacher, schedule, noise, cond, uncond, s, loss_normaliser=B)
    finally:
        ref_hook.close()
    l_gen = ref_hook.seen[0][B:]  # CFG batch [uncond; cond]: the conditional half
    with torch.no_grad():  # lambda from its definition: 1 - sigma (flow) or 1 / mean|x_g - y_real| (sid_legacy)
        if flow:
            lam = 1 - noise.t
        else:
            from sidscale.method.guidance import guided_eps
            from sidscale.method.sid_lsg import _generator_output

            x_g = _generator_output(gen, schedule, noise, cond, s, 1)
            x_t = x_t_by_hand(schedule, x_g, noise.eps, noise.t, False)
            y_real = schedule.to_x0(x_t, guided_eps(teacher, x_t, noise.t, cond, uncond, 2.0), noise.t)
            lam = 1 / (x_g - y_real).abs().flatten(1).mean(1)
    adv = 0.7 * (lam * CHW * bce(l_gen, 1).mean(1)).sum() / B
    want = sid_loss if mix == 0.0 else (1 - mix) * sid_loss + mix * adv
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["loss_gen_adv"], adv.detach(), rtol=1e-5, atol=1e-5)
    want.backward()
    # fp32 networks (the wrappers return fp32): tolerance relative to the gradient's own scale
    scale = max(g.abs().max() for g in got.values())
    for n, p in raw[0].named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-5 * scale)
    assert all(p.grad is None for p in raw[1].parameters())  # the fake net stays frozen in this phase


def test_transformer_readout_is_the_norm_out_token_mean():
    from diffusers import SD3Transformer2DModel

    from sidscale.families.sd3.tiny import tiny_sd3_transformer_config

    torch.manual_seed(0)
    net = SD3Transformer2DModel(**tiny_sd3_transformer_config())
    cfg = net.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, cfg.joint_attention_dim),
              "pooled_projections": torch.randn(2, cfg.pooled_projection_dim), "timestep": torch.tensor([300.0, 800.0])}
    seen = []
    handle = net.proj_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].mean(1)))
    try:
        _, logits = transformer_readout(net).logits(lambda: net(x, **kwargs).sample, 2)
    finally:
        handle.remove()
    assert logits.shape == (2, cfg.num_attention_heads * cfg.attention_head_dim)
    torch.testing.assert_close(logits, seen[0])


def test_sid_method_declares_real_data_and_the_warmup():
    s = settings(False)
    method = SiD(s, types.SimpleNamespace(global_batch=8, ema_halflife_kimg=1.0, ema_rampup_ratio=0.0), ema=None)
    fake_phase, gen_phase = method.phases
    assert fake_phase.real_data and not gen_phase.real_data
    assert not gen_phase.active(20_000) and gen_phase.active(20_008)
    plain = SiD(settings(False, adversarial=adv_settings(enabled=False)), None, ema=None)
    assert not plain.phases[0].real_data and plain.phases[1].active is None
    assert "loss_disc" not in plain.phases[0].stat_reduce


def test_method_runs_through_prediction_fns():
    """SiD's adversarial losses read the batch's real pair and the fns' read-out (what the trainer passes)."""
    raw, (gen, fake, teacher), schedule = nets(True)
    s = settings(True)
    method = SiD(s, None, ema=None)
    method.begin_step(50_000)
    noise, cond, uncond, real_x, real_cond = inputs(True)
    fns = PredictionFns(gen, gen, fake, fake, teacher, schedule, fake_readout=unet_readout(raw[1]))
    loss, stats = method.phases[0].loss(fns, Batch(noise, cond, uncond, (real_x, real_cond)), 1, B)
    assert set(stats) == set(method.phases[0].stat_reduce)
    loss, stats = method.phases[1].loss(fns, Batch(noise, cond, uncond), 1, B)
    assert stats["adv_mix"] == 0.5 and set(stats) == set(method.phases[1].stat_reduce)


def test_real_call_passes_the_fake_scale_to_a_net_that_takes_guidance_as_input():
    """FLUX's official mode takes its guidance embedding from the call: the real sample's conditional call
    gets cfg_train_fake through ``conditional`` (a plain net is called without any scale)."""
    from sidscale.method.adversarial import conditional_call

    raw, (_, fake, _), schedule = nets(True)
    scales = []

    class EmbeddingNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fake

        def forward(self, x, t, c):
            return self.inner(x, t, c)

        def conditional(self, x, t, c, scale):
            scales.append(scale)
            return self.inner(x, t, c)

    noise, cond, *_ = inputs(True)
    with torch.no_grad():
        got = conditional_call(EmbeddingNet(), noise.z, noise.t, cond, 4.5)
        torch.testing.assert_close(got, fake(noise.z, noise.t, cond))
    assert scales == [4.5]
