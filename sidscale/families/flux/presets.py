"""The published FLUX.1-dev architecture, written into code.

The ``transformer/config.json`` of the released diffusers checkpoint (black-forest-labs/FLUX.1-dev:
19 double-stream + 38 single-stream blocks, 24 heads x 128, T5 width 4096, CLIP-L pooled 768, the
guidance embedding, RoPE axes 16 + 56 + 56) plus its two text encoders (CLIP-L ``CLIPTextModel``,
no projection: FLUX reads its pooler output; the T5-v1.1-XXL encoder) and its 16-channel VAE (SD3's
architecture with FLUX's scaling 0.3611 / shift 0.1159). As with the SD3 presets they build the
real-size networks with random weights, or on the meta device to count parameters and FLOPs:

    net = build_flux_transformer("flux_dev")       # on meta
    count_parameters(net)                          # 11,901,408,320
    transformer_forward_flops("flux_dev") / 1e12   # one forward at 1024 px, 512 T5 tokens

Weights never come from here: a teacher is always loaded from a local directory. Unlike SD3, the
FLUX transformer has no position-embedding buffer (RoPE is computed from the token ids).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from sidscale.families.base import Teacher
from sidscale.families.sd3.presets import SD3_VAE, T5_XXL_ENCODER, DiTPreset, sd3_tiny_preset
from sidscale.families.shared.bench_nets import (
    bench_clip_tokenizer,
    bench_t5_tokenizer,
    bench_teacher_path,
    slice_preset,
    weights_drawn_on,
)
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.families.shared.t5 import tiny_t5_config
from sidscale.families.unet_vp.presets import CLIP_L_TEXT

# FluxPipeline's encoder classes in its order (text_encoder, text_encoder_2)
FLUX_TEXT_ENCODER_CLASSES: tuple[str, ...] = ("CLIPTextModel", "T5EncoderModel")
FLUX_VAE: dict[str, Any] = {**copy.deepcopy(SD3_VAE), "scaling_factor": 0.3611, "shift_factor": 0.1159}
# FLUX.1-dev's FlowMatchEulerDiscreteScheduler: the resolution-dependent (dynamic) shift
FLUX_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                                  "max_image_seq_len": 4096}

_FLUX_DEV: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64,  # 16 latent channels packed 2x2
    "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL d_model
    "pooled_projection_dim": 768,  # CLIP-L pooler output
    "guidance_embeds": True,  # guidance-distilled (FLUX.1-schnell: False)
    "axes_dims_rope": (16, 56, 56),
}

# ``published``: exact counts of the networks built from these configs (meta device); they agree with the
# FLUX.1-dev count of docs/flow_matching.md ( table 5.1: 11.901 B, 22.17 GiB bf16), and the
# TFLOP with a hand count of the transformer's matmuls (tests/families/test_flux_presets.py).
FLUX_PRESETS: dict[str, DiTPreset] = {
    "flux_dev": DiTPreset(
        "flux_dev", _FLUX_DEV, text_encoders=(CLIP_L_TEXT, T5_XXL_ENCODER), vae=copy.deepcopy(FLUX_VAE),
        resolution=1024, kind="flux", scheduler=dict(FLUX_SCHEDULER), t5_tokens=512,
        published={"transformer_params": 11_901_408_320, "pos_embed_buffer": 0, "transformer_tflop": 74.385,
                   "clip_l_params": 123_060_480, "t5_params": 4_762_310_656, "vae_params": 83_819_683}),
}


def get_flux_preset(name: str) -> DiTPreset:
    if name not in FLUX_PRESETS:
        raise KeyError(f"unknown FLUX architecture preset {name!r}; presets: {', '.join(FLUX_PRESETS)}")
    return FLUX_PRESETS[name]


def build_flux_transformer_from(config: Mapping[str, Any], device: torch.device | str = "meta",
                                seed: int | None = None) -> torch.nn.Module:
    """``FluxTransformer2DModel(**config)``: on "meta" it costs no memory (shapes only)."""
    from diffusers import FluxTransformer2DModel

    with weights_drawn_on(device, seed):
        return FluxTransformer2DModel(**copy.deepcopy(dict(config)))


def build_flux_transformer(name: str, device: torch.device | str = "meta", seed: int | None = None) -> torch.nn.Module:
    return build_flux_transformer_from(get_flux_preset(name).transformer, device, seed)


def build_flux_text_encoders_from(configs: tuple[dict[str, Any], ...],
                                  device: torch.device | str = "meta") -> list[torch.nn.Module]:
    """[CLIP-L ``CLIPTextModel``, T5 encoder] from their config kwargs, the pipeline's encoder order."""
    import transformers
    from transformers import CLIPTextConfig, T5Config

    out = []
    with torch.device(device):
        for cls_name, cfg in zip(FLUX_TEXT_ENCODER_CLASSES, configs, strict=True):
            config = T5Config(**cfg) if cls_name == "T5EncoderModel" else CLIPTextConfig(**cfg)
            out.append(getattr(transformers, cls_name)(config))
    return out


