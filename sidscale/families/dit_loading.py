"""Loading shared by the transformer (MMDiT) families, SD3 and FLUX: the UNet-only levers refused,
the transformer read with a check of its class, the VAE."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sidscale.config import ConfigError


def refuse_unet_levers(teacher_cfg, model: str) -> None:
    """teacher.attention / teacher.channels_last tune a UNet; a transformer always uses SDPA."""
    t = teacher_cfg
    if t.attention != "sdpa" or t.channels_last:
        raise ConfigError(f"teacher.attention = {t.attention!r} / teacher.channels_last = {t.channels_last}: "
                          f"these UNet levers do not apply to {model} (it always uses SDPA); "
                          "set teacher.attention=sdpa and teacher.channels_last=false")


def load_transformer(path: Path, network_class: type, kind: str, dtype: torch.dtype,
                     device: torch.device | str) -> torch.nn.Module:
    """``path/transformer`` as a frozen ``network_class`` in ``dtype`` on ``device``; a config of
    another class is a clear error (a directory of another family under this teacher.kind)."""
    config = json.loads((path / "transformer" / "config.json").read_text())
    name = network_class.__name__
    if config.get("_class_name") not in (None, name):
        raise ConfigError(f"teacher.path {path}: transformer/config.json describes a {config.get('_class_name')}, "
                          f"not a {name}, but teacher.kind = {kind!r}")
    net = network_class.from_pretrained(path / "transformer", torch_dtype=dtype, local_files_only=True)
    return net.to(device).requires_grad_(False).eval()


def load_vae(path: Path, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, local_files_only=True)
    return vae.to(device).requires_grad_(False).eval()
