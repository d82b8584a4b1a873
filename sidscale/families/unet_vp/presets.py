"""The published Stable Diffusion architectures, written into code.

These are the ``config.json`` files of the released diffusers checkpoints (SD1.5, SD2.1-base,
SD2.1-768, SDXL-base-1.0), minus keys equal to the diffusers defaults. They let us build the
real-size networks with random weights, or on the meta device (no memory) to count parameters
and FLOPs, without any download:

    unet = build_unet("sdxl", device="meta")
    count_parameters(unet)                      # 2,567,463,684
    unet_forward_flops("sd15") / 1e12           # 0.803 (batch 1, 77 tokens, 64x64 latents)

Weights never come from here: a teacher is always loaded from a local directory (teacher.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sidscale.core.schedule import VPSchedule
from sidscale.families.base import Teacher
from sidscale.families.shared.bench_nets import bench_clip_tokenizer, bench_teacher_path, weights_drawn_on
from sidscale.families.shared.clip import ClipConditioner, SdxlConditioner
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.families.unet_vp.loading import set_attention

# CLIP ViT-L/14 text tower (OpenAI): SD1.5's encoder and SDXL's first encoder.
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# OpenCLIP ViT-H/14 text tower, SD2.x: diffusers ships 23 of its 24 layers (SD2 reads the
# penultimate layer, so the last one is dropped from the checkpoint).
OPENCLIP_H_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512,
}
# OpenCLIP ViT-bigG/14 text tower with its projection: SDXL's second encoder (pooled embedding).
OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}

_SD_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}

_SD1_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    # NOTE: diffusers' legacy name: for SD1.x this is the number of heads (8), not their width.
    "attention_head_dim": 8,
}
_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG), concatenated
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
}


@dataclass(frozen=True)
class ArchPreset:
    """One published teacher architecture (configs only; no weights)."""

    name: str
    kind: str  # teacher.kind: sd | sdxl
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # SDXL: (CLIP-L, bigG with projection)
    vae: dict[str, Any]
    resolution: int  # native image size in pixels
    prediction_type: str = "epsilon"
    published: dict[str, float] = field(default_factory=dict)  # published numbers (docs/method.md 10)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8


PRESETS: dict[str, ArchPreset] = {
    "sd15": ArchPreset("sd15", "sd", _SD1_UNET, (CLIP_L_TEXT,), _SD_VAE, 512,
                       published={"unet_params": 859_520_964, "unet_tflop": 0.803}),
    "sd21": ArchPreset("sd21", "sd", _SD2_UNET, (OPENCLIP_H_TEXT,), _SD_VAE, 512),
    "sd21_768": ArchPreset("sd21_768", "sd", {**_SD2_UNET, "sample_size": 96, "upcast_attention": True},
                           (OPENCLIP_H_TEXT,), {**_SD_VAE, "sample_size": 768}, 768, "v_prediction"),
    "sdxl": ArchPreset("sdxl", "sdxl", _SDXL_UNET, (CLIP_L_TEXT, OPENCLIP_BIGG_TEXT),
                       {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}, 1024,
                       published={"unet_params": 2_567_463_684, "unet_tflop": 6.761}),
}


def get_preset(name: str) -> ArchPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown architecture preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def unet_config(name: str) -> dict[str, Any]:
    return copy.deepcopy(get_preset(name).unet)


def build_unet(name: str, device: torch.device | str = "meta", seed: int | None = None) -> torch.nn.Module:
    """The preset's ``UNet2DConditionModel``: on "meta" it costs no memory (shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config(name))


def build_text_encoders(name: str, device: torch.device | str = "meta") -> list[torch.nn.Module]:
    """The preset's text encoder(s); SDXL's second one carries the pooled projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(name)
    out = []
    with torch.device(device):
        for i, cfg in enumerate(preset.text_encoders):
            cls = CLIPTextModelWithProjection if preset.kind == "sdxl" and i == 1 else CLIPTextModel
            out.append(cls(CLIPTextConfig(**cfg)))
    return out


def build_vae(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**copy.deepcopy(get_preset(name).vae))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_dummy_inputs(name: str, batch: int = 1, tokens: int = 77,
                      device: torch.device | str = "meta") -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of one UNet forward at the preset's native latent size."""
    preset = get_preset(name)
    cfg = preset.unet
    s = preset.latent_size
    x = torch.zeros(batch, cfg["in_channels"], s, s, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, tokens, cfg["cross_attention_dim"],
                                                                   device=device)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = preset.text_encoders[-1]["projection_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device=device),
                                       "time_ids": torch.zeros(batch, 6, device=device)}
    return (x, t), kwargs


