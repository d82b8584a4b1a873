"""A tiny random-weight FLUX.1-dev-shaped teacher directory, written by diffusers itself, for tests.

Same classes and wiring as the real model (``FluxPipeline.save_pretrained``), shapes shrunk: a
CLIP-L ``CLIPTextModel`` of width 16 on the real CLIP BPE ids (77 positions; its pooled output is
the transformer's ``pooled_projections``), a one-layer T5 encoder with d_model 48 over the tiny T5
tokenizer, a FluxTransformer2DModel with one double-stream and one single-stream block, 2 heads x
16 (RoPE axes 4 + 6 + 6 = 16), the guidance embedding on (FLUX.1-dev; ``guidance_embeds=False`` is
schnell's layout), a 16-channel VAE that downsamples by 8 with FLUX's scaling 0.3611 / shift
0.1159, and FLUX's dynamically shifted flow scheduler. Widths are distinct (16 / 32 / 48) so a
swapped input shows as a shape error. ~1.6 M parameters (mostly CLIP's token table), written in
about a second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sidscale.core.io import atomic_write_text

CLIP_L_WIDTH, T5_WIDTH = 16, 48
TRANSFORMER_HEADS, TRANSFORMER_HEAD_DIM = 2, 16  # inner width 32
T5_VOCAB_SIZE = 64  # >= len(tiny T5 tokenizer) (39)
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
VAE_FACTOR = 8
INFO_FILE = "tiny_flux.json"
# FLUX.1-dev's scheduler_config.json (FlowMatchEulerDiscreteScheduler with the resolution-dependent shift)
FLUX_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                                  "max_image_seq_len": 4096}

if TYPE_CHECKING:
    from diffusers import FluxPipeline


def tiny_flux_transformer_config(guidance_embeds: bool = True) -> dict[str, Any]:
    """``FluxTransformer2DModel`` kwargs (the packed input: 16 latent channels x 2 x 2 = 64)."""
    return {
        "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 1, "num_single_layers": 1,
        "attention_head_dim": TRANSFORMER_HEAD_DIM, "num_attention_heads": TRANSFORMER_HEADS,
        "joint_attention_dim": T5_WIDTH,  # reads T5 states
        "pooled_projection_dim": CLIP_L_WIDTH,  # reads CLIP-L's pooled output
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (4, 6, 6),  # must sum to attention_head_dim (FLUX: 16 + 56 + 56 = 128)
    }


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, sample_size: int = 8) -> FluxPipeline:
    """The in-memory ``FluxPipeline`` (random weights; same seed, same weights; the global RNG is left
    untouched). ``sample_size``: the latent side (even: FLUX packs 2x2)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from sidscale.families.shared.tokenizers import build_tiny_t5_tokenizer, write_clip_tokenizer_files
    from sidscale.families.unet_vp.tiny import tiny_clip_text_config

    if sample_size < 2 or sample_size % 2:
        raise ValueError(f"tiny FLUX sample_size = {sample_size}: expected an even latent side >= 2 (2x2 packing)")
    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer_files(scratch)
        tok1 = CLIPTokenizer.from_pretrained(scratch)
    tok2 = build_tiny_t5_tokenizer()
    if len(tok2) > T5_VOCAB_SIZE:
        raise RuntimeError(f"tiny T5 tokenizer has {len(tok2)} ids > tiny T5 vocab_size {T5_VOCAB_SIZE}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(CLIP_L_WIDTH)))
        te2 = T5EncoderModel(T5Config(
            vocab_size=T5_VOCAB_SIZE, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, pad_token_id=0, eos_token_id=1))
        transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(guidance_embeds))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                            block_out_channels=[8, 8, 16, 16], norm_num_groups=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=sample_size * VAE_FACTOR, scaling_factor=FLUX_VAE_SCALING,
                            shift_factor=FLUX_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2,
                        tokenizer_2=tok2, transformer=transformer)


def write_tiny_flux_teacher(path: Path, seed: int = 0, guidance_embeds: bool = True, sample_size: int = 8) -> Path:
    """Write a complete diffusers FLUX directory (``FluxPipeline.save_pretrained``; a plain
    ``FluxPipeline.from_pretrained(path)`` loads it) plus ``tiny_flux.json`` (kind "flux", resolution =
    sample_size * 8 px, the build arguments). ``path`` must not exist or be an empty directory.
    Deterministic given ``seed``; the global RNG is untouched."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"write_tiny_flux_teacher: {path} exists and is not an empty directory")
    pipe = build_tiny_flux_pipeline(seed, guidance_embeds=guidance_embeds, sample_size=sample_size)
    pipe.save_pretrained(path)
    info = {"kind": "flux", "resolution": sample_size * VAE_FACTOR, "sample_size": sample_size, "seed": seed,
            "guidance_embeds": guidance_embeds, "latent_shape": [16, sample_size, sample_size]}
    atomic_write_text(path / INFO_FILE, json.dumps(info, indent=2))
    return path
