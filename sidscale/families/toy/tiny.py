"""The toy family's tiny teacher: a random-init toy-kind teacher directory (pixel space, 3 channels)."""

from __future__ import annotations

import json
from pathlib import Path

from sidscale.families.shared.tokenizers import build_clip_tokenizer
from sidscale.families.toy.mixture import ToyMixture
from sidscale.families.unet_vp.tiny import SD_SCHEDULER_CONFIG, build_tiny_text_encoder, build_tiny_unet


def write_tiny_toy_teacher(path: Path, seed: int = 0, sample_size: int = 8) -> Path:
    """A toy-kind teacher (pixel space, 3 channels) with random weights: fast to build, exact
    enough for comparing two implementations of the same training step."""
    from diffusers import DDPMScheduler

    path = Path(path)
    build_tiny_unet(seed, sample_size=sample_size).save_pretrained(path / "unet")
    build_tiny_text_encoder(seed + 1).save_pretrained(path / "text_encoder")
    build_clip_tokenizer(path / "tokenizer")
    DDPMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    (path / "toy_mixture.json").write_text(json.dumps(ToyMixture(size=sample_size).to_dict()))
    return path
