"""NaN guards (docs/method.md 5): drop non-finite samples, sanitise gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch

GRAD_INF_VALUE = 1e5


def finite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """Bool mask [B]: True where every tensor is finite for that sample."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        keep &= torch.isfinite(x.detach()).flatten(1).all(1)
    return keep


def masked_sum(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum of the kept samples. torch.where (not multiplication) so a NaN sample adds exactly 0
    and sends no NaN gradient back through the dropped branch."""
    return torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum()


def masked_mean(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the kept samples (0 when none is kept), detached: a statistic. A masked mean, not
    ``per_sample[keep]``, so logging needs no host sync."""
    return (torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum() / keep.sum().clamp_min(1)).detach()


def sanitize_grad(grad: torch.Tensor, clip_value: float | None = None) -> torch.Tensor:
    """NaN -> 0, +-inf -> +-1e5; with ``clip_value`` also clamp every entry to [-clip, clip]."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=GRAD_INF_VALUE, neginf=-GRAD_INF_VALUE)
    if clip_value is not None:
        grad = grad.clamp(-clip_value, clip_value)
    return grad


def sanitize_grads_(params: Iterable[torch.nn.Parameter], clip_value: float | None = None) -> None:
    """In-place :func:`sanitize_grad` on every ``.grad`` (the plain-PyTorch reference path)."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(sanitize_grad(p.grad, clip_value))


def register_grad_sanitizers(module: torch.nn.Module, clip_value: float | None = None) -> list:
    """Sanitise gradients as autograd produces them (the DeepSpeed path: the engine owns the
    .grad buffers and reduces them in its own hooks, so we clean each gradient before that)."""
    handles = []
    for p in module.parameters():
        if p.requires_grad:
            handles.append(p.register_hook(lambda g, c=clip_value: sanitize_grad(g, c)))
    return handles
