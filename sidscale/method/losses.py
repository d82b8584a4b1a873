"""The two SiD losses, as sums over latent elements (docs/method.md 5).

Both return per-sample sums so the caller decides the normaliser (the per-rank batch).
"""

from __future__ import annotations

import torch

# How the generator loss of each sample is weighted (docs/flow_matching.md 1.5):
# sid_legacy: divided by SiD-LSG's normaliser w = sg(mean |x_g - y_real|);
# one_minus_sigma: multiplied by (1 - sigma), SiD-DiT's default for flow teachers (sigma = the
# flow-matching noise level of the loss timestep; for a VP teacher its flow equivalent).
GEN_WEIGHTINGS = ("sid_legacy", "one_minus_sigma")


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
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float,
    weighting: str = "sid_legacy", sigma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiD loss ``(y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake))`` per sample,
    divided by ``w`` (sid_legacy) or multiplied by ``1 - sigma`` (one_minus_sigma, ``sigma`` [B]).

    Returns (per-sample loss sums, the per-sample normaliser or weight). The weight is constant
    (no gradient): the gradient reaches the generator through ``x_g`` directly and through
    ``y_real`` / ``y_fake`` (both networks).
    """
    x_g, y_real, y_fake = at_least_fp32(x_g), at_least_fp32(y_real), at_least_fp32(y_fake)
    diff = y_real - y_fake
    per_element = diff * ((y_real - x_g) - alpha * diff)
    if weighting == "sid_legacy":
        w = sid_normaliser(x_g, y_real)
        return per_element.flatten(1).sum(1) / w, w
    if weighting == "one_minus_sigma":
        if sigma is None:
            raise ValueError("weighting one_minus_sigma needs the loss sigma of each sample")
        w = (1 - sigma.detach()).to(per_element.dtype)
        return per_element.flatten(1).sum(1) * w, w
    raise ValueError(f"weighting {weighting!r}; expected one of {GEN_WEIGHTINGS}")
