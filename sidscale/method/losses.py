"""The two SiD-LSG losses, as sums over latent elements (the method page's convention).

Both return per-sample sums so the caller decides the normaliser (the per-rank batch).
"""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 (or fp64 when given fp64, which the exact tests use)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fake_score_loss(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching without timestep weighting: ``sum (eps_hat - eps)^2`` per sample."""
    return (at_least_fp32(eps_hat) - at_least_fp32(eps)).square().flatten(1).sum(1)


def sid_normaliser(x_g: torch.Tensor, y_real: torch.Tensor, min_value: float = 1e-5) -> torch.Tensor:
    """``w = stopgrad(mean_{C,H,W} |x_g - y_real|)``, per sample, fp32, clamped away from 0."""
    with torch.no_grad():
        w = (at_least_fp32(x_g) - at_least_fp32(y_real)).abs().flatten(1).mean(1).clamp_min(min_value)
    return w


def sid_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiD loss ``(y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake)) / w`` per sample.

    Returns (per-sample loss sums, w). Only ``w`` is detached: the gradient reaches the
    generator through ``x_g`` directly and through ``y_real`` / ``y_fake`` (both UNets).
    """
    x_g, y_real, y_fake = at_least_fp32(x_g), at_least_fp32(y_real), at_least_fp32(y_fake)
    w = sid_normaliser(x_g, y_real)
    diff = y_real - y_fake
    per_element = diff * ((y_real - x_g) - alpha * diff)
    per_sample = per_element.flatten(1).sum(1) / w
    return per_sample, w
