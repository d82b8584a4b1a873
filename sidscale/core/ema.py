"""EMA of the generator: half-life in images with the EDM-style ramp-up (docs/method.md 6)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def ema_beta(global_batch: int, images_seen: int, halflife_kimg: float, rampup_ratio: float) -> float:
    """``0.5 ** (global_batch / halflife)``, ``halflife = min(halflife_kimg * 1000, ratio * images_seen)``.

    ``images_seen`` counts the images BEFORE this step, so the first update copies the weights
    (beta = 0), as in EDM.
    """
    halflife = halflife_kimg * 1000.0
    if rampup_ratio > 0:
        halflife = min(halflife, rampup_ratio * images_seen)
    return 0.5 ** (global_batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema_(ema_tensors: Iterable[torch.Tensor], tensors: Iterable[torch.Tensor], beta: float) -> None:
    """``ema = beta * ema + (1 - beta) * x`` in place (fp32 EMA, any-dtype source)."""
    for e, x in zip(ema_tensors, tensors, strict=True):
        e.lerp_(x.detach().to(e.dtype), 1.0 - beta)
