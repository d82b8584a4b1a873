"""A conditioning: a plain ``dict[str, Tensor]`` of batch-first tensors, and the batched forms CFG needs.

Every family's conditioner returns one (CLIP hidden states; SDXL adds pooled embeddings and time
ids; SD3/FLUX their T5 and pooled tensors). Keeping it a dict of tensors lets the method
concatenate [uncond; cond] or pick per sample without knowing which teacher it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Cond = dict[str, torch.Tensor]


def cat_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension (same keys required)."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys:
            raise ValueError(f"conditionings have different keys: {sorted(keys)} vs {sorted(c.keys())}")
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}


def select_cond(cond: Cond, index: torch.Tensor) -> Cond:
    return {k: v[index] for k, v in cond.items()}


def where_cond(mask: torch.Tensor, if_true: Cond, if_false: Cond) -> Cond:
    """Per-sample choice: ``mask[i]`` picks sample i of ``if_true``, else of ``if_false``."""
    out = {}
    for k, v in if_true.items():
        m = mask.reshape((-1,) + (1,) * (v.dim() - 1)).to(v.device)
        out[k] = torch.where(m, v, if_false[k])
    return out


def cond_batch_size(cond: Cond) -> int:
    return int(next(iter(cond.values())).shape[0])
