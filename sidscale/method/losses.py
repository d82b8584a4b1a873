"""The two SiD losses, as sums over latent elements (docs/method.md 5), and the generator loss's
per-sample weighting.

Both losses return per-sample sums so the caller decides the normaliser (the per-rank batch).
"""

from __future__ import annotations

import torch

# How the generator loss of each sample is weighted (docs/flow_matching.md 1.5). sigma is the flow-matching
# noise level of the loss timestep (a VP teacher's flow equivalent s / (a + s)); lambda multiplies the loss:
#   sid_legacy               1 / w, w = sg(mean |x_g - y_real|) (SiD-LSG's normaliser; the loss divides by w)
#   one_minus_sigma          1 - sigma (SiD-DiT's default for flow teachers)
#   one_minus_sigma_squared  (1 - sigma)^2
#   one_over_sigma           1 / max(sigma, 1e-5)
#   one_over_sigma_squared   1 / max(sigma^2, 1e-5)
#   snr_sqrt                 1 / max(sigma / (1 - sigma), 1e-5)      (VP: a / s, the square root of the SNR)
#   snr                      1 / max((sigma / (1 - sigma))^2, 1e-5)  (VP: a^2 / s^2, the SNR)
GEN_WEIGHTINGS = ("sid_legacy", "one_minus_sigma", "one_minus_sigma_squared", "one_over_sigma",
                  "one_over_sigma_squared", "snr_sqrt", "snr")
# the SiD-DiT authors' spellings (their --weighting_scheme) -> ours
GEN_WEIGHTING_ALIASES = {
    "sid_default": "sid_legacy", "1_minus_sigma": "one_minus_sigma",
    "1_minus_sigma_squared": "one_minus_sigma_squared", "1_over_sigma": "one_over_sigma",
    "1_over_sigma2": "one_over_sigma_squared",
}
# every accepted spelling (the config check's list)
GEN_WEIGHTING_NAMES = GEN_WEIGHTINGS + tuple(GEN_WEIGHTING_ALIASES)
# the authors clip each denominator here before inverting it (so lambda <= 1e5)
WEIGHT_DENOMINATOR_MIN = 1e-5


def canonical_weighting(name: str) -> str:
    """Our name of a generator-loss weighting given in either spelling; ValueError for an unknown one."""
    name = GEN_WEIGHTING_ALIASES.get(name, name)
    if name not in GEN_WEIGHTINGS:
        raise ValueError(f"gen_weighting {name!r}; expected one of {', '.join(GEN_WEIGHTING_NAMES)}")
    return name


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


def _sigma_weight(weighting: str, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) of the sigma-based weightings (``sigma`` [B], at least fp32, no graph)."""
    lo = WEIGHT_DENOMINATOR_MIN
    if weighting == "one_minus_sigma":
        return 1 - sigma
    if weighting == "one_minus_sigma_squared":
        return (1 - sigma).square()
    if weighting == "one_over_sigma":
        return 1 / sigma.clamp_min(lo)
    if weighting == "one_over_sigma_squared":
        return 1 / sigma.square().clamp_min(lo)
    if weighting == "snr_sqrt":
        return 1 / (sigma / (1 - sigma)).clamp_min(lo)
    if weighting == "snr":
        return 1 / (sigma / (1 - sigma)).square().clamp_min(lo)
    raise ValueError(f"weighting {weighting!r}; expected one of {', '.join(GEN_WEIGHTINGS)}")


def generator_weight(weighting: str, sigma: torch.Tensor | None, x_g: torch.Tensor,
                     y_real: torch.Tensor) -> torch.Tensor:
    """The per-sample multiplier lambda [B] of the generator's loss terms (fp32, or fp64 for fp64 inputs;
    no gradient): ``1 / w`` for sid_legacy, else lambda(sigma) of ``GEN_WEIGHTINGS``. ``sigma`` [B] is the
    loss noise level of each sample (flow sigma; unused by sid_legacy). Aliases are accepted. The
    adversarial term multiplies by the same lambda as the SiD term."""
    weighting = canonical_weighting(weighting)
    if weighting == "sid_legacy":
        return 1 / sid_normaliser(x_g, y_real)
    if sigma is None:
        raise ValueError(f"weighting {weighting} needs the loss sigma of each sample")
    with torch.no_grad():
        return _sigma_weight(weighting, at_least_fp32(sigma.detach()))


def sid_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float,
    weighting: str = "sid_legacy", sigma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiD loss ``(y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake))`` per sample,
    divided by ``w`` (sid_legacy) or multiplied by the weighting's lambda(sigma) (``sigma`` [B]).

    Returns (per-sample loss sums, the per-sample normaliser w (sid_legacy) or multiplier lambda). The
    weight is constant (no gradient): the gradient reaches the generator through ``x_g`` directly and
    through ``y_real`` / ``y_fake`` (both networks).
    """
    x_g, y_real, y_fake = at_least_fp32(x_g), at_least_fp32(y_real), at_least_fp32(y_fake)
    diff = y_real - y_fake
    per_element = diff * ((y_real - x_g) - alpha * diff)
    weighting = canonical_weighting(weighting)
    if weighting == "sid_legacy":
        # NOTE: a division by w, not a product with 1 / w: the rounding SiD-LSG runs always had
        w = sid_normaliser(x_g, y_real)
        return per_element.flatten(1).sum(1) / w, w
    w = generator_weight(weighting, sigma, x_g, y_real).to(per_element.dtype)
    return per_element.flatten(1).sum(1) * w, w
