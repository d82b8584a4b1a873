"""The VP schedule against diffusers' scheduler and the closed-form values of docs/method.md 1."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sidscale.core.schedule import VPSchedule


@pytest.fixture(scope="module")
def schedule() -> VPSchedule:
    return VPSchedule.from_settings()


def test_alphas_cumprod_equal_diffusers(schedule):
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.equal(schedule.alphas_cumprod, ref)


def test_alphas_cumprod_closed_form(schedule):
    # abar_t = prod (1 - beta_s), beta_s = (sqrt(b0) + s/(T-1) (sqrt(b1) - sqrt(b0)))^2, computed in fp64.
    b0, b1 = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    expected = []
    for s in range(1000):
        prod *= 1.0 - (b0 + s / 999 * (b1 - b0)) ** 2
        expected.append(prod)
    assert torch.allclose(schedule.alphas_cumprod.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)


@pytest.mark.parametrize("t, a, s", [(20, 0.9906, 0.1367), (625, 0.3712, 0.9286), (979, 0.0769, 0.9970)])
def test_reference_values(schedule, t, a, s):
    x = torch.zeros(1, 1)
    ca, cs = schedule.coefficients(torch.tensor([t]), x)
    assert ca.item() == pytest.approx(a, abs=1e-4)
    assert cs.item() == pytest.approx(s, abs=1e-4)


def test_round_trips(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    t = torch.tensor([0, 20, 500, 625, 999])
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.eps_to_x0(x_t, eps, t), x0, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(schedule.x0_to_eps(x_t, x0, t), eps, rtol=1e-4, atol=1e-4)
    v = schedule.eps_x0_to_v(x0, eps, t)
    torch.testing.assert_close(schedule.v_to_eps(x_t, v, t), eps, rtol=1e-4, atol=1e-4)
    vs = VPSchedule(schedule.alphas_cumprod, "v_prediction")
    torch.testing.assert_close(vs.model_output_to_eps(x_t, v, t), eps, rtol=1e-4, atol=1e-4)


def test_v_closed_form(schedule):
    # v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho), for a scalar case by hand.
    t = torch.tensor([625])
    abar = schedule.alphas_cumprod[625].double()
    x0, eps = torch.tensor([[0.3]]), torch.tensor([[-1.2]])
    expected = abar.sqrt() * -1.2 - (1 - abar).sqrt() * 0.3
    assert schedule.eps_x0_to_v(x0, eps, t).item() == pytest.approx(expected.item(), abs=1e-6)


def test_timestep_sampling_range_and_uniformity(schedule):
    t = schedule.sample_timesteps(200_000, 20, 980, torch.Generator().manual_seed(1))
    assert t.min().item() == 20 and t.max().item() == 979
    counts = torch.bincount(t - 20, minlength=960).float()
    # each of 960 bins expects ~208 draws; a 6-sigma band
    assert (counts - 208.33).abs().max().item() < 6 * math.sqrt(208.33)
    with pytest.raises(ValueError, match="t_min < t_max"):
        schedule.sample_timesteps(4, 980, 20)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        VPSchedule.from_settings(prediction_type="sample")
