"""What the memory plan measures of a preset's networks, without weights: element counts on the meta
device, saved-activation and no-grad bytes per sample, the checkpointed blocks, and the VAE decode's cost
traced on the CPU. Cached per preset: the largest-micro-batch search plans every candidate. The model they
feed is ``sidscale.perf.memory_plan``'s docstring."""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from sidscale.families.presets import (
    build_preset_net,
    build_preset_text_encoders,
    checkpoint_block_types,
    latent_shape,
    preset_net_inputs,
    preset_vae_config,
)
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.perf.activations import net_saved_bytes
from sidscale.perf.zero_terms import NetCounts, counts_of


@lru_cache(maxsize=8)
def param_counts(preset: str) -> tuple[int, int]:
    """(denoiser parameters, text-encoder parameters), counted on meta."""
    net = sum(p.numel() for p in build_preset_net(preset, "meta").parameters())
    text = sum(p.numel() for e in build_preset_text_encoders(preset, "meta") for p in e.parameters())
    return net, text


@lru_cache(maxsize=8)
def buffer_elements(preset: str) -> int:
    """Elements of the denoiser's floating-point buffers (SD3's pos_embed; 0 for the UNets), on meta."""
    return sum(b.numel() for b in build_preset_net(preset, "meta").buffers() if b.is_floating_point())


@lru_cache(maxsize=8)
def largest_module_params(preset: str) -> tuple[int, int]:
    """(denoiser, text encoders): the most parameters one module owns directly, what ZeRO-3 gathers at once."""
    def largest(modules) -> int:
        return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in modules), default=0)

    net = largest(build_preset_net(preset, "meta").modules())
    text = max((largest(e.modules()) for e in build_preset_text_encoders(preset, "meta")), default=0)
    return net, text


@lru_cache(maxsize=32)
def activation_bytes_per_sample(preset: str, dtype_name: str, trainable: bool, grad_checkpointing: bool) -> float:
    """Saved bytes per sample of one forward of the preset's network at its latent size (meta device).

    ``trainable``: weights require grad (G, and the fake net in its own step); else frozen weights
    with an input that requires grad (fake net and teacher in the generator step).
    """
    dtype = DTYPES[dtype_name]
    net = build_preset_net(preset, "meta").to(dtype).requires_grad_(trainable)
    return (net_saved_bytes(preset, net, 4, dtype, grad_checkpointing)
            - net_saved_bytes(preset, net, 2, dtype, grad_checkpointing)) / 2


@lru_cache(maxsize=16)
def text_condition_bytes_per_sample(preset: str, dtype_name: str) -> float:
    """Bytes of one sample's text conditioning as the denoiser takes it (every input tensor of one
    training forward but x_t (ids included): prompt embeddings, pooled embeddings, the timestep), at batch 1 on meta."""
    dtype = DTYPES[dtype_name]
    net = build_preset_net(preset, "meta").to(dtype)
    args, kw = preset_net_inputs(preset, net, 1, "meta", dtype)
    # x_t is the one input that requires grad (preset_net_inputs)
    tensors = [t for t in (*args, *kw.values()) if isinstance(t, torch.Tensor) and not t.requires_grad]
    return float(sum(t.numel() * t.element_size() for t in tensors))


@lru_cache(maxsize=16)  # NOTE: the largest-micro-batch search asks for it once per phase and candidate
def checkpoint_blocks(preset: str) -> int:
    """Modules diffusers checkpoints one by one (UNet: each resnet and each transformer; SD3: each block)."""
    types = checkpoint_block_types(preset)
    return sum(isinstance(m, types) for m in build_preset_net(preset, "meta").modules())


# latent sides of the decodes measured on the CPU: big enough that every stage's tensors scale with the pixels
# (FLUX's VAE in bf16: the same bytes per pixel at 8x8 and 16x16 latents), small enough to take a second
_DECODE_PROBE_LATENTS = (8, 16)


