"""Classifier-free guidance as ONE batched network call on [uncond; cond]."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sidscale.core.cond import Cond, cat_conds

# (x_t, t, cond) -> eps prediction in fp32. Networks are wrapped into this shape by
# sidscale.families.unet_vp.adapter.UNetEps, so the method never sees a UNet's keyword arguments.
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def guided_eps(
    eps_fn: EpsFn, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, scale: float
) -> torch.Tensor:
    """``eps(uncond) + scale * (eps(cond) - eps(uncond))``.

    NOTE: scale == 1 runs only the conditional call (it is exactly eps(cond)), scale == 0 only the
    unconditional one; any other scale (negative ones too: Anti-CFG) runs one call of batch 2B so the
    network sees both branches in a single pass.
    A prediction function with a ``guided`` method couples its own inputs to the scale (FLUX's
    official guidance mode also feeds the scale as the guidance embedding) and does the whole call.
    """
    guided = getattr(eps_fn, "guided", None)
    if guided is not None:
        return guided(x_t, t, cond, uncond, scale)
    if scale == 1.0:
        return eps_fn(x_t, t, cond)
    if scale == 0.0:
        return eps_fn(x_t, t, uncond)
    both = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds([uncond, cond]))
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def fake_eps(
    eps_fn: EpsFn, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, scale: float, text: bool
) -> torch.Tensor:
    """The fake score net's prediction at CFG ``scale``; ``text`` False (Zero-CFG's text-free fake net,
    ``method.fake_text``) makes it one call on the empty prompt whatever the scale.

    NOTE: a prediction function with a ``guided`` method (FLUX, distilled-guidance mode official) still
    gets the scale, with the empty prompt in both branches: its guidance embedding is that scale.
    """
    if text:
        return guided_eps(eps_fn, x_t, t, cond, uncond, scale)
    guided = getattr(eps_fn, "guided", None)
    if guided is not None:
        return guided(x_t, t, uncond, uncond, scale)
    return eps_fn(x_t, t, uncond)
