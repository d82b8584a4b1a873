"""SiD on a rectified-flow teacher (SiD-DiT) and K-step generators, against independent
computations: the losses and generator gradient written out from docs/flow_matching.md 1.2-1.5 in
plain torch on tiny linear velocity nets (float64), the K-step schedule and its gradient through
step k only, the logit-normal loss sigmas against their closed form, and the noise layout."""

import math

import pytest
import torch

from sidscale.core.noise import draw_step_noise, generator_step_count, uniform_timesteps
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.method import MethodSettings, StepNoise, fake_step, generate, generator_step

C, H, W = 2, 2, 2
D = C * H * W
B = 4


class LinearVelocity(torch.nn.Module):
    """v(x, sigma, c) = W x + U mean_tokens(c) + sigma b: linear in x, depends on sigma and c."""

    def __init__(self, seed: int, scale: float = 0.2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(scale * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.U = torch.nn.Parameter(scale * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(scale * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x, sigma, cond):
        c = cond["encoder_hidden_states"].mean(1)
        out = x.flatten(1) @ self.W.T + c @ self.U.T + sigma.reshape(-1, 1).to(x.dtype) * self.b
        return out.view(x.shape)


def make_inputs(seed=0, k_extra=0):
    g = torch.Generator().manual_seed(seed)
    noise = StepNoise(
        z=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
        eps=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
        t=torch.tensor([0.05, 0.3, 0.66, 0.97], dtype=torch.float64),
        drop=torch.zeros(B, dtype=torch.bool),
        z_more=torch.randn(B, k_extra, C, H, W, generator=g, dtype=torch.float64) if k_extra else None,
    )
    cond = {"encoder_hidden_states": torch.randn(B, 3, D, generator=g, dtype=torch.float64)}
    uncond = {"encoder_hidden_states": torch.randn(1, 3, D, generator=g, dtype=torch.float64).expand(B, -1, -1)}
    return noise, cond, uncond


# ---------------------------------------------------------------- independent formulas (doc 1.2-1.5)
def ref_generate(net, noises, cond, K, k, detach_before_last=True):
    """sigma_i = 1 - i/K, x_i = (1 - sigma_i) x0_{i-1} + sigma_i eps_i (x0_{-1} = 0), x0_i = x_i - sigma_i v."""
    x0 = torch.zeros_like(noises[0])
    for i in range(k):
        s = torch.full((B,), 1 - i / K, dtype=torch.float64)
        x = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noises[i]
        x0 = x - s.view(-1, 1, 1, 1) * net(x, s, cond)
        if detach_before_last and i < k - 1:
            x0 = x0.detach()
    return x0


def ref_x0_cfg(net, x_t, s, cond, uncond, kappa):
    v_u, v_c = net(x_t, s, uncond), net(x_t, s, cond)
    return x_t - s.view(-1, 1, 1, 1) * (v_u + kappa * (v_c - v_u))


def ref_generator_loss(gen, fake, teacher, noise, cond, uncond, K, k, k2, k4, alpha, weighting, lsg):
    x_g = ref_generate(gen, [noise.z] + [noise.z_more[:, i] for i in range(k - 1)], cond, K, k)
    s = noise.t.view(-1, 1, 1, 1)
    x_t = (1 - s) * x_g + s * noise.eps
    y_real = ref_x0_cfg(teacher, x_t, noise.t, cond, uncond, k4)
    y_fake = ref_x0_cfg(fake, x_t, noise.t, cond, uncond, k2)
    if weighting == "one_minus_sigma":
        w = 1 - s
    else:
        w = 1 / (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach().clamp_min(1e-5)
    return ((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) * w).sum() * lsg / B


def nets():
    gen, fake, teacher = LinearVelocity(1), LinearVelocity(2), LinearVelocity(3)
    for n in (fake, teacher):
        n.requires_grad_(False)
    return gen, fake, teacher


@pytest.mark.parametrize("weighting", ["one_minus_sigma", "sid_legacy"])
@pytest.mark.parametrize("K,k", [(1, 1), (4, 3)])
def test_flow_generator_loss_and_gradient_match_the_formulas(weighting, K, k):
    gen, fake, teacher = nets()
    noise, cond, uncond = make_inputs(k_extra=K - 1)
    settings = MethodSettings(cfg_eval_fake=1.7, cfg_eval_real=2.5, alpha=1.2, generator_steps=K,
                              gen_weighting=weighting, gen_loss_scale=100.0)
    loss, stats = generator_step(gen, fake, teacher, FlowSchedule(), noise, cond, uncond, settings,
                                 loss_normaliser=B, k=k)
    grads = torch.autograd.grad(loss, list(gen.parameters()))
    want = ref_generator_loss(gen, fake, teacher, noise, cond, uncond, K, k, 1.7, 2.5, 1.2, weighting, 100.0)
    want_grads = torch.autograd.grad(want, list(gen.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)
    if weighting == "one_minus_sigma":
        torch.testing.assert_close(stats["w_mean"], (1 - noise.t).mean())


def test_flow_gradient_goes_through_teacher_and_fake():
    """Detaching y_real or y_fake (a DMD-like shortcut) gives another gradient: the test would see it."""
    gen, fake, teacher = nets()
    noise, cond, uncond = make_inputs()
    settings = MethodSettings(cfg_eval_fake=1.5, cfg_eval_real=1.5, gen_weighting="one_minus_sigma")
    loss, _ = generator_step(gen, fake, teacher, FlowSchedule(), noise, cond, uncond, settings, loss_normaliser=B)
    g_full = torch.autograd.grad(loss, [gen.W])[0]
    for frozen in (teacher, fake):
        detached = _Detached(frozen)
        args = (detached, teacher) if frozen is fake else (fake, detached)
        loss2, _ = generator_step(gen, *args, FlowSchedule(), noise, cond, uncond, settings, loss_normaliser=B)
        g2 = torch.autograd.grad(loss2, [gen.W])[0]
        assert (g2 - g_full).abs().max() > 1e-6 * g_full.abs().max()


class _Detached(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, s, c):
        return self.net(x.detach(), s, c)


def test_flow_fake_loss_is_the_velocity_mse():
    gen, fake, _ = nets()
    fake.requires_grad_(True)
    noise, cond, uncond = make_inputs(k_extra=1)
    settings = MethodSettings(cfg_train_fake=2.0, prompt_dropout=0.0, generator_steps=2, fake_loss_scale=1.0)
    loss, _ = fake_step(gen, fake, FlowSchedule(), noise, cond, uncond, settings, loss_normaliser=B, k=2)
    with torch.no_grad():
        x_g = ref_generate(gen, [noise.z, noise.z_more[:, 0]], cond, 2, 2)
    s = noise.t.view(-1, 1, 1, 1)
    x_t = (1 - s) * x_g + s * noise.eps
    v_u, v_c = fake(x_t, noise.t, uncond), fake(x_t, noise.t, cond)
    want = ((v_u + 2.0 * (v_c - v_u)) - (noise.eps - x_g)).square().sum() / B
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g, gw = (torch.autograd.grad(x, [fake.W])[0] for x in (loss, want))
    torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-12)


def test_k_step_generator_gradient_flows_through_the_last_step_only():
    gen = LinearVelocity(4)
    noise, cond, _ = make_inputs(k_extra=3)
    noises = [noise.z] + [noise.z_more[:, i] for i in range(3)]
    levels = FlowSchedule().generator_levels(MethodSettings(sigma_init=1.0), 4)
    assert levels == [1.0, 0.75, 0.5, 0.25]
    x = generate(gen, FlowSchedule(), noises, cond, levels)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    g = torch.autograd.grad((x * probe).sum(), [gen.W])[0]
    want = ref_generate(gen, noises, cond, 4, 4, detach_before_last=True)
    torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, torch.autograd.grad((want * probe).sum(), [gen.W])[0])
    through_all = ref_generate(gen, noises, cond, 4, 4, detach_before_last=False)
    g_all = torch.autograd.grad((through_all * probe).sum(), [gen.W])[0]
    assert (g_all - g).abs().max() > 1e-3 * g.abs().max()  # the shortcut is really different
    with torch.no_grad():  # an outer no_grad is respected (the fake step's sampling)
        assert not generate(gen, FlowSchedule(), noises, cond, levels).requires_grad


def test_vp_k_step_levels_and_steps():
    """VP: t_i = int(t_init (1 - i/K)) (SiD-LSG's truncation) and x_i = add_noise(x0_{i-1}, eps_i, t_i)."""
    vp = VPSchedule.from_settings()
    vp = VPSchedule(vp.alphas_cumprod.double(), "epsilon")
    assert vp.generator_levels(MethodSettings(t_init=625), 4) == [625, 468, 312, 156]
    assert vp.generator_levels(MethodSettings(t_init=625), 1) == [625]
    eps_net = LinearVelocity(5)  # read as an eps net here
    noise, cond, _ = make_inputs(k_extra=1)
    got = generate(eps_net, vp, [noise.z, noise.z_more[:, 0]], cond, [625, 312])
    abar = vp.alphas_cumprod
    x0 = None
    for i, (t, e) in enumerate(((625, noise.z), (312, noise.z_more[:, 0]))):
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        x = s * e if i == 0 else a * x0 + s * e
        x0 = (x - s * eps_net(x, torch.full((B,), t), cond)) / a
    torch.testing.assert_close(got, x0, rtol=1e-12, atol=1e-12)


def test_loss_sigmas_are_logit_normal():
    settings = MethodSettings()  # SiD-DiT: sigmoid(N(ln 2, 1.6^2))
    g = torch.Generator().manual_seed(0)
    sig = torch.cat([FlowSchedule().draw_loss_level(settings, g) for _ in range(20000)]).double()
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    for q in (0.25, 2 / 3, 0.9):
        want = phi((math.log(q / (1 - q)) - math.log(2)) / 1.6)
        # 5 binomial standard deviations
        assert abs((sig < q).double().mean().item() - want) < 5 * math.sqrt(want * (1 - want) / sig.numel())


def test_k_step_noise_keeps_the_one_step_draws_and_k_is_uniform():
    draw = uniform_timesteps(20, 980)
    one = draw_step_noise(3, 7, 1, range(5), (2, 3, 3), draw, 0.1)
    four = draw_step_noise(3, 7, 1, range(5), (2, 3, 3), draw, 0.1, generator_steps=4)
    for f in ("z", "eps", "t", "drop"):
        assert torch.equal(getattr(one, f), getattr(four, f)), f
    assert one.z_more is None and four.z_more.shape == (5, 3, 2, 3, 3)
    assert not torch.equal(four.z_more[:, 0], four.z) and not torch.equal(four.z_more[:, 0], four.z_more[:, 1])
    ks = torch.tensor([generator_step_count(0, s, 4) for s in range(4000)])
    assert set(ks.tolist()) == {1, 2, 3, 4} and generator_step_count(0, 17, 1) == 1
    counts = torch.bincount(ks)[1:].double()
    assert (counts - 1000).abs().max() < 5 * math.sqrt(4000 * 0.25 * 0.75)
    assert generator_step_count(0, 11, 4) == generator_step_count(0, 11, 4)  # a pure function of (seed, step)
