"""Random-weight teachers at a preset's real architecture, and the trainer config of one benchmark case.

The benchmark measures the real ``Trainer`` on the real network shapes; only the weights are random
(speed and memory do not depend on them). Two presets exist only here, sized for the CPU:

- ``tiny``: the tiny UNet of tests/tiny_teachers.py (4-channel 8x8 latents, 0.8M parameters) with a
  tiny CLIP text tower;
- ``mid``: SD1.5's topology (same block types, attention layout and 77-token cross-attention) at a
  fifth of its width and 256 px (32x32 latents): 35M parameters, big enough that parameters,
  optimizer states and activations all show in a memory measurement.

The memory plan also takes the published SD3 / SD3.5 presets (sidscale/models/sd3_presets.py),
whose denoiser is an ``SD3Transformer2DModel``; the benchmark (``build_preset_teacher``) does not.
What differs between the two kinds of network (how to build one, its text encoders, its forward
inputs, its latent shape, the blocks gradient checkpointing wraps) is decided in one place,
``preset_nets``; the plan and the activation measurement only call the ``*_preset_*`` functions.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch

from sidscale.config import Config, load_config
from sidscale.models.conditioning import ClipConditioner, SdxlConditioner
from sidscale.models.sd3_presets import DIT_PRESETS
from sidscale.models.teacher import DTYPES, Teacher, set_attention
from sidscale.schedule import VPSchedule

BENCH_PRESETS = ("tiny", "mid", "sd15", "sd21", "sd21_768", "sdxl")
SD3_PRESETS = tuple(DIT_PRESETS)  # sd3_medium, sd35_medium, sd35_large
PLAN_PRESETS = BENCH_PRESETS + SD3_PRESETS  # what the memory plan accepts
TINY_LATENT = (4, 8, 8)
REPO = Path(__file__).resolve().parents[2]


def _mid_preset():
    from sidscale.models.presets import CLIP_L_TEXT, get_preset

    sd15 = get_preset("sd15")
    unet = {**sd15.unet, "block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 256, "sample_size": 32}
    text = {**CLIP_L_TEXT, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "projection_dim": 256}
    return replace(sd15, name="mid", unet=unet, text_encoders=(text,), resolution=256, published={})


def arch_preset(preset: str):
    """The ``ArchPreset`` of a published preset, or of ``mid``."""
    from sidscale.models.presets import get_preset

    return _mid_preset() if preset == "mid" else get_preset(preset)


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked configuration of the trainer (per rank: micro_batch x accumulation samples)."""

    preset: str
    zero: int = 2
    precision: str = "bf16"
    micro_batch: int = 1
    accumulation: int = 1
    grad_checkpointing: bool = False
    teacher_dtype: str | None = None  # default: the training precision (fp32 when training in fp32)
    reduce_bucket_size: int | None = None  # elements; default: the ds_configs/zero{zero}.json value
    compile_backend: str | None = None  # train.compile with this backend; None: eager

    @property
    def label(self) -> str:
        ckpt = "+ckpt" if self.grad_checkpointing else ""
        rbs = f"+rbs{self.reduce_bucket_size:.0e}".replace("+0", "") if self.reduce_bucket_size else ""
        comp = f"+compile({self.compile_backend})" if self.compile_backend else ""
        return (f"{self.preset}/zero{self.zero}/{self.precision}/mb{self.micro_batch}x{self.accumulation}"
                f"{ckpt}{rbs}{comp}")

    def ds_config_path(self) -> str:
        """ds_configs/zero{zero}.json, or a copy of it with this case's bucket sizes."""
        path = f"ds_configs/zero{self.zero}.json"
        if self.reduce_bucket_size is None:
            return path
        ds = json.loads((REPO / path).read_text())
        zero = ds["zero_optimization"]
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if key in zero:
                zero[key] = int(self.reduce_bucket_size)
        out = Path(tempfile.mkdtemp(prefix="sidscale-bench-ds-")) / f"zero{self.zero}.json"
        out.write_text(json.dumps(ds, indent=2))
        return str(out)

    def resolved_teacher_dtype(self) -> str:
        return self.teacher_dtype or self.precision


@lru_cache(maxsize=1)
def _tokenizer():
    from sidscale.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(Path(tempfile.mkdtemp(prefix="sidscale-bench-tok-")) / "tokenizer")


class PresetNets(Protocol):
    """What the perf tools need to know about one kind of denoiser network (see ``preset_nets``)."""

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module: ...
    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]: ...
    def latent_shape(self, preset: str) -> tuple[int, int, int]: ...
    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]: ...
    def checkpoint_block_types(self) -> tuple[type, ...]: ...


