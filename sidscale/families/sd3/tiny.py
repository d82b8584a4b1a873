"""A tiny random-weight SD3 / SD3.5 teacher directory, written by diffusers itself, for tests.

Same classes and wiring as the real models (``StableDiffusion3Pipeline.save_pretrained``), shapes
shrunk: CLIP-L width 16, CLIP-G width 24 (both on the real CLIP BPE ids, 77 positions), a one-layer
T5 with d_model 48 over the tiny T5 tokenizer, a 2-layer MMDiT with inner width 16, a 16-channel
VAE that downsamples by 8 with SD3's scaling 1.5305 / shift 0.0609, and SD3's flow scheduler
(shift 3). The widths are all distinct so a swapped or misplaced block shows as a shape or value
error. About 2 M parameters (mostly the two CLIP token tables); ~16 MB on disk, half of it the two
CLIP tokenizer.json files; written in under a second.

NOTE: joint_attention_dim = T5 d_model = 48 > 16 + 24: as in the real models (2048 <= 4096) the
CLIP states are really zero-PADDED up to the joint width (with a T5 narrower than the CLIP sum,
diffusers' F.pad would crop CLIP-G's features instead).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sidscale.core.io import atomic_write_text

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 16, 24, 48
TRANSFORMER_HEADS, TRANSFORMER_HEAD_DIM = 2, 8  # inner width 16
T5_VOCAB_SIZE = 64  # >= len(tiny T5 tokenizer) (39)
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609
VAE_FACTOR = 8  # 4 resolutions: 2 ** 3
INFO_FILE = "tiny_sd3.json"

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline


def tiny_sd3_transformer_config(sd35: bool = True, sample_size: int = 8) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs; ``sd35``: SD3.5-Medium's dual attention (block 0) and RMS
    qk-norm, else SD3-Medium's plain joint blocks."""
    inner = TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM
    return {
        "sample_size": sample_size, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": TRANSFORMER_HEAD_DIM, "num_attention_heads": TRANSFORMER_HEADS,
        "joint_attention_dim": T5_WIDTH,  # the T5 width; the CLIP concat is zero-padded up to it
        "caption_projection_dim": inner,  # must equal the inner width (diffusers LayerNorm shapes)
        "pooled_projection_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,  # the two CLIP pooled projections
        # >= latent side / patch size: twice the default resolution still fits
        "pos_embed_max_size": sample_size,
        "dual_attention_layers": (0,) if sd35 else (),
        "qk_norm": "rms_norm" if sd35 else None,
    }


def _clip_encoder(width: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sidscale.families.unet_vp.tiny import tiny_clip_text_config

    # projection_dim = width: the pooled text_embeds have the encoder's width (768 / 1280 for real)
    return CLIPTextModelWithProjection(CLIPTextConfig(**tiny_clip_text_config(width, projection_dim=width)))


def _clip_tokenizers(scratch: Path):
    """CLIP-L's tokenizer pads with ``<|endoftext|>``; CLIP-G's with ``"!"`` (id 0), as SDXL's second
    tokenizer does, so the two id blocks differ and a swapped tokenizer is visible."""
    from transformers import CLIPTokenizer

    from sidscale.families.shared.tokenizers import write_clip_tokenizer_files

    write_clip_tokenizer_files(scratch)
    tok1 = CLIPTokenizer.from_pretrained(scratch)
    tok2 = CLIPTokenizer.from_pretrained(scratch, pad_token="!")
    if tok2.pad_token_id != 0 or tok1.pad_token_id == tok2.pad_token_id:
        raise RuntimeError(f"tiny SD3 CLIP tokenizers: pad ids {tok1.pad_token_id}, {tok2.pad_token_id}; "
                           "expected 49407 and 0")
    return tok1, tok2


def build_tiny_sd3_pipeline(seed: int = 0, sd35: bool = True, t5: bool = True,
                            sample_size: int = 8) -> StableDiffusion3Pipeline:
    """The in-memory ``StableDiffusion3Pipeline`` (random weights; same seed, same weights; the
    global RNG is left untouched). ``t5=False``: no ``text_encoder_3`` / ``tokenizer_3``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from sidscale.families.shared.tokenizers import build_tiny_t5_tokenizer

    if sample_size < 2 or sample_size % 2:
        raise ValueError(f"tiny SD3 sample_size = {sample_size}: expected an even latent side >= 2 (patch size 2)")
    with tempfile.TemporaryDirectory() as scratch:
        tok1, tok2 = _clip_tokenizers(Path(scratch))
    tok3 = build_tiny_t5_tokenizer() if t5 else None
    if tok3 is not None and len(tok3) > T5_VOCAB_SIZE:
        raise RuntimeError(f"tiny T5 tokenizer has {len(tok3)} ids > tiny T5 vocab_size {T5_VOCAB_SIZE}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1, te2 = _clip_encoder(CLIP_L_WIDTH), _clip_encoder(CLIP_G_WIDTH)
        te3 = None
        if t5:
            te3 = T5EncoderModel(T5Config(
                vocab_size=T5_VOCAB_SIZE, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                use_cache=False, pad_token_id=0, eos_token_id=1))
        transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config(sd35, sample_size))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                            block_out_channels=[8, 8, 16, 16], norm_num_groups=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=sample_size * VAE_FACTOR, scaling_factor=SD3_VAE_SCALING,
                            shift_factor=SD3_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=te3, tokenizer_3=tok3)


def write_tiny_sd3_teacher(path: Path, seed: int = 0, sd35: bool = True, t5: bool = True,
                           sample_size: int = 8) -> Path:
    """Write a complete diffusers SD3 directory (``StableDiffusion3Pipeline.save_pretrained``) plus
    ``tiny_sd3.json`` (kind "sd3", resolution = sample_size * 8 px, the build arguments).

    ``t5=False`` writes no ``text_encoder_3/`` / ``tokenizer_3/`` (model_index.json lists them as null):
    diffusers then loads the dir only as ``StableDiffusion3Pipeline.from_pretrained(path,
    text_encoder_3=None, tokenizer_3=None)``, its documented way to run SD3 without T5; with T5 a
    plain ``from_pretrained(path)`` loads it.

    ``path`` must not exist or be an empty directory: writing over another teacher could leave a
    stale ``text_encoder_3/`` behind. Deterministic given ``seed``; the global RNG is untouched.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"write_tiny_sd3_teacher: {path} exists and is not an empty directory")
    pipe = build_tiny_sd3_pipeline(seed, sd35=sd35, t5=t5, sample_size=sample_size)
    pipe.save_pretrained(path)
    info = {"kind": "sd3", "resolution": sample_size * VAE_FACTOR, "sample_size": sample_size, "seed": seed,
            "sd35": sd35, "t5": t5, "latent_shape": [16, sample_size, sample_size]}
    atomic_write_text(path / INFO_FILE, json.dumps(info, indent=2))
    return path
