"""Load a frozen teacher from a local diffusers directory (never from a hub).

A teacher directory is what ``save_pretrained`` writes: ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``vae/`` (and for SDXL ``text_encoder_2/``, ``tokenizer_2/``).
The built-in toy teacher has the same layout without ``vae/`` (it lives in pixel space).
Presets (sidscale/configs/sd15.yaml, ...) ship placeholder paths; the checks below turn a
placeholder or a half-copied directory into an error that says what a teacher dir must hold.

Memory levers applied here to the teacher UNet (the trainable copies inherit the attention
processors through ``copy.deepcopy``): SDPA attention (diffusers' ``AttnProcessor2_0``, its
default on torch 2) or eager attention, channels-last weights, and the teacher dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sidscale.core.schedule import VPSchedule
from sidscale.errors import ConfigError, TeacherDirError
from sidscale.families.base import Teacher
from sidscale.families.shared.clip import load_conditioner
from sidscale.families.shared.diffusers_dir import (
    DTYPES,
    check_teacher_dir,
    decode_precision,
    load_vae,
    vae_downsampling,
)

ATTENTION_MODES = ("sdpa", "eager")  # teacher.attention (the config lists the same two)

REQUIRED = {
    "toy": ("unet", "text_encoder", "tokenizer", "scheduler"),
    "sd": ("unet", "text_encoder", "tokenizer", "scheduler", "vae"),
    "sdxl": ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler", "vae"),
}


def schedule_from_dir(path: Path, prediction_type: str = "auto") -> VPSchedule:
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    pred = sched.get("prediction_type", "epsilon") if prediction_type == "auto" else prediction_type
    return VPSchedule.from_settings(
        num_train_timesteps=sched.get("num_train_timesteps", 1000),
        beta_start=sched.get("beta_start", 0.00085),
        beta_end=sched.get("beta_end", 0.012), beta_schedule=sched.get("beta_schedule", "scaled_linear"),
        prediction_type=pred,
    )


def set_attention(unet: torch.nn.Module, mode: str = "sdpa") -> None:
    """``sdpa``: torch's fused scaled_dot_product_attention (``AttnProcessor2_0``, flash /
    memory-efficient kernels on GPU, no [B, heads, N, N] matrix kept); ``eager``: the plain
    softmax(QK^T)V processor, the memory-hungry reference."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if mode not in ATTENTION_MODES:
        raise ConfigError(f"teacher.attention = {mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
    unet.set_attn_processor(AttnProcessor2_0() if mode == "sdpa" else AttnProcessor())


def attention_processors(unet: torch.nn.Module) -> set[str]:
    """Class names of the attention processors in use (a check that a mode really applies)."""
    return {type(p).__name__ for p in unet.attn_processors.values()}


def set_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """4-D weights in NHWC: faster convolutions on tensor cores. Affects the frozen teacher only:
    DeepSpeed ZeRO re-lays the trainable copies' parameters out in flat (contiguous) buffers."""
    return module.to(memory_format=torch.channels_last)


def check_unet_matches(unet: torch.nn.Module, path: Path, kind: str) -> None:
    """An SD UNet under kind sdxl (or the reverse) would fail deep in the first forward."""
    is_xl = unet.config.get("addition_embed_type") == "text_time"
    if is_xl != (kind == "sdxl"):
        found = "an SDXL" if is_xl else "a non-SDXL"
        raise TeacherDirError(f"teacher.path {path}: unet/config.json describes {found} UNet "
                              f"(addition_embed_type={unet.config.get('addition_embed_type')!r}) but "
                              f"teacher.kind = {kind!r}")


def load_teacher(cfg: Any, device: torch.device | str = "cpu") -> Teacher:
    """UNet + text conditioner + schedule (+ VAE) of the teacher, frozen, in ``cfg.dtype``."""
    from diffusers import UNet2DConditionModel

    from sidscale.families.toy.fit import resolve_teacher_dir

    path = resolve_teacher_dir(cfg)
    if cfg.kind not in REQUIRED:
        raise TeacherDirError(f"teacher.kind = {cfg.kind!r}: expected one of {', '.join(REQUIRED)}")
    check_teacher_dir(path, cfg.kind, REQUIRED[cfg.kind])
    dtype = DTYPES[cfg.dtype]
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, local_files_only=True)
    check_unet_matches(unet, path, cfg.kind)
    set_attention(unet, cfg.attention)
    if cfg.channels_last:
        set_channels_last(unet)
    unet = unet.to(device).requires_grad_(False).eval()
    conditioner = load_conditioner(path, cfg.kind, dtype, device, resolution=cfg.resolution)
    vae, scaling = None, 1.0
    if (path / "vae").is_dir():
        vae = load_vae(path, dtype, device)
        scaling = float(vae.config.scaling_factor)
    down = vae_downsampling(vae) if vae is not None else 1
    if cfg.resolution % down:
        raise ConfigError(f"teacher.resolution = {cfg.resolution}: must be a multiple of the VAE factor "
                          f"{down}")
    latent_shape = (int(unet.config.in_channels), cfg.resolution // down, cfg.resolution // down)
    return Teacher(path, cfg.kind, unet, conditioner, schedule_from_dir(path, cfg.prediction_type),
                   latent_shape, scaling, vae)


def decode_latents(teacher_vae: torch.nn.Module | None, latents: torch.Tensor,
                   scaling_factor: float) -> torch.Tensor:
    """Latents -> images in [-1, 1] (the toy teacher's latents are already pixels); an fp16 VAE with
    ``force_upcast`` decodes upcast (``decode_precision``)."""
    if teacher_vae is None:
        return latents.float()
    with torch.no_grad(), decode_precision(teacher_vae) as dtype:
        return teacher_vae.decode(latents.to(dtype) / scaling_factor).sample.float()
