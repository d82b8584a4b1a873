"""What the bench, the memory plan and the random-teacher writer know of a family's architectures
(its ``FamilySpec.bench_nets``): random-weight networks at a preset's real shapes (speed and memory
do not depend on the weights), their forward inputs and a frozen random teacher built from them."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch

from sidscale.families.base import Teacher


@contextlib.contextmanager
def weights_drawn_on(device: torch.device | str, seed: int | None) -> Iterator[torch.device]:
    """Build a network's random weights on ``device`` from ``seed`` (None: the current streams) without
    moving the caller's random streams: the CPU generator and, when the weights are drawn on a GPU, that
    device's generator too are forked and restored on exit."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        if seed is not None:
            torch.manual_seed(seed)
        yield device


class PresetNets(Protocol):
    """What the perf tools need to know about one kind of denoiser network (see ``preset_nets``)."""

    name: str  # "unet" | "sd3" | "flux"
    presets: tuple[str, ...]  # the presets it builds (CPU-sized ones first)

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module: ...
    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]: ...
    def latent_shape(self, preset: str) -> tuple[int, int, int]: ...
    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]: ...
    def checkpoint_block_types(self) -> tuple[type, ...]: ...
    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher: ...
    def teacher_kind(self, preset: str) -> str: ...
    def vae_config(self, preset: str) -> dict[str, Any]: ...
    def text_encoder_configs(self, preset: str) -> list[dict[str, Any]]: ...
    def text_encoder_class(self, preset: str, index: int) -> str: ...  # a transformers class name
    def config_preset(self, preset: str) -> str: ...
    def case_config_base(self, preset: str) -> tuple[str, list[str]]: ...


@lru_cache(maxsize=1)
def bench_clip_tokenizer() -> Any:
    from sidscale.families.shared.tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(Path(tempfile.mkdtemp(prefix="sidscale-bench-tok-")) / "tokenizer")


@lru_cache(maxsize=1)
def bench_t5_tokenizer() -> Any:
    # The tiny offline T5 tokenizer (no sentencepiece model here): its ids (< 39) are valid for every
    # T5 vocabulary, and the speed of an encoder does not depend on which ids it reads.
    from sidscale.families.shared.tokenizers import build_tiny_t5_tokenizer

    return build_tiny_t5_tokenizer()


def bench_teacher_path(preset: str) -> Path:
    # NOTE: a path without toy_mixture.json: the trainer's indexed:toy prompts fall back to the default prompts.
    return Path(tempfile.gettempdir()) / f"sidscale-bench-{preset}"


def slice_preset(preset: Any, name: str, blocks: dict[str, int]) -> Any:
    """``preset`` (a ``DiTPreset``) cut to ``blocks`` at its real width, tokens and text encoders (what one
    GPU can measure of a model it cannot hold: tools/gpu_check.py --part big)."""
    return replace(preset, name=name, transformer={**copy.deepcopy(preset.transformer), **blocks}, published={})
