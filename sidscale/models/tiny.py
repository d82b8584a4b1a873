"""Tiny random-init architectures: the same classes as Stable Diffusion, at a size a CPU trains.

Used by the toy teacher and by tests. The configs are plain dicts (JSON-serialisable, so a spec
that embeds them can be hashed); the builders are deterministic given a seed and leave the
global RNG untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from sidscale.models.tokenizer import CLIP_VOCAB_SIZE


def tiny_unet_config(
    in_channels: int = 3, sample_size: int = 16, cross_attention_dim: int = 32, **overrides: Any
) -> dict[str, Any]:
    """Config of a ~1M-parameter ``UNet2DConditionModel`` (two resolutions, cross-attention at the top)."""
    config: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,
        # NOTE: diffusers' legacy name: for UNet2DConditionModel this is the number of heads.
        "attention_head_dim": 4,
    }
    config.update(overrides)
    return config


def tiny_clip_text_config(hidden_size: int = 32, **overrides: Any) -> dict[str, Any]:
    """Config of a tiny ``CLIPTextModel`` that reads the real CLIP token ids (77 positions)."""
    config: dict[str, Any] = {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": hidden_size,
        # real CLIP ids: the pooled output looks for this eos id
        "bos_token_id": CLIP_VOCAB_SIZE - 2,
        "eos_token_id": CLIP_VOCAB_SIZE - 1,
        "pad_token_id": CLIP_VOCAB_SIZE - 1,
    }
    config.update(overrides)
    return config


def build_tiny_unet(seed: int, **kw: Any) -> torch.nn.Module:
    """A random-init ``UNet2DConditionModel`` from ``tiny_unet_config(**kw)``; same seed, same weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**tiny_unet_config(**kw))


def build_tiny_text_encoder(seed: int, **kw: Any) -> torch.nn.Module:
    """A random-init ``CLIPTextModel`` from ``tiny_clip_text_config(**kw)``; same seed, same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(**kw)))