@lru_cache(maxsize=16)
def nograd_bytes_per_sample(preset: str, dtype_name: str) -> float:
    """Peak transient bytes per sample of a no-grad forward of the preset's network (a preview, a teacher
    sample), on meta (``sidscale.perf.activations.nograd_forward_peak_bytes``). Linear in the batch:
    batch 2 measured 2.00 x batch 1 for flux_dev, sd35_large and sdxl, so one sample is measured."""
    from sidscale.perf.activations import nograd_forward_peak_bytes

    net = build_preset_net(preset, "meta").to(DTYPES[dtype_name]).requires_grad_(False)
    return float(nograd_forward_peak_bytes(preset, net, 1, DTYPES[dtype_name]))


def vae_key(config: dict) -> str:
    """The decode's memory depends on the architecture only, not on scaling / shift factors."""
    return json.dumps({k: v for k, v in config.items() if k not in ("scaling_factor", "shift_factor")},
                      sort_keys=True)


@lru_cache(maxsize=8)
def vae_params(config_key: str) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKL(**json.loads(config_key)).parameters())


@lru_cache(maxsize=8)
def vae_decode_cost(config_key: str, dtype_name: str) -> tuple[float, float]:
    """(bytes per output pixel, bytes per image) of one image's ``vae.decode`` peak: the CPU allocator's trace
    (sidscale.perf.measured_memory) of decodes at two small latent sizes, a line through them. Every tensor
    of a convolutional decoder scales with the pixels (the mid-block attention too, with the GPU's
    memory-efficient kernels); the per-image part is what does not (small VAEs' norms and time embeddings)."""
    from diffusers import AutoencoderKL

    from sidscale.perf.measured_memory import cpu_allocation_trace

    config = json.loads(config_key)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae = vae.to_empty(device="cpu").to(DTYPES[dtype_name]).requires_grad_(False)
    for t in vae.parameters():  # the memory does not depend on the values; zeros keep the kernels on their fast path
        t.zero_()
    factor = 2 ** (len(config.get("block_out_channels", [64])) - 1)
    points = []
    for s in _DECODE_PROBE_LATENTS:
        z = torch.zeros(1, int(config.get("latent_channels", 4)), s, s, dtype=DTYPES[dtype_name])
        with torch.no_grad(), cpu_allocation_trace() as trace:
            vae.decode(z)
        points.append(((s * factor) ** 2, trace.peak_bytes()))
    (p0, b0), (p1, b1) = points
    per_pixel = (b1 - b0) / (p1 - p0)
    return per_pixel, max(0.0, b1 - per_pixel * p1)


def decode_dtype(config: dict, teacher_dtype: str) -> str:
    """What the decode runs in (sidscale.families.shared.diffusers_dir.decode_precision): an fp16 VAE with
    ``force_upcast`` (diffusers' default) decodes in fp32, the others in their own dtype."""
    return "fp32" if teacher_dtype == "fp16" and config.get("force_upcast", True) else teacher_dtype


def preview_decode_bytes(preset: str, teacher_dtype: str, images: int) -> float:
    """Transient bytes of decoding ``images`` preview images of ``preset`` in one call: the decode's
    peak plus the fp32 images it returns (an fp16 VAE upcast to fp32 also holds an fp32 copy of its weights)."""
    config = preset_vae_config(preset)
    dtype = decode_dtype(config, teacher_dtype)
    _, h, w = latent_shape(preset)
    factor = 2 ** (len(config.get("block_out_channels", [64])) - 1)
    pixels = h * factor * w * factor
    upcast = 2.0 * vae_params(vae_key(config)) if dtype != teacher_dtype else 0.0
    per_pixel, per_image = vae_decode_cost(vae_key(config), dtype)
    return images * (pixels * (per_pixel + 3 * 4) + per_image) + upcast


@lru_cache(maxsize=8)
def preset_counts(preset: str) -> NetCounts:
    return counts_of(build_preset_net(preset, "meta"), 0)