class _UNetNets:
    """UNet2DConditionModel presets: SD1.x/2.x/XL and the CPU-sized ``tiny`` / ``mid``."""

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        if preset == "tiny":
            from sidscale.models.tiny import build_tiny_unet

            with torch.device(device):
                return build_tiny_unet(seed, in_channels=4, sample_size=8, cross_attention_dim=32)
        if preset == "mid":
            from diffusers import UNet2DConditionModel

            device = torch.device(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
                torch.manual_seed(seed)
                return UNet2DConditionModel(**arch_preset("mid").unet)
        from sidscale.models.presets import build_unet

        return build_unet(preset, device=device, seed=seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        if preset == "tiny":
            from sidscale.models.tiny import build_tiny_text_encoder

            with torch.device(device):
                return [build_tiny_text_encoder(1 + seed, hidden_size=32)]
        device = torch.device(device)
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)  # NOTE: seeds the CUDA generator too: the weights are drawn on the device
            if preset == "mid":
                from transformers import CLIPTextConfig, CLIPTextModel

                with device:
                    return [CLIPTextModel(CLIPTextConfig(**arch_preset("mid").text_encoders[0]))]
            from sidscale.models.presets import build_text_encoders

            return build_text_encoders(preset, device=device)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        if preset == "tiny":
            return TINY_LATENT
        p = arch_preset(preset)
        return (int(p.unet["in_channels"]), p.latent_size, p.latent_size)

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        from sidscale.perf.activations import unet_inputs

        return unet_inputs(net, batch, self.latent_shape(preset)[1], device, dtype)

    def checkpoint_block_types(self) -> tuple[type, ...]:
        # diffusers' UNet checkpoints each resnet and each transformer one by one
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return (ResnetBlock2D, Transformer2DModel)


class _SD3Nets:
    """SD3Transformer2DModel presets (SD3-Medium, SD3.5-Medium/Large): CLIP-L + bigG + T5-XXL."""

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        from sidscale.models.sd3_presets import build_sd3_transformer

        return build_sd3_transformer(preset, device=device, seed=seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        from sidscale.models.sd3_presets import build_sd3_text_encoders

        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return build_sd3_text_encoders(preset, device=device)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        from sidscale.models.sd3_presets import get_dit_preset

        return get_dit_preset(preset).latent_shape

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        from sidscale.models.sd3_presets import get_dit_preset, transformer_inputs

        p = get_dit_preset(preset)
        kw = transformer_inputs(net.config, batch, self.latent_shape(preset)[1], p.t5_tokens, device, dtype)
        # x_t requires grad in the generator step (it comes from G); the text embeddings never do
        kw["hidden_states"].requires_grad_(True)
        return (), kw

    def checkpoint_block_types(self) -> tuple[type, ...]:
        from diffusers.models.attention import JointTransformerBlock

        return (JointTransformerBlock,)


_NETS: dict[str, PresetNets] = {"unet": _UNetNets(), "sd3": _SD3Nets()}


def preset_nets(preset: str) -> PresetNets:
    """The one place that decides, per preset, which kind of denoiser network it has."""
    if preset in SD3_PRESETS:
        return _NETS["sd3"]
    if preset in BENCH_PRESETS:
        return _NETS["unet"]
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PLAN_PRESETS)}")


def latent_shape(preset: str) -> tuple[int, int, int]:
    return preset_nets(preset).latent_shape(preset)


def build_preset_net(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The preset's denoiser (UNet or SD3 transformer) with random weights (``device="meta"``: shapes only)."""
    return preset_nets(preset).build(preset, device, seed)


def build_preset_unet(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The preset's UNet with random weights (``device="meta"``: shapes only); UNet presets only."""
    if preset not in BENCH_PRESETS:
        raise ValueError(f"preset {preset!r} has no UNet; UNet presets: {', '.join(BENCH_PRESETS)}")
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


def build_preset_teacher(preset: str, device: torch.device, dtype: str = "fp32", seed: int = 0) -> Teacher:
    """A frozen random-weight teacher (UNet + text encoders, no VAE: training never decodes)."""
    if preset not in BENCH_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(BENCH_PRESETS)}")
    torch_dtype = DTYPES[dtype]
    unet = build_preset_unet(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
    set_attention(unet, "sdpa")
    encoders = [e.to(device=device, dtype=torch_dtype) for e in build_preset_text_encoders(preset, device, seed)]
    tok = _tokenizer()
    kind = "sdxl" if preset == "sdxl" else "sd"
    if kind == "sdxl":
        conditioner: ClipConditioner = SdxlConditioner(tok, tok, encoders[0], encoders[1],
                                                       arch_preset(preset).resolution, dtype=torch_dtype)
    else:
        conditioner = ClipConditioner(tok, encoders[0], dtype=torch_dtype)
    pred = "v_prediction" if preset == "sd21_768" else "epsilon"
    # NOTE: a path without toy_mixture.json: the trainer's indexed:toy prompts fall back to the default prompts.
    path = Path(tempfile.gettempdir()) / f"sidscale-bench-{preset}"
    return Teacher(path, kind, unet, conditioner, VPSchedule.from_settings(prediction_type=pred),
                   latent_shape(preset), 0.18215, None)


def case_config(case: BenchCase, world_size: int, seed: int = 0) -> Config:
    """The trainer config of ``case``: the toy preset's method settings, the case's systems knobs."""
    ckpt = str(case.grad_checkpointing).lower()
    overrides = [
        f"teacher.kind={'sdxl' if case.preset == 'sdxl' else 'sd'}", f"teacher.path=preset:{case.preset}",
        f"teacher.dtype={case.resolved_teacher_dtype()}", f"teacher.grad_checkpointing={ckpt}",
        f"generator.grad_checkpointing={ckpt}", f"fake.grad_checkpointing={ckpt}",
        f"train.precision={case.precision}", f"train.micro_batch={case.micro_batch}",
        f"train.global_batch={case.micro_batch * case.accumulation * world_size}", f"train.seed={seed}",
        "data.shards=indexed:toy", f"deepspeed.config={case.ds_config_path()}", "eval.num_samples=0",
    ]
    if case.compile_backend:
        overrides += ["train.compile=true", f"train.compile_backend={case.compile_backend}"]
    return load_config("toy", overrides)
