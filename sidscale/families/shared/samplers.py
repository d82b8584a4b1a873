"""The teachers' multi-step samplers, with classifier-free guidance: deterministic DDIM (VP) and
Euler in sigma (rectified flow).

DDIM (eta = 0): timesteps spread evenly from T-1 down to 0 inclusive, so ``steps`` network
evaluations start at the noisiest level (x_T ~ N(0, I) is then the closest match to the forward
process) and the last one predicts x0 from t = 0, where the prediction barely shrinks the sample.

Flow: ``x_t = (1 - sigma) x0 + sigma eps`` and the network predicts the velocity ``v = eps - x0``
(docs/flow_matching.md 1.1). One step from sigma to sigma_next moves along the predicted pair
``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v``:

    x_next = (1 - sigma_next) x0_hat + sigma_next eps_hat  =  x + (sigma_next - sigma) v

i.e. deterministic DDIM in the flow parameterisation IS the Euler step of the flow ODE (what
diffusers' ``FlowMatchEulerDiscreteScheduler`` does). ``flow_euler`` is that loop on any sigma grid
(the toy's ``1 - i / steps``, SD3's and FLUX's scheduler grids); ``flow_sample`` starts it at
sigma = 1, where ``x_1 = eps ~ N(0, I)`` is exactly the forward process's marginal.
Used to measure how good a teacher is (toy Frechet distance), for previews and evaluation baselines.
"""

from __future__ import annotations

import torch

from sidscale.core.cond import Cond, cond_batch_size
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.method.guidance import EpsFn, guided_eps


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` integer timesteps, evenly spaced from T-1 down to 0 (distinct while steps <= T)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if steps == 1:
        return [num_train_timesteps - 1]
    ts = torch.linspace(num_train_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return ts.tolist()


def sampler_start(shape: tuple[int, ...] | torch.Size, cond: Cond, uncond: Cond | None, cfg_scale: float,
                  generator: torch.Generator | None, x_T: torch.Tensor | None) -> tuple[torch.Tensor, Cond | None]:
    """What every multi-step sampler checks and draws first: (x_T as fp32 on the conditioning's
    device, ``uncond`` expanded to the batch). The noise is drawn on the CPU from ``generator``, so
    samples do not depend on the device."""
    device = next(iter(cond.values())).device
    if cfg_scale != 1.0 and uncond is None:
        raise ValueError("cfg_scale != 1 needs an unconditional conditioning")
    if uncond is not None and cond_batch_size(uncond) == 1 and shape[0] > 1:
        uncond = {k: v.expand(shape[0], *v.shape[1:]) for k, v in uncond.items()}
    if cond_batch_size(cond) != shape[0]:
        raise ValueError(f"cond has batch {cond_batch_size(cond)}, shape asks for {shape[0]}")
    if x_T is None:
        x_T = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return x_T.to(device=device, dtype=torch.float32), uncond


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    schedule: VPSchedule,
    shape: tuple[int, ...] | torch.Size,
    cond: Cond,
    uncond: Cond | None,
    cfg_scale: float,
    steps: int,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample x0 with deterministic DDIM; ``eps_fn(x_t, t[B] long, cond) -> eps``.

    The initial noise is drawn on CPU from ``generator`` (so results do not depend on the device)
    and moved to the device of the conditioning. The update runs in fp32 whatever the net's dtype.
    """
    x, uncond = sampler_start(shape, cond, uncond, cfg_scale, generator, x_T)
    device = x.device
    ts = ddim_timesteps(schedule.num_train_timesteps, steps)
    x0 = x
    for i, t in enumerate(ts):
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        eps = guided_eps(eps_fn, x, t_vec, cond, uncond, cfg_scale).float()
        x0 = schedule.eps_to_x0(x, eps, t)
        if i + 1 < len(ts):
            # eta = 0: move along the predicted (x0, eps) pair to the next noise level
            x = schedule.add_noise(x0, eps, ts[i + 1])
    return x0


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

    Same calling convention as ``ddim_sample`` above: the initial noise is drawn on CPU from
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


@torch.no_grad()
def flow_euler(v_fn: EpsFn, sigmas: list[float], x_T: torch.Tensor, cond: Cond, uncond: Cond | None,
               cfg_scale: float) -> torch.Tensor:
    """Euler steps of the flow ODE, ``x <- x + (sigma_next - sigma) v``, on the grid ``sigmas`` (a pipeline's
    scheduler sigmas, ending at 0), CFG on the velocity, in fp32 on the conditioning's device: the
    latents at the last sigma. (``flow_sample`` takes the same steps in their DDIM form.)"""
    device = next(iter(cond.values())).device
    x = x_T.to(device=device, dtype=torch.float32)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=device)
        x = x + (sigma_next - sigma) * guided_eps(v_fn, x, s, cond, uncond, cfg_scale).float()
    return x