def build_flux_text_encoders(name: str, device: torch.device | str = "meta") -> list[torch.nn.Module]:
    return build_flux_text_encoders_from(get_flux_preset(name).text_encoders, device)


def build_flux_vae(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**copy.deepcopy(get_flux_preset(name).vae))


def transformer_inputs(config: Mapping[str, Any], batch: int, latent_size: int, t5_tokens: int = 512,
                       device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments of one ``FluxTransformer2DModel`` forward (``config``: the model's config) at a
    ``latent_size`` x ``latent_size`` latent (packed 2x2: (latent_size / 2)^2 image tokens), as FluxPipeline
    calls it: T5 states, CLIP-L pooled, ``timestep = sigma``, the guidance embedding when the model has one,
    2-D text / image RoPE ids."""
    from sidscale.families.flux.adapter import latent_image_ids

    c, side = config, latent_size // 2
    kw: dict[str, Any] = {
        "hidden_states": torch.zeros(batch, side * side, c["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.zeros(batch, t5_tokens, c["joint_attention_dim"], device=device, dtype=dtype),
        "pooled_projections": torch.zeros(batch, c["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": latent_image_ids(side, side, "cpu", dtype).to(device),
        "txt_ids": torch.zeros(t5_tokens, 3, device=device, dtype=dtype),
    }
    if c.get("guidance_embeds"):
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return kw


def transformer_forward_flops(name: str, batch: int = 1, t5_tokens: int | None = None) -> int:
    """FLOPs of one transformer forward at the preset's resolution (FlopCounterMode: matmuls, SDPA; 2 per
    MAC), on meta. ``t5_tokens``: default the preset's (512)."""
    from torch.utils.flop_counter import FlopCounterMode

    preset = get_flux_preset(name)
    net = build_flux_transformer(name, "meta")
    kwargs = transformer_inputs(preset.transformer, batch, preset.latent_size,
                                preset.t5_tokens if t5_tokens is None else t5_tokens, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(**kwargs, return_dict=False)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------- bench / plan networks
SLICES: dict[str, tuple[str, dict[str, int]]] = {"flux_dev_4l": ("flux_dev", {"num_layers": 2, "num_single_layers": 4})}
FLUX_PRESET_NAMES = ("flux_tiny", "flux_dev", *SLICES)  # flux_tiny (CPU-sized), FLUX.1-dev


# flux_tiny's widths: CLIP-L (= pooled_projection_dim) and T5 (= joint_attention_dim), distinct
FLUX_TINY_CLIP_L, FLUX_TINY_T5 = 32, 96


@lru_cache(maxsize=1)
def flux_tiny_preset() -> DiTPreset:
    from sidscale.families.unet_vp.tiny import tiny_clip_text_config

    width = 64
    transformer = {
        "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 2, "num_single_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": width // 16,
        "joint_attention_dim": FLUX_TINY_T5, "pooled_projection_dim": FLUX_TINY_CLIP_L,
        "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),  # sums to the head dim, as 16 + 56 + 56 = 128
    }
    t5 = tiny_t5_config(FLUX_TINY_T5)
    vae = {**sd3_tiny_preset().vae, "scaling_factor": 0.3611, "shift_factor": 0.1159}
    return DiTPreset("flux_tiny", transformer, text_encoders=(tiny_clip_text_config(FLUX_TINY_CLIP_L), t5), vae=vae,
                     resolution=256, kind="flux", scheduler=dict(FLUX_SCHEDULER), t5_tokens=64)


def flux_preset(preset: str) -> DiTPreset:
    """The ``DiTPreset`` of a FLUX preset: ``flux_dev``, the CPU-sized ``flux_tiny``, or a slice."""
    if preset in SLICES:
        return slice_preset(get_flux_preset(SLICES[preset][0]), preset, SLICES[preset][1])
    return flux_tiny_preset() if preset == "flux_tiny" else get_flux_preset(preset)


class FluxNets:
    """FluxTransformer2DModel presets (FLUX.1-dev, flux_tiny): CLIP-L pooled + T5, latents packed 2x2."""

    name = "flux"
    presets = FLUX_PRESET_NAMES

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        return build_flux_transformer_from(flux_preset(preset).transformer, device, seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        with weights_drawn_on(device, seed) as on:
            return build_flux_text_encoders_from(flux_preset(preset).text_encoders, on)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        p = flux_preset(preset)
        return (int(p.transformer["in_channels"]) // 4, p.latent_size, p.latent_size)  # unpacked

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        p = flux_preset(preset)
        kw = transformer_inputs(net.config, batch, p.latent_size, p.t5_tokens, device, dtype)
        # x_t requires grad in the generator step (it comes from G); the text embeddings never do
        kw["hidden_states"].requires_grad_(True)
        return (), kw

    def checkpoint_block_types(self) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return (FluxTransformerBlock, FluxSingleTransformerBlock)

    def teacher_kind(self, preset: str) -> str:
        return "flux"

    def vae_config(self, preset: str) -> dict[str, Any]:
        return flux_preset(preset).vae

    def text_encoder_configs(self, preset: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(c) for c in flux_preset(preset).text_encoders]

    def text_encoder_class(self, preset: str, index: int) -> str:
        return FLUX_TEXT_ENCODER_CLASSES[index]  # CLIP-L (FLUX reads its pooled output), T5 encoder

    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher:
        from sidscale.families.flux.adapter import FluxSchedule
        from sidscale.families.flux.conditioning import FluxConditioner

        p, torch_dtype = flux_preset(preset), DTYPES[dtype]
        net = self.build(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
        te1, te2 = (e.to(device=device, dtype=torch_dtype) for e in self.text_encoders(preset, device, seed))
        conditioner = FluxConditioner(bench_clip_tokenizer(), bench_t5_tokenizer(), te1, te2,
                                      int(net.config.joint_attention_dim), int(net.config.pooled_projection_dim),
                                      max_sequence_length=p.t5_tokens, dtype=torch_dtype)
        # the flux_dev recipe's guidance: mode official (teacher / fake embedding = each call's CFG scale), G 1.0
        schedule = FluxSchedule(guidance={"teacher": None, "fake": None, "generator": 1.0}, mode="official")
        return Teacher(bench_teacher_path(preset), "flux", net, conditioner, schedule,
                       self.latent_shape(preset), float(p.vae["scaling_factor"]), None,
                       float(p.vae.get("shift_factor") or 0.0))

    def config_preset(self, preset: str) -> str:
        """The config preset with this architecture's training recipe (flux_tiny borrows FLUX.1-dev's)."""
        return "flux_dev"

    def case_config_base(self, preset: str) -> tuple[str, list[str]]:
        p = flux_preset(preset)
        # the flux_dev recipe (guidance embedding, no true CFG, flow schedule) with ONE generator step, so
        # timings are comparable (see _SD3Nets.case_config_base)
        return self.config_preset(preset), [
            "teacher.kind=flux", f"teacher.resolution={p.resolution}", "teacher.t5=true",
            f"teacher.max_sequence_length={p.t5_tokens}", "method.generator_steps=1"]

FLUX_NETS = FluxNets()
