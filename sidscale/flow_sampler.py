"""The multi-step sampler of a rectified-flow teacher: Euler in sigma with classifier-free guidance.

``x_t = (1 - sigma) x0 + sigma eps`` and the network predicts the velocity ``v = eps - x0``
(sid_dit_method.md 1.1). One step from sigma to sigma_next moves along the predicted pair
``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v``:

    x_next = (1 - sigma_next) x0_hat + sigma_next eps_hat  =  x + (sigma_next - sigma) v

i.e. deterministic DDIM (eta = 0) in the flow parameterisation IS the Euler step of the flow ODE
(what diffusers' ``FlowMatchEulerDiscreteScheduler`` does). It starts at sigma = 1, where
``x_1 = eps ~ N(0, I)`` is exactly the forward process's marginal, and ``steps`` network
evaluations at sigma_i = 1 - i / steps (optionally shifted as SD3 does) end at sigma = 0; the last
step's ``x0_hat`` is returned.
"""

from __future__ import annotations

import torch

from sidscale.core.schedule import FlowSchedule
from sidscale.ddim import sampler_start
from sidscale.method.guidance import EpsFn, guided_eps
from sidscale.models.conditioning import Cond


def flow_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` sigmas from 1 down to 0: ``1 - i / steps``, then SD3's shift
    ``shift s / (1 + (shift - 1) s)`` (shift 1 = none; it keeps 1 and 0 fixed)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * base / (1 + (shift - 1) * base)).tolist()


@torch.no_grad()
def flow_sample(
    v_fn: EpsFn,
    schedule: FlowSchedule,
    shape: tuple[int, ...] | torch.Size,
    cond: Cond,
    uncond: Cond | None,
    cfg_scale: float,
    steps: int,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    shift: float = 1.0,
) -> torch.Tensor:
    """Sample x0 with the flow Euler sampler; ``v_fn(x_t, sigma [B] float, cond) -> velocity``.

    Same calling convention as ``sidscale.ddim.ddim_sample``: the initial noise is drawn on CPU from
    ``generator`` (results do not depend on the device) and moved to the conditioning's device; CFG
    ``v_u + cfg (v_c - v_u)`` (linear in v, so the same as CFG on x0 or eps); the update runs in fp32.
    """
    x, uncond = sampler_start(shape, cond, uncond, cfg_scale, generator, x_T)
    device = x.device
    sigmas = flow_sigmas(steps, shift)
    x0 = x
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        s_vec = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=device)
        v = guided_eps(v_fn, x, s_vec, cond, uncond, cfg_scale).float()
        x0 = schedule.to_x0(x, v, sigma)
        # the DDIM form of the Euler step (see the module docstring); sigma_next = 0 gives x0
        x = schedule.add_noise(x0, schedule.to_eps(x, v, sigma), sigma_next)
    return x0
