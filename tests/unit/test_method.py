"""SiD-LSG core against independent computations: hand-derived gradients on linear nets,
two-call CFG, closed-form losses, dropout rate, NaN guards, noise layout, EMA."""

import math

import pytest
import torch

from sidscale.core.ema import ema_beta, update_ema_
from sidscale.core.noise import draw_step_noise, rank_sample_indices, uniform_timesteps
from sidscale.core.schedule import VPSchedule
from sidscale.method import MethodSettings, StepNoise, fake_step, generator_step, guided_eps
from sidscale.method.guards import sanitize_grad, sanitize_grads_
from sidscale.method.sid_lsg import apply_prompt_dropout

C, H, W = 2, 2, 2
D = C * H * W
B = 4


class LinearEps(torch.nn.Module):
    """eps(x, t, c) = W x + U mean_tokens(c): linear, so its SiD gradient has a closed form."""

    def __init__(self, seed: int, scale: float = 0.2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(scale * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.U = torch.nn.Parameter(scale * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        c = cond["encoder_hidden_states"].mean(1)
        return (x.flatten(1) @ self.W.T + c @ self.U.T).view(x.shape)


@pytest.fixture(scope="module")
def schedule():
    s = VPSchedule.from_settings()
    return VPSchedule(s.alphas_cumprod.double(), "epsilon")


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = StepNoise(
        z=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
        eps=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
        t=torch.tensor([20, 300, 625, 979]),
        drop=torch.zeros(B, dtype=torch.bool),
    )
    cond = {"encoder_hidden_states": torch.randn(B, 3, D, generator=g, dtype=torch.float64)}
    empty = torch.randn(1, 3, D, generator=g, dtype=torch.float64)
    uncond = {"encoder_hidden_states": empty.expand(B, -1, -1)}
    return noise, cond, uncond


def hand_gradient(gen, fake, teacher, schedule, noise, cond, uncond, k2, k4, alpha, t_init, norm):
    """dL/dW_G and dL/dU_G derived by hand for linear eps-nets (see docs/method.md 4):
    y = (x_t - s (W x_t + U c_k)) / a  =>  dy/dx_g = I - s W;
    dL/dx_g = (1/w)[(Mr-Mf)^T E + (Mr - I - alpha(Mr-Mf))^T Dv]
    with Dv = y_r - y_f, E = (y_r - x_g) - alpha Dv, and x_g = (x_in - s0 (W_G x_in + U_G c)) / a0."""
    abar = schedule.alphas_cumprod
    a0, s0 = abar[t_init].sqrt(), (1 - abar[t_init]).sqrt()
    eye = torch.eye(D, dtype=torch.float64)
    gW = torch.zeros(D, D, dtype=torch.float64)
    gU = torch.zeros(D, D, dtype=torch.float64)
    with torch.no_grad():
        for i in range(B):
            c = cond["encoder_hidden_states"][i].mean(0)
            cu = uncond["encoder_hidden_states"][i].mean(0)
            x_in = s0 * noise.z[i].flatten()
            x_g = (x_in - s0 * (gen.W @ x_in + gen.U @ c)) / a0
            a, s = abar[noise.t[i]].sqrt(), (1 - abar[noise.t[i]]).sqrt()
            x_t = a * x_g + s * noise.eps[i].flatten()

            def y(net, k, x_t=x_t, a=a, s=s, c=c, cu=cu):
                return (x_t - s * (net.W @ x_t + net.U @ (cu + k * (c - cu)))) / a

            y_r, y_f = y(teacher, k4), y(fake, k2)
            Mr, Mf = eye - s * teacher.W, eye - s * fake.W
            w = (x_g - y_r).abs().mean().clamp_min(1e-5)
            Dv = y_r - y_f
            E = (y_r - x_g) - alpha * Dv
            g = ((Mr - Mf).T @ E + (Mr - eye - alpha * (Mr - Mf)).T @ Dv) / w
            gW += -(s0 / a0) * torch.outer(g, x_in)
            gU += -(s0 / a0) * torch.outer(g, c)
    return gW / norm, gU / norm


@pytest.mark.parametrize("alpha, k2, k4", [(1.0, 1.5, 1.5), (1.2, 1.0, 3.0), (0.5, 2.0, 1.0)])
def test_generator_gradient_matches_hand_derivation(schedule, alpha, k2, k4):
    gen, fake, teacher = LinearEps(1), LinearEps(2), LinearEps(3)
    fake.requires_grad_(False)
    teacher.requires_grad_(False)
    noise, cond, uncond = make_inputs()
    settings = MethodSettings(cfg_eval_fake=k2, cfg_eval_real=k4, alpha=alpha)
    loss, _ = generator_step(gen, fake, teacher, schedule, noise, cond, uncond, settings, loss_normaliser=B)
    loss.backward()
    gW, gU = hand_gradient(gen, fake, teacher, schedule, noise, cond, uncond, k2, k4, alpha, 625, B)
    torch.testing.assert_close(gen.W.grad, gW, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gen.U.grad, gU, rtol=1e-9, atol=1e-12)


class DetachedEps(torch.nn.Module):
    """The WRONG (DMD-like) evaluation: the net's output does not depend on x_t in autograd."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond):
        with torch.no_grad():
            return self.net(x, t, cond)


def test_detached_teacher_or_fake_is_caught(schedule):
    """The hand-derived check must discriminate: detaching either net changes the gradient."""
    noise, cond, uncond = make_inputs(1)
    settings = MethodSettings()
    teacher, fake = LinearEps(3).requires_grad_(False), LinearEps(2).requires_grad_(False)
    ref = None
    for wrap_teacher, wrap_fake in [(False, False), (True, False), (False, True)]:
        gen = LinearEps(1)
        t_net = DetachedEps(teacher) if wrap_teacher else teacher
        f_net = DetachedEps(fake) if wrap_fake else fake
        loss, _ = generator_step(gen, f_net, t_net, schedule, noise, cond, uncond, settings, B)
        loss.backward()
        gW, _ = hand_gradient(gen, fake, teacher, schedule, noise, cond, uncond, 1.5, 1.5, 1.0, 625, B)
        if ref is None:
            ref = gen.W.grad.clone()
            torch.testing.assert_close(ref, gW)
        else:
            assert (gen.W.grad - gW).abs().max() > 1e-3 * gW.abs().max()


def test_generator_loss_value_and_normaliser(schedule):
    gen, fake, teacher = LinearEps(1), LinearEps(2), LinearEps(3)
    noise, cond, uncond = make_inputs(2)
    s = MethodSettings(alpha=1.2, gen_loss_scale=2.0)
    loss, stats = generator_step(gen, fake, teacher, schedule, noise, cond, uncond, s, loss_normaliser=8.0)
    # independent computation with alpha = 1.2, eps-CFG on each net.
    with torch.no_grad():
        x_g = (schedule.coefficients(625, noise.z)[1] * noise.z)
        x_g = schedule.eps_to_x0(x_g, gen(x_g, None, cond), torch.full((B,), 625))
        x_t = schedule.add_noise(x_g, noise.eps, noise.t)

        def y(net):
            e_u, e_c = net(x_t, None, uncond), net(x_t, None, cond)
            return schedule.eps_to_x0(x_t, e_u + 1.5 * (e_c - e_u), noise.t)

        yr, yf = y(teacher), y(fake)
        w = (x_g - yr).abs().mean((1, 2, 3), keepdim=True)
        expected = ((yr - yf) * ((yr - x_g) - 1.2 * (yr - yf)) / w).sum() * 2.0 / 8.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert stats["w_mean"].item() == pytest.approx(w.mean().item(), rel=1e-9)


def test_fake_step_loss_and_gradient(schedule):
    gen, fake = LinearEps(1), LinearEps(2)
    noise, cond, uncond = make_inputs(3)
    s = MethodSettings(cfg_train_fake=2.0, prompt_dropout=0.0)
    loss, _ = fake_step(gen, fake, schedule, noise, cond, uncond, s, loss_normaliser=B)
    loss.backward()
    assert gen.W.grad is None, "the generator runs under no_grad in the fake step"
    # independent: sum over elements of (CFG_2(eps_psi) - eps)^2 / B, autograd of a direct formula
    W, U = fake.W.detach().clone().requires_grad_(), fake.U.detach().clone().requires_grad_()
    with torch.no_grad():
        x_in = schedule.coefficients(625, noise.z)[1] * noise.z
        x_g = schedule.eps_to_x0(x_in, gen(x_in, None, cond), torch.full((B,), 625))
        x_t = schedule.add_noise(x_g, noise.eps, noise.t).flatten(1)
    c, cu = cond["encoder_hidden_states"].mean(1), uncond["encoder_hidden_states"].mean(1)
    e_hat = x_t @ W.T + (cu + 2.0 * (c - cu)) @ U.T
    expected = (e_hat - noise.eps.flatten(1)).square().sum() / B
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(fake.W.grad, W.grad)
    torch.testing.assert_close(fake.U.grad, U.grad)


def test_batched_cfg_equals_two_calls_and_scale_one_is_one_call():
    net = LinearEps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, C, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    cond = {"encoder_hidden_states": torch.randn(3, 2, D, generator=g, dtype=torch.float64)}
    uncond = {"encoder_hidden_states": torch.randn(3, 2, D, generator=g, dtype=torch.float64)}
    net.calls = 0
    out = guided_eps(net, x, t, cond, uncond, 3.0)
    assert net.calls == 1
    e_u, e_c = net(x, t, uncond), net(x, t, cond)
    torch.testing.assert_close(out, e_u + 3.0 * (e_c - e_u))
    net.calls = 0
    torch.testing.assert_close(guided_eps(net, x, t, cond, uncond, 1.0), e_c)
    assert net.calls == 1


def test_prompt_dropout_rate_and_application():
    n = 20_000
    noise = draw_step_noise(7, 0, 0, range(n), (1,), uniform_timesteps(20, 980), prompt_dropout=0.1)
    rate = noise.drop.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    cond = {"encoder_hidden_states": torch.ones(6, 2, 3)}
    uncond = {"encoder_hidden_states": torch.zeros(6, 2, 3)}
    drop = torch.tensor([True, False, False, True, False, False])
    out = apply_prompt_dropout(cond, uncond, drop, MethodSettings(cfg_train_fake=1.5))
    assert out["encoder_hidden_states"].flatten(1).mean(1).tolist() == [0, 1, 1, 0, 1, 1]
    # no guidance on the fake net -> no dropout at all (docs/method.md 4's condition)
    same = apply_prompt_dropout(cond, uncond, drop, MethodSettings(cfg_train_fake=1.0, cfg_eval_fake=1.0))
    assert torch.equal(same["encoder_hidden_states"], cond["encoder_hidden_states"])


class InnerLinearEps(LinearEps):
    """LinearEps with a linear input layer: eps = W (A x) + U c. The NaN tests write a NaN into one
    sample of ``inner``'s output with a forward hook, so the bad value arises INSIDE the network and
    flows through its later layers (as an overflow inside a UNet would), not after it."""

    def __init__(self, seed: int, scale: float = 0.2):
        super().__init__(seed, scale)
        self.inner = torch.nn.Linear(D, D, bias=False, dtype=torch.float64)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 100)
            self.inner.weight.copy_(torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(D, D, generator=g,
                                                                                           dtype=torch.float64))

    def forward(self, x, t, cond):
        return super().forward(self.inner(x.flatten(1)).view(x.shape), t, cond)


def inject_nan(module: torch.nn.Module, sample: int):
    """Forward hook: NaN ADDED to row ``sample`` of the module's output, and to the same row of the
    cond half when the call is a batched CFG call (2B rows). Added, not assigned: an in-place write
    would zero the gradient at that row by itself and hide a NaN leaking back through the loss."""

    def hook(_module, _inputs, out):
        mask = torch.zeros_like(out)
        mask[sample] = float("nan")
        if out.shape[0] == 2 * B:
            mask[B + sample] = float("nan")
        return out + mask

    return module.register_forward_hook(hook)


def test_nan_samples_dropped_and_rest_unchanged(schedule):
    noise, cond, uncond = make_inputs(4)
    settings = MethodSettings()
    teacher, fake = InnerLinearEps(3).requires_grad_(False), LinearEps(2).requires_grad_(False)
    gen = LinearEps(1)
    handle = inject_nan(teacher.inner, 2)
    loss, stats = generator_step(gen, fake, teacher, schedule, noise, cond, uncond, settings, B)
    loss.backward()
    handle.remove()
    assert torch.isfinite(loss) and stats["dropped_gen"].item() == 1
    assert torch.isfinite(gen.W.grad).all()
    keep = [0, 1, 3]
    sub = StepNoise(noise.z[keep], noise.eps[keep], noise.t[keep], noise.drop[keep])
    sub_cond = {k: v[keep] for k, v in cond.items()}
    sub_uncond = {k: v[keep] for k, v in uncond.items()}
    gen2 = LinearEps(1)
    loss2, _ = generator_step(gen2, fake, teacher, schedule, sub, sub_cond, sub_uncond, settings, B)
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-12)
    torch.testing.assert_close(gen.W.grad, gen2.W.grad)
    torch.testing.assert_close(gen.U.grad, gen2.U.grad)


def test_grad_sanitizer():
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0, -0.5])
    assert sanitize_grad(g).tolist() == [0.0, 1e5, -1e5, 3.0, -0.5]
    assert sanitize_grad(g, clip_value=1.0).tolist() == [0.0, 1.0, -1.0, 1.0, -0.5]
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = g.clone()
    sanitize_grads_([p])
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 3.0, -0.5]


def test_noise_is_independent_of_the_split():
    full = draw_step_noise(3, 5, 1, range(8), (2, 3, 3), uniform_timesteps(20, 980), 0.1)
    world, micro = 2, 2
    for rnd in range(2):
        for rank in range(world):
            idx = rank_sample_indices(world, rank, micro, rnd)
            part = draw_step_noise(3, 5, 1, idx, (2, 3, 3), uniform_timesteps(20, 980), 0.1)
            assert torch.equal(part.z, full.z[idx]) and torch.equal(part.t, full.t[idx])
    other_phase = draw_step_noise(3, 5, 0, range(8), (2, 3, 3), uniform_timesteps(20, 980), 0.1)
    assert not torch.equal(other_phase.z, full.z)
    assert sorted(i for r in range(2) for k in range(2) for i in rank_sample_indices(2, k, 2, r)) == list(range(8))


def test_ema_beta_closed_form_and_update():
    # ramp-up: halflife = min(50k, 0.05 * 100k) = 5k images; beta = 0.5 ** (512 / 5000)
    assert ema_beta(512, 100_000, 50.0, 0.05) == pytest.approx(0.5 ** (512 / 5000))
    assert ema_beta(512, 10_000_000, 50.0, 0.05) == pytest.approx(0.5 ** (512 / 50_000))
    assert ema_beta(512, 0, 50.0, 0.05) == 0.0
    assert ema_beta(512, 0, 50.0, 0.0) == pytest.approx(0.5 ** (512 / 50_000))
    e, x = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    update_ema_(e, x, 0.25)
    assert e[0].tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]
