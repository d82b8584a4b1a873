"""Prompt -> conditioning tensors for a diffusers UNet, and the batched forms CFG needs.

A conditioning is a plain ``dict[str, Tensor]`` with batch-first tensors:
- ``encoder_hidden_states`` [B, 77, D] for every teacher;
- SDXL also ``text_embeds`` [B, 1280] (pooled, encoder 2) and ``time_ids`` [B, 6].
Keeping it a dict of tensors lets the method concatenate [uncond; cond] without knowing which
teacher it has.
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


def unet_kwargs(cond: Cond) -> dict:
    """Keyword arguments of ``UNet2DConditionModel.forward`` for this conditioning."""
    kwargs: dict = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    if "text_embeds" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return kwargs


class ClipConditioner(torch.nn.Module):
    """SD1.5 / SD2.1 conditioning: CLIP ``last_hidden_state``, padded to max length, truncated.

    The empty-prompt conditioning (the unconditional branch) is computed once and reused.
    The text encoder is frozen; encoding runs under no_grad because no gradient ever flows
    into the text (the generator's gradient goes through the UNets, not the prompts).
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.dtype = dtype
        self._empty: torch.Tensor | None = None

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(input_ids.to(device)).last_hidden_state
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.encode_ids(self.tokenize(prompts))

    def empty(self, batch: int) -> Cond:
        if self._empty is None:
            self._empty = self.encode([""])["encoder_hidden_states"]
        return {"encoder_hidden_states": self._empty.expand(batch, -1, -1)}
