"""DDIM sampler: batched CFG equals separate calls; exact Gaussian eps gives the right moments."""

import math

import pytest
import torch

from sidscale.core.schedule import VPSchedule
from sidscale.families.shared.samplers import ddim_sample, ddim_timesteps

SCHEDULE = VPSchedule.from_settings()


class CountingEps:
    """A nonlinear eps 'network' of x, t and the conditioning, recording its batch sizes."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        h = cond["encoder_hidden_states"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(0.5 * x + h) * (t.float() / 1000).reshape(-1, 1, 1, 1) + 0.1 * h


def _conds(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        {"encoder_hidden_states": torch.randn(b, 7, 4, generator=g)},
        {"encoder_hidden_states": torch.randn(b, 7, 4, generator=g)},
    )


def test_timesteps_span_the_schedule():
    ts = ddim_timesteps(1000, 25)
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == 25
    assert all(a > b for a, b in zip(ts[:-1], ts[1:], strict=True))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_cfg_is_one_batched_call_equal_to_two_separate_calls():
    b, steps, k = 3, 6, 2.5
    cond, uncond = _conds(b)
    net = CountingEps()
    x_T = torch.randn(b, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = ddim_sample(net, SCHEDULE, x_T.shape, cond, uncond, k, steps, x_T=x_T)
    assert net.batches == [2 * b] * steps

    # reference: an independent DDIM loop calling the net separately for each branch
    ref_net = CountingEps()
    x = x_T.clone()
    ts = ddim_timesteps(1000, steps)
    for i, t in enumerate(ts):
        tt = torch.full((b,), t)
        e_u, e_c = ref_net(x, tt, uncond), ref_net(x, tt, cond)
        eps = e_u + k * (e_c - e_u)
        abar = SCHEDULE.alphas_cumprod[t].double()
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        if i + 1 < len(ts):
            ab2 = SCHEDULE.alphas_cumprod[ts[i + 1]].double()
            x = ab2.sqrt() * x0 + (1 - ab2).sqrt() * eps
    torch.testing.assert_close(out, x0.float(), rtol=1e-4, atol=1e-4)


def test_scale_one_calls_only_the_conditional_net():
    b, steps = 4, 5
    cond, uncond = _conds(b)
    net = CountingEps()
    x_T = torch.randn(b, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    out = ddim_sample(net, SCHEDULE, x_T.shape, cond, uncond, 1.0, steps, x_T=x_T)
    assert net.batches == [b] * steps
    # the unconditional branch cannot influence the result
    other = ddim_sample(CountingEps(), SCHEDULE, x_T.shape, cond, _conds(b, seed=9)[1], 1.0, steps, x_T=x_T)
    assert torch.equal(out, other)


def test_generator_makes_it_deterministic():
    cond, uncond = _conds(2)
    run = [
        ddim_sample(
            CountingEps(), SCHEDULE, (2, 2, 4, 4), cond, uncond, 3.0, 4, torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    ]
    assert torch.equal(run[0], run[1])


def test_exact_gaussian_eps_gives_the_right_moments():
    # data N(m, v) per coordinate: E[x0|x_t] in precision form (a different route from the sampler's)
    m, v = 0.3, 0.25

    def eps_fn(x, t, cond):
        ab = SCHEDULE.alphas_cumprod[t].double().reshape(-1, 1)
        a, s2 = ab.sqrt(), 1 - ab
        x0 = (m / v + a * x.double() / s2) / (1 / v + a**2 / s2)
        return ((x.double() - a * x0) / s2.sqrt()).float()

    n = 40000
    cond = {"encoder_hidden_states": torch.zeros(n, 1, 1)}
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    coarse, fine = (
        ddim_sample(eps_fn, SCHEDULE, (n, 2), cond, None, 1.0, steps, x_T=x_T) for steps in (25, 200)
    )
    # the exact probability-flow map from t=999 is affine: x0 = m + sqrt(v)/sig_T (x_T - a_T m), and
    # SD's schedule does not end at pure noise (abar_999 = 0.0047), so x_T ~ N(0, 1) shifts the mean slightly
    abar_T = float(SCHEDULE.alphas_cumprod[999])
    sig_T = math.sqrt(abar_T * v + 1 - abar_T)
    mean = m - math.sqrt(v) * math.sqrt(abar_T) * m / sig_T
    std = math.sqrt(v) / sig_T
    assert fine.mean().item() == pytest.approx(mean, abs=0.006)
    assert fine.std().item() == pytest.approx(std, rel=0.025)
    # DDIM is a first-order ODE solver: its (variance-shrinking) error falls with the step count
    assert std - coarse.std().item() > 4 * (std - fine.std().item()) > 0
