"""The published FLUX.1-dev architecture, written into code.

The ``transformer/config.json`` of the released diffusers checkpoint (black-forest-labs/FLUX.1-dev:
19 double-stream + 38 single-stream blocks, 24 heads x 128, T5 width 4096, CLIP-L pooled 768, the
guidance embedding, RoPE axes 16 + 56 + 56) plus its two text encoders (CLIP-L ``CLIPTextModel``,
no projection: FLUX reads its pooler output; the T5-v1.1-XXL encoder) and its 16-channel VAE (SD3's
architecture with FLUX's scaling 0.3611 / shift 0.1159). As with the SD3 presets they build the
real-size networks with random weights, or on the meta device to count parameters and FLOPs:

    net = build_flux_transformer("flux_dev")       # on meta
    count_parameters(net)                          # 11,901,408,320
    transformer_forward_flops("flux_dev") / 1e12   # one forward at 1024 px, 512 T5 tokens

Weights never come from here: a teacher is always loaded from a local directory. Unlike SD3, the
FLUX transformer has no position-embedding buffer (RoPE is computed from the token ids).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from sidscale.families.sd3.presets import SD3_VAE, T5_XXL_ENCODER, DiTPreset
from sidscale.families.unet_vp.presets import CLIP_L_TEXT

# FluxPipeline's encoder classes in its order (text_encoder, text_encoder_2)
FLUX_TEXT_ENCODER_CLASSES: tuple[str, ...] = ("CLIPTextModel", "T5EncoderModel")
FLUX_VAE: dict[str, Any] = {**copy.deepcopy(SD3_VAE), "scaling_factor": 0.3611, "shift_factor": 0.1159}
# FLUX.1-dev's FlowMatchEulerDiscreteScheduler: the resolution-dependent (dynamic) shift
FLUX_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                                  "max_image_seq_len": 4096}

_FLUX_DEV: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64,  # 16 latent channels packed 2x2
    "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL d_model
    "pooled_projection_dim": 768,  # CLIP-L pooler output
    "guidance_embeds": True,  # guidance-distilled (FLUX.1-schnell: False)
    "axes_dims_rope": (16, 56, 56),
}

# ``published``: exact counts of the networks built from these configs (meta device); they agree with the
# FLUX.1-dev count of the method page (docs/sid_dit_method.md table 5.1: 11.901 B, 22.17 GiB bf16), and the
# TFLOP with a hand count of the transformer's matmuls (tests/test_flux_presets.py).
FLUX_PRESETS: dict[str, DiTPreset] = {
    "flux_dev": DiTPreset(
        "flux_dev", _FLUX_DEV, text_encoders=(CLIP_L_TEXT, T5_XXL_ENCODER), vae=copy.deepcopy(FLUX_VAE),
        resolution=1024, kind="flux", scheduler=dict(FLUX_SCHEDULER), t5_tokens=512,
        published={"transformer_params": 11_901_408_320, "pos_embed_buffer": 0, "transformer_tflop": 74.385,
                   "clip_l_params": 123_060_480, "t5_params": 4_762_310_656, "vae_params": 83_819_683}),
}


def get_flux_preset(name: str) -> DiTPreset:
    if name not in FLUX_PRESETS:
        raise KeyError(f"unknown FLUX architecture preset {name!r}; presets: {', '.join(FLUX_PRESETS)}")
    return FLUX_PRESETS[name]


def build_flux_transformer_from(config: Mapping[str, Any], device: torch.device | str = "meta",
                                seed: int | None = None) -> torch.nn.Module:
    """``FluxTransformer2DModel(**config)``: on "meta" it costs no memory (shapes only)."""
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    # NOTE: fork the device's generator too when the weights are drawn on a GPU (the caller's streams stay)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        if seed is not None:
            torch.manual_seed(seed)
        return FluxTransformer2DModel(**copy.deepcopy(dict(config)))


def build_flux_transformer(name: str, device: torch.device | str = "meta", seed: int | None = None) -> torch.nn.Module:
    return build_flux_transformer_from(get_flux_preset(name).transformer, device, seed)


def build_flux_text_encoders_from(configs: tuple[dict[str, Any], ...],
                                  device: torch.device | str = "meta") -> list[torch.nn.Module]:
    """[CLIP-L ``CLIPTextModel``, T5 encoder] from their config kwargs, the pipeline's encoder order."""
    import transformers
    from transformers import CLIPTextConfig, T5Config

    out = []
    with torch.device(device):
        for cls_name, cfg in zip(FLUX_TEXT_ENCODER_CLASSES, configs, strict=True):
            config = T5Config(**cfg) if cls_name == "T5EncoderModel" else CLIPTextConfig(**cfg)
            out.append(getattr(transformers, cls_name)(config))
    return out


def build_flux_text_encoders(name: str, device: torch.device | str = "meta") -> list[torch.nn.Module]:
    return build_flux_text_encoders_from(get_flux_preset(name).text_encoders, device)


def build_flux_vae(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**copy.deepcopy(get_flux_preset(name).vae))


def transformer_inputs(config: Mapping[str, Any], batch: int, latent_size: int, t5_tokens: int = 512,
                       device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments of one ``FluxTransformer2DModel`` forward (``config``: the model's config) at a
    ``latent_size`` x ``latent_size`` latent (packed 2x2: (latent_size / 2)^2 image tokens), as FluxPipeline
    calls it: T5 states, CLIP-L pooled, ``timestep = sigma``, the guidance embedding when the model has one,
    2-D text / image RoPE ids."""
    from sidscale.families.flux.adapter import latent_image_ids

    c, side = config, latent_size // 2
    kw: dict[str, Any] = {
        "hidden_states": torch.zeros(batch, side * side, c["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.zeros(batch, t5_tokens, c["joint_attention_dim"], device=device, dtype=dtype),
        "pooled_projections": torch.zeros(batch, c["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": latent_image_ids(side, side, "cpu", dtype).to(device),
        "txt_ids": torch.zeros(t5_tokens, 3, device=device, dtype=dtype),
    }
    if c.get("guidance_embeds"):
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return kw


def transformer_forward_flops(name: str, batch: int = 1, t5_tokens: int | None = None) -> int:
    """FLOPs of one transformer forward at the preset's resolution (FlopCounterMode: matmuls, SDPA; 2 per
    MAC), on meta. ``t5_tokens``: default the preset's (512)."""
    from torch.utils.flop_counter import FlopCounterMode

    preset = get_flux_preset(name)
    net = build_flux_transformer(name, "meta")
    kwargs = transformer_inputs(preset.transformer, batch, preset.latent_size,
                                preset.t5_tokens if t5_tokens is None else t5_tokens, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(**kwargs, return_dict=False)
    return int(counter.get_total_flops())
