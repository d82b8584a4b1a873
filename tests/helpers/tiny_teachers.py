"""Random-init teacher directories in the diffusers layout, for trainer and loader tests."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDPMScheduler

from sidscale.models.tiny import build_tiny_text_encoder, build_tiny_unet
from sidscale.models.tokenizer import build_clip_tokenizer
from sidscale.models.toy import ToyMixture
from sidscale.models.toy_teacher import SD_SCHEDULER_CONFIG


def write_tiny_toy_teacher(path: Path, seed: int = 0, sample_size: int = 8) -> Path:
    """A toy-kind teacher (pixel space, 3 channels) with random weights: fast to build, exact
    enough for comparing two implementations of the same training step."""
    path = Path(path)
    build_tiny_unet(seed, sample_size=sample_size).save_pretrained(path / "unet")
    build_tiny_text_encoder(seed + 1).save_pretrained(path / "text_encoder")
    build_clip_tokenizer(path / "tokenizer")
    DDPMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "toy_mixture.json").write_text(json.dumps(ToyMixture(size=sample_size).to_dict()))
    return path


# ---------------------------------------------------------------------------------------------
# Tiny but shape-faithful Stable Diffusion teachers (4-channel latents, a VAE that downsamples
# by 8 like SD's, the real CLIP tokenizer; SDXL with two encoders and text_time conditioning).
# ---------------------------------------------------------------------------------------------

SDXL_TEXT_HIDDEN = (32, 48)  # encoder 1 / encoder 2 widths: distinct, so a swapped concat shows
SDXL_POOLED_DIM = 40  # encoder 2's projection (the pooled text_embeds)
SDXL_TIME_EMBED_DIM = 8


def tiny_vae(seed: int, scaling_factor: float = 0.18215, sample_size: int = 64):
    """An ``AutoencoderKL`` with SD's 4 resolutions (factor 8) and 4 latent channels, ~50k params."""
    import torch
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
    from sidscale.models.tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((path / name).read_text())
        cfg["pad_token"] = "!"
        (path / name).write_text(json.dumps(cfg, indent=2))


def write_tiny_sdxl_teacher(path: Path, seed: int = 0) -> Path:
    """SDXL-shaped teacher: text_time UNet, CLIPTextModel + CLIPTextModelWithProjection."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sidscale.models.tiny import tiny_clip_text_config

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
