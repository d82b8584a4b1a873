"""The unet_vp family's tiny teachers: the same classes as Stable Diffusion, at a size a CPU trains.

The tiny UNet and CLIP text tower (used by the toy teacher, the bench's ``tiny`` preset and tests), and
whole tiny SD1.5 / SD2.1 / SDXL teacher directories (4-channel latents, a VAE that downsamples by 8 like
SD's, the real CLIP tokenizer; SDXL with two encoders and text_time conditioning). The configs are
plain dicts (JSON-serialisable, so a spec that embeds them can be hashed); the builders are
deterministic given a seed and leave the global RNG untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sidscale.families.shared.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, write_clip_tokenizer_files

# Stable Diffusion's training noise schedule (SD1.5 / SD2.1), written as the teacher's scheduler.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

# The VAE of the ``tiny`` preset: SD's 4 resolutions (factor 8) and 4 latent channels at ~50k
# parameters, so a CPU decodes a preview in milliseconds (the shape of ``tiny_vae``).
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 64, "scaling_factor": 0.18215,
}


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


SDXL_TEXT_HIDDEN = (32, 48)  # encoder 1 / encoder 2 widths: distinct, so a swapped concat shows
SDXL_POOLED_DIM = 40  # encoder 2's projection (the pooled text_embeds)
SDXL_TIME_EMBED_DIM = 8


def tiny_vae(seed: int, scaling_factor: float = 0.18215, sample_size: int = 64) -> torch.nn.Module:
    """An ``AutoencoderKL`` with SD's 4 resolutions (factor 8) and 4 latent channels, ~50k params."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                             block_out_channels=[8, 8, 16, 16], norm_num_groups=4,
                             down_block_types=["DownEncoderBlock2D"] * 4,
                             up_block_types=["UpDecoderBlock2D"] * 4,
                             sample_size=sample_size, scaling_factor=scaling_factor)


def _write_common(path: Path, seed: int, prediction_type: str, scaling_factor: float) -> None:
    tiny_vae(seed + 2, scaling_factor).save_pretrained(path / "vae")
    from diffusers import DDPMScheduler

    from sidscale.families.toy.mixture import ToyMixture

    build_clip_tokenizer(path / "tokenizer")
    scheduler = DDPMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    scheduler.save_pretrained(path / "scheduler")
    # the prompts of data.shards=indexed:toy / toy come from here
    (path / "toy_mixture.json").write_text(json.dumps(ToyMixture().to_dict()))


def write_tiny_sd_teacher(path: Path, seed: int = 0, prediction_type: str = "epsilon",
                          sd2: bool = False) -> Path:
    """SD1.5-shaped (``sd2=False``) or SD2.1-shaped (linear projections, per-block head counts;
    with ``prediction_type="v_prediction"`` the 768-v variant) teacher; 64 px images -> 4x8x8 latents."""
    path = Path(path)
    # SD2.x: linear projections in the transformers, per-block head counts, fp32 attention scores
    sd2_keys = {"use_linear_projection": True, "attention_head_dim": [2, 4], "upcast_attention": True}
    extra = sd2_keys if sd2 else {}
    unet = build_tiny_unet(seed, in_channels=4, sample_size=8, cross_attention_dim=32, **extra)
    unet.save_pretrained(path / "unet")
    build_tiny_text_encoder(seed + 1, hidden_size=32).save_pretrained(path / "text_encoder")
    _write_common(path, seed, prediction_type, 0.18215)
    return path


def write_sdxl_tokenizer_2(path: Path) -> None:
    """SDXL's second tokenizer: the same CLIP BPE, padding with "!" (id 0) as SDXL's does."""
    write_clip_tokenizer_files(path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((path / name).read_text())
        cfg["pad_token"] = "!"
        (path / name).write_text(json.dumps(cfg, indent=2))


def write_tiny_sdxl_teacher(path: Path, seed: int = 0) -> Path:
    """SDXL-shaped teacher: text_time UNet, CLIPTextModel + CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(path)
    h1, h2 = SDXL_TEXT_HIDDEN
    build_tiny_unet(
        seed, in_channels=4, sample_size=8, cross_attention_dim=h1 + h2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2], use_linear_projection=True, attention_head_dim=[2, 4],
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
    ).save_pretrained(path / "unet")
    build_tiny_text_encoder(seed + 1, hidden_size=h1).save_pretrained(path / "text_encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        te2_config = CLIPTextConfig(**tiny_clip_text_config(h2, projection_dim=SDXL_POOLED_DIM))
        te2 = CLIPTextModelWithProjection(te2_config)
    te2.save_pretrained(path / "text_encoder_2")
    write_sdxl_tokenizer_2(path / "tokenizer_2")
    _write_common(path, seed, "epsilon", 0.13025)
    return path
