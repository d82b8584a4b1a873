"""Numerics of the precision modes and the NaN guard of the fake step (issue 12, faults 6, 7, 11)."""

from __future__ import annotations

import copy

import pytest
import torch

from sidscale.method import MethodSettings, StepNoise, fake_step
from sidscale.schedule import VPSchedule

B, C, H, W = 4, 2, 2, 2
D = C * H * W


class TinyEps(torch.nn.Module):
    """A small nonlinear eps-net (x, t, cond) -> eps: hidden = tanh(A x + U c), out = V hidden."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(0.3 * torch.randn(16, D, generator=g, dtype=torch.float64))
        self.U = torch.nn.Parameter(0.3 * torch.randn(16, D, generator=g, dtype=torch.float64))
        self.out = torch.nn.Linear(16, D, dtype=torch.float64)

    def forward(self, x, t, cond):
        c = cond["encoder_hidden_states"].mean(1)
        hidden = torch.tanh(x.flatten(1) @ self.A.T + c @ self.U.T)
        return self.out(hidden).view(x.shape)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = StepNoise(z=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
                      eps=torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
                      t=torch.tensor([20, 300, 625, 979]), drop=torch.zeros(B, dtype=torch.bool))
    cond = {"encoder_hidden_states": torch.randn(B, 3, D, generator=g, dtype=torch.float64)}
    uncond = {"encoder_hidden_states": torch.randn(1, 3, D, generator=g, dtype=torch.float64).expand(B, -1, -1)}
    return noise, cond, uncond


def _grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_fake_step_nan_sample_leaves_other_gradients_exact(cfg_scale):
    """A NaN written into sample k of the fake net's output (a forward hook on its last layer,
    inside the network) must drop sample k only: the gradients equal a run on the batch without
    k, with the same normaliser (the per-rank batch B)."""
    s = VPSchedule.from_settings()
    schedule = VPSchedule(s.alphas_cumprod.double(), "epsilon")
    settings = MethodSettings(cfg_train_fake=cfg_scale, prompt_dropout=0.0)
    gen, fake = TinyEps(1).requires_grad_(False), TinyEps(2)
    fake_ref = copy.deepcopy(fake)
    noise, cond, uncond = _inputs(3)
    bad = 1

    def hook(_module, _inputs, out):
        # ADD a NaN (an in-place write would itself zero the gradient of that row and hide a leak)
        mask = torch.zeros_like(out)
        mask[bad] = float("nan")
        return out + mask

    handle = fake.out.register_forward_hook(hook)
    loss, stats = fake_step(gen, fake, schedule, noise, cond, uncond, settings, loss_normaliser=B)
    handle.remove()
    loss.backward()
    assert stats["dropped_fake"].item() == 1 and torch.isfinite(loss)

    keep = [i for i in range(B) if i != bad]
    sub = StepNoise(*(getattr(noise, f)[keep] for f in ("z", "eps", "t", "drop")))
    ref_loss, _ = fake_step(gen, fake_ref, schedule, sub, {k: v[keep] for k, v in cond.items()},
                            {k: v[keep] for k, v in uncond.items()}, settings, loss_normaliser=B)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    got, want = _grads(fake), _grads(fake_ref)
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name}: the NaN sample leaked into the gradient"
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)
