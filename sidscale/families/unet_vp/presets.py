"""The published Stable Diffusion architectures, written into code.

These are the ``config.json`` files of the released diffusers checkpoints (SD1.5, SD2.1-base,
SD2.1-768, SDXL-base-1.0), minus keys equal to the diffusers defaults. They let us build the
real-size networks with random weights, or on the meta device (no memory) to count parameters
and FLOPs, without any download:

    unet = build_unet("sdxl", device="meta")
    count_parameters(unet)                      # 2,567,463,684
    unet_forward_flops("sd15") / 1e12           # 0.803 (batch 1, 77 tokens, 64x64 latents)

Weights never come from here: a teacher is always loaded from a local directory (teacher.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

# CLIP ViT-L/14 text tower (OpenAI): SD1.5's encoder and SDXL's first encoder.
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# OpenCLIP ViT-H/14 text tower, SD2.x: diffusers ships 23 of its 24 layers (SD2 reads the
# penultimate layer, so the last one is dropped from the checkpoint).
OPENCLIP_H_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512,
}
# OpenCLIP ViT-bigG/14 text tower with its projection: SDXL's second encoder (pooled embedding).
OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}

_SD_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}

_SD1_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    # NOTE: diffusers' legacy name: for SD1.x this is the number of heads (8), not their width.
    "attention_head_dim": 8,
}
_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG), concatenated
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
}


@dataclass(frozen=True)
class ArchPreset:
    """One published teacher architecture (configs only; no weights)."""

    name: str
    kind: str  # teacher.kind: sd | sdxl
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # SDXL: (CLIP-L, bigG with projection)
    vae: dict[str, Any]
    resolution: int  # native image size in pixels
    prediction_type: str = "epsilon"
    published: dict[str, float] = field(default_factory=dict)  # numbers the method page quotes

    @property
    def latent_size(self) -> int:
        return self.resolution // 8


PRESETS: dict[str, ArchPreset] = {
    "sd15": ArchPreset("sd15", "sd", _SD1_UNET, (CLIP_L_TEXT,), _SD_VAE, 512,
                       published={"unet_params": 859_520_964, "unet_tflop": 0.803}),
    "sd21": ArchPreset("sd21", "sd", _SD2_UNET, (OPENCLIP_H_TEXT,), _SD_VAE, 512),
    "sd21_768": ArchPreset("sd21_768", "sd", {**_SD2_UNET, "sample_size": 96, "upcast_attention": True},
                           (OPENCLIP_H_TEXT,), {**_SD_VAE, "sample_size": 768}, 768, "v_prediction"),
    "sdxl": ArchPreset("sdxl", "sdxl", _SDXL_UNET, (CLIP_L_TEXT, OPENCLIP_BIGG_TEXT),
                       {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}, 1024,
                       published={"unet_params": 2_567_463_684, "unet_tflop": 6.761}),
}


def get_preset(name: str) -> ArchPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown architecture preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def unet_config(name: str) -> dict[str, Any]:
    return copy.deepcopy(get_preset(name).unet)


def build_unet(name: str, device: torch.device | str = "meta", seed: int | None = None) -> torch.nn.Module:
    """The preset's ``UNet2DConditionModel``: on "meta" it costs no memory (shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config(name))


def build_text_encoders(name: str, device: torch.device | str = "meta") -> list[torch.nn.Module]:
    """The preset's text encoder(s); SDXL's second one carries the pooled projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(name)
    out = []
    with torch.device(device):
        for i, cfg in enumerate(preset.text_encoders):
            cls = CLIPTextModelWithProjection if preset.kind == "sdxl" and i == 1 else CLIPTextModel
            out.append(cls(CLIPTextConfig(**cfg)))
    return out


def build_vae(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**copy.deepcopy(get_preset(name).vae))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_dummy_inputs(name: str, batch: int = 1, tokens: int = 77,
                      device: torch.device | str = "meta") -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of one UNet forward at the preset's native latent size."""
    preset = get_preset(name)
    cfg = preset.unet
    s = preset.latent_size
    x = torch.zeros(batch, cfg["in_channels"], s, s, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, tokens, cfg["cross_attention_dim"],
                                                                   device=device)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = preset.text_encoders[-1]["projection_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device=device),
                                       "time_ids": torch.zeros(batch, 6, device=device)}
    return (x, t), kwargs


def unet_forward_flops(name: str, batch: int = 1, tokens: int = 77) -> int:
    """FLOPs of one UNet forward (FlopCounterMode counts matmuls/convs/SDPA, 2 per MAC), on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(name, "meta")
    args, kwargs = unet_dummy_inputs(name, batch, tokens, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*args, **kwargs)
    return int(counter.get_total_flops())
