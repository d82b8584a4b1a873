"""Every family's bench / plan presets behind one lookup: which family owns a preset (its
``FamilySpec.presets``) and that family's networks (``FamilySpec.bench_nets``). The benchmark, the
memory plan, the activation measurement and the random-teacher writer only call these functions."""

from __future__ import annotations

import copy
from typing import Any

import torch

from sidscale.families import SPECS, all_presets, spec_for_preset
from sidscale.families.base import Teacher, resolve
from sidscale.families.flux.presets import SLICES as FLUX_SLICES
from sidscale.families.sd3.presets import SLICES as SD3_SLICES
from sidscale.families.shared.bench_nets import PresetNets

# what the benchmark, the plan and --measure accept
BENCH_PRESETS = PLAN_PRESETS = all_presets()
UNET_PRESETS = SPECS["unet_vp"].presets
SD3_PRESETS = SPECS["sd3"].presets
FLUX_PRESET_NAMES = SPECS["flux"].presets
# Big presets cut to a few blocks at their real width (tools/gpu_check.py --part big): name -> (preset, overrides)
SLICES: dict[str, tuple[str, dict[str, int]]] = {**SD3_SLICES, **FLUX_SLICES}


def preset_nets(preset: str) -> PresetNets:
    """The networks of the family that owns ``preset``."""
    spec = spec_for_preset(preset)
    return resolve(spec.bench_nets)




def latent_shape(preset: str) -> tuple[int, int, int]:
    return preset_nets(preset).latent_shape(preset)


def build_preset_net(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The preset's denoiser (UNet or SD3 transformer) with random weights (``device="meta"``: shapes only)."""
    return preset_nets(preset).build(preset, device, seed)


def build_preset_unet(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The preset's UNet with random weights (``device="meta"``: shapes only); UNet presets only."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"preset {preset!r} has no UNet; UNet presets: {', '.join(UNET_PRESETS)}")
    return build_preset_net(preset, device, seed)


def build_preset_text_encoders(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> list[torch.nn.Module]:
    """The preset's text encoder(s) with random weights; the same seed gives the same weights on every rank."""
    return preset_nets(preset).text_encoders(preset, device, seed)


def preset_net_inputs(preset: str, net: torch.nn.Module, batch: int, device: Any = "meta",
                      dtype: torch.dtype = torch.float32) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of one training forward of ``net`` at the preset's latent size (x_t requires grad)."""
    return preset_nets(preset).inputs(preset, net, batch, device, dtype)


def checkpoint_block_types(preset: str) -> tuple[type, ...]:
    """The module types diffusers wraps one by one when gradient checkpointing is on."""
    return preset_nets(preset).checkpoint_block_types()


def preset_vae_config(preset: str) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of the preset's teacher (what sidscale.testing.random_teacher writes)."""
    return copy.deepcopy(preset_nets(preset).vae_config(preset))


def build_preset_teacher(preset: str, device: torch.device | str, dtype: str = "fp32", seed: int = 0) -> Teacher:
    """A frozen random-weight teacher (network + text encoders, no VAE: training never decodes).

    UNet presets: a VP teacher with a CLIP (SDXL: CLIP-L + bigG) conditioner; SD3 presets: a flow
    teacher with ``SD3Conditioner`` (CLIP-L + CLIP-G + T5, the preset's T5 tokens).
    """
    return preset_nets(preset).teacher(preset, device, dtype, seed)
