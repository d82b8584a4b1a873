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
    (path / "toy_mixture.json").write_text(json.dumps(ToyMixture().to_dict()))
    return path