def unet_forward_flops(name: str, batch: int = 1, tokens: int = 77) -> int:
    """FLOPs of one UNet forward (FlopCounterMode counts matmuls/convs/SDPA, 2 per MAC), on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(name, "meta")
    args, kwargs = unet_dummy_inputs(name, batch, tokens, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*args, **kwargs)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------- bench / plan networks
UNET_PRESETS = ("tiny", "mid", "sd15", "sd21", "sd21_768", "sdxl")
TINY_LATENT = (4, 8, 8)


def _mid_preset() -> ArchPreset:
    sd15 = get_preset("sd15")
    unet = {**sd15.unet, "block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 256, "sample_size": 32}
    text = {**CLIP_L_TEXT, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "projection_dim": 256}
    return replace(sd15, name="mid", unet=unet, text_encoders=(text,), resolution=256, published={})


def arch_preset(preset: str) -> ArchPreset:
    """The ``ArchPreset`` of a published UNet preset, or of ``mid``."""
    return _mid_preset() if preset == "mid" else get_preset(preset)


def unet_inputs(unet: torch.nn.Module, batch: int, size: int, device: Any, dtype: torch.dtype) -> tuple:
    """(args, kwargs) of one training forward of ``unet`` (x_t requires grad), random text states."""
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, size, size, device=device, dtype=dtype, requires_grad=True)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    kw: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, device=device,
                                                               dtype=dtype)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                   "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}
    return (x, t), kw


class UNetNets:
    """UNet2DConditionModel presets: SD1.x/2.x/XL and the CPU-sized ``tiny`` / ``mid``."""

    name = "unet"
    presets = UNET_PRESETS

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        if preset == "tiny":
            from sidscale.families.unet_vp.tiny import build_tiny_unet

            with torch.device(device):
                return build_tiny_unet(seed, in_channels=4, sample_size=8, cross_attention_dim=32)
        if preset == "mid":
            from diffusers import UNet2DConditionModel

            with weights_drawn_on(device, seed):
                return UNet2DConditionModel(**arch_preset("mid").unet)
        return build_unet(preset, device=device, seed=seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        if preset == "tiny":
            from sidscale.families.unet_vp.tiny import build_tiny_text_encoder

            with torch.device(device):
                return [build_tiny_text_encoder(1 + seed, hidden_size=32)]
        # NOTE: seeds the CUDA generator too: the weights are drawn on the device
        with weights_drawn_on(device, seed) as on:
            if preset == "mid":
                from transformers import CLIPTextConfig, CLIPTextModel

                return [CLIPTextModel(CLIPTextConfig(**arch_preset("mid").text_encoders[0]))]
            return build_text_encoders(preset, device=on)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        if preset == "tiny":
            return TINY_LATENT
        p = arch_preset(preset)
        return (int(p.unet["in_channels"]), p.latent_size, p.latent_size)

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        return unet_inputs(net, batch, self.latent_shape(preset)[1], device, dtype)

    def checkpoint_block_types(self) -> tuple[type, ...]:
        # diffusers' UNet checkpoints each resnet and each transformer one by one
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return (ResnetBlock2D, Transformer2DModel)

    def teacher_kind(self, preset: str) -> str:
        return "sdxl" if preset == "sdxl" else "sd"

    def vae_config(self, preset: str) -> dict[str, Any]:
        if preset == "tiny":
            from sidscale.families.unet_vp.tiny import TINY_VAE

            return TINY_VAE
        return arch_preset(preset).vae

    def text_encoder_configs(self, preset: str) -> list[dict[str, Any]]:
        if preset == "tiny":
            from sidscale.families.unet_vp.tiny import tiny_clip_text_config

            return [tiny_clip_text_config(32)]
        return [copy.deepcopy(c) for c in arch_preset(preset).text_encoders]

    def text_encoder_class(self, preset: str, index: int) -> str:
        # SDXL's second encoder carries the pooled projection (text_embeds)
        return "CLIPTextModelWithProjection" if preset == "sdxl" and index == 1 else "CLIPTextModel"

    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher:
        torch_dtype = DTYPES[dtype]
        unet = self.build(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
        set_attention(unet, "sdpa")
        encoders = [e.to(device=device, dtype=torch_dtype) for e in self.text_encoders(preset, device, seed)]
        tok = bench_clip_tokenizer()
        kind = self.teacher_kind(preset)
        if kind == "sdxl":
            conditioner: ClipConditioner = SdxlConditioner(tok, tok, encoders[0], encoders[1],
                                                           arch_preset(preset).resolution, dtype=torch_dtype)
        else:
            conditioner = ClipConditioner(tok, encoders[0], dtype=torch_dtype)
        pred = "v_prediction" if preset == "sd21_768" else "epsilon"
        return Teacher(bench_teacher_path(preset), kind, unet, conditioner,
                       VPSchedule.from_settings(prediction_type=pred), self.latent_shape(preset), 0.18215, None)

    def config_preset(self, preset: str) -> str:
        """The config preset (sidscale/configs) with this architecture's training recipe."""
        return "sd15" if preset in ("tiny", "mid") else preset  # tiny, mid: SD1.5's topology

    def case_config_base(self, preset: str) -> tuple[str, list[str]]:
        # the toy preset's SiD-LSG settings (CFG 1.5 on all three nets, one generator step)
        return "toy", [f"teacher.kind={self.teacher_kind(preset)}"]

UNET_NETS = UNetNets()
