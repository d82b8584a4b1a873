"""Write a random-weight teacher directory of a preset architecture, in the diffusers layout.

The GPU check (tools/gpu_check.sh) runs the real trainer through ``main()``, which loads its
teacher from disk with ``load_teacher``. No real weights can be downloaded, so this writes what
``save_pretrained`` would have written for a released checkpoint, with random weights: the
preset's UNet (sidscale/models/presets.py, or the benchmark-only ``tiny`` / ``mid`` presets of
sidscale/perf/setup.py), its text encoder(s) and VAE, the CLIP tokenizer built offline from
open_clip's BPE vocabulary, and SD's scheduler config. Speed, memory and every code path of a run
are those of the real teacher; only the images are noise.

    write_random_teacher("/tmp/sd15-random", "sd15", dtype="bf16")   # ~2.1 GB on disk

Weights are saved in ``dtype`` (safetensors): bf16 halves the SD1.5 UNet to 1.7 GB, and
``load_teacher`` casts to ``teacher.dtype`` on load whatever the file holds. A
``random_teacher.json`` beside the folders says what was written (``kind`` and ``resolution``
are the trainer's ``teacher.kind`` / ``teacher.resolution`` for this directory).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from sidscale.models.teacher import DTYPES

INFO_FILE = "random_teacher.json"
PRESETS = ("tiny", "mid", "sd15", "sd21", "sd21_768", "sdxl")

# The VAE of the ``tiny`` preset: SD's 4 resolutions (factor 8) and 4 latent channels at ~50k
# parameters, so a CPU decodes a preview in milliseconds (same shape as tests/tiny_teachers.py's).
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 64, "scaling_factor": 0.18215,
}
TINY_RESOLUTION = 64  # the tiny UNet's 8x8 latents through the factor-8 VAE


def _kind(preset: str) -> str:
    return "sdxl" if preset == "sdxl" else "sd"


def _resolution(preset: str) -> int:
    from sidscale.perf.setup import arch_preset

    return TINY_RESOLUTION if preset == "tiny" else arch_preset(preset).resolution


def _prediction_type(preset: str) -> str:
    from sidscale.perf.setup import arch_preset

    return "epsilon" if preset == "tiny" else arch_preset(preset).prediction_type


def text_encoder_configs(preset: str, text_layers: int | None = None) -> list[dict[str, Any]]:
    """CLIPTextConfig kwargs of the preset's encoder(s); ``text_layers`` shortens each tower (a
    faster, smaller stand-in with the same widths, so the UNet's cross-attention still fits)."""
    if preset == "tiny":
        from sidscale.models.tiny import tiny_clip_text_config

        configs = [tiny_clip_text_config(32)]
    else:
        from sidscale.perf.setup import arch_preset

        configs = [copy.deepcopy(c) for c in arch_preset(preset).text_encoders]
    if text_layers is not None:
        if text_layers < 1:
            raise ValueError(f"text_layers = {text_layers}: expected a positive number of layers")
        # SDXL reads the penultimate hidden state: keep at least two layers so that is not the embedding.
        for c in configs:
            c["num_hidden_layers"] = max(text_layers, 2 if preset == "sdxl" else 1)
    return configs


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _build_text_encoders(preset: str, text_layers: int | None, seed: int) -> list[torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for i, cfg in enumerate(text_encoder_configs(preset, text_layers)):
        # SDXL's second encoder carries the pooled projection (text_embeds).
        cls = CLIPTextModelWithProjection if preset == "sdxl" and i == 1 else CLIPTextModel
        out.append(_seeded(seed + 1 + i, lambda cls=cls, cfg=cfg: cls(CLIPTextConfig(**cfg))))
    return out


def _build_vae(preset: str, seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    if preset == "tiny":
        config = dict(TINY_VAE)
    else:
        from sidscale.perf.setup import arch_preset

        config = copy.deepcopy(arch_preset(preset).vae)
    return _seeded(seed + 10, lambda: AutoencoderKL(**config))


def _write_tokenizer(path: Path, pad_token: str | None = None) -> None:
    from sidscale.models.tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(path)
    if pad_token is not None:  # SDXL's second tokenizer pads with "!" (id 0), as the released one does
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg = json.loads((path / name).read_text())
            cfg["pad_token"] = pad_token
            (path / name).write_text(json.dumps(cfg, indent=2))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_random_teacher(out_dir: str | Path, preset: str, dtype: str = "bf16", text_layers: int | None = None,
                         seed: int = 0) -> dict[str, Any]:
    """Write the teacher directory and return its ``random_teacher.json`` content.

    The networks are built on the CPU (the same weights on every machine for a seed), cast to
    ``dtype`` and saved one at a time, so the peak host memory is about one fp32 UNet.
    """
    from diffusers import DDPMScheduler

    from sidscale.models.toy_teacher import SD_SCHEDULER_CONFIG
    from sidscale.perf.setup import build_preset_unet

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    counts: dict[str, int] = {}

    unet = build_preset_unet(preset, "cpu", seed)
    counts["unet"] = _count(unet)
    unet.to(torch_dtype).save_pretrained(out / "unet")
    del unet
    names = ["text_encoder", "text_encoder_2"]
    for name, encoder in zip(names, _build_text_encoders(preset, text_layers, seed), strict=False):
        counts[name] = _count(encoder)
        encoder.to(torch_dtype).save_pretrained(out / name)
    _write_tokenizer(out / "tokenizer")
    if preset == "sdxl":
        _write_tokenizer(out / "tokenizer_2", pad_token="!")
    vae = _build_vae(preset, seed)
    counts["vae"] = _count(vae)
    vae.to(torch_dtype).save_pretrained(out / "vae")
    scheduler = {**SD_SCHEDULER_CONFIG, "prediction_type": _prediction_type(preset)}
    DDPMScheduler(**scheduler).save_pretrained(out / "scheduler")

    info = {
        "preset": preset, "kind": _kind(preset), "resolution": _resolution(preset), "dtype": dtype, "seed": seed,
        "text_layers": text_layers, "parameters": counts,
        "bytes_on_disk": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "note": "random weights: for systems checks (speed, memory, code paths), never for images",
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def read_info(teacher_dir: str | Path) -> dict[str, Any]:
    path = Path(teacher_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a random teacher directory (written by tools/write_random_teacher.py)")
    return json.loads(path.read_text())
