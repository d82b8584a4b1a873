"""The published Stable Diffusion 3 / 3.5 architectures, written into code.

Each preset is the ``transformer/config.json`` of a released diffusers checkpoint (SD3-Medium,
SD3.5-Medium, SD3.5-Large) plus its three text encoders (CLIP-L and OpenCLIP bigG, both with
their pooled projection, and the T5-v1.1-XXL encoder) and the 16-channel VAE. As with the UNet
presets (presets.py) they build the real-size networks with random weights, or on the meta device
(shapes only, no memory) to count parameters and FLOPs, without any download:

    net = build_sd3_transformer("sd35_large")     # on meta
    count_parameters(net)                         # 8,056,627,520 (+ 89,653,248 pos_embed buffer)
    transformer_forward_flops("sd35_medium") / 1e12

Weights never come from here: a teacher is always loaded from a local directory.

NOTE: the ``pos_embed`` of SD3 is a persistent *buffer* (a fixed sin-cos table of
pos_embed_max_size^2 x width), not a parameter: it is what makes SD3.5-Medium "2.5 B"
(2.243 B parameters + 0.226 B buffer). It is not trained and not in any optimizer state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from sidscale.core.schedule import FlowSchedule
from sidscale.families.base import Teacher
from sidscale.families.shared.bench_nets import (
    bench_clip_tokenizer,
    bench_t5_tokenizer,
    bench_teacher_path,
    slice_preset,
    weights_drawn_on,
)
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.families.shared.t5 import tiny_t5_config
from sidscale.families.unet_vp.presets import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT

# T5-v1.1-XXL, encoder only (SD3's text_encoder_3): 24 layers, 64 heads x 64, gated-GELU MLP of 10240.
T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False,
    "use_cache": False, "tie_word_embeddings": False,
}
# SD3's encoder classes, in the pipeline's order (text_encoder, text_encoder_2, text_encoder_3): both
# CLIPs carry the pooled projection (their concatenated text_embeds are the 2048-wide pooled input).
TEXT_ENCODER_CLASSES: tuple[str, ...] = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection",
                                         "T5EncoderModel")

SD3_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
# FlowMatchEulerDiscreteScheduler settings of all three releases.
SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

_SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL d_model; the 768+1280 CLIP concat is zero-padded to it
    "caption_projection_dim": 1536,  # must equal heads x head_dim
    "pooled_projection_dim": 2048,  # CLIP-L 768 + bigG 1280 projected pooled outputs
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
    "qk_norm": None,
}
# SD3.5-Medium: MMDiT-X, a second (image-only) self-attention in blocks 0..12, RMS qk-norm, and a
# pos_embed table of 384^2 (trained up to 1440 px).
_SD35_MEDIUM: dict[str, Any] = {
    **_SD3_MEDIUM, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
_SD35_LARGE: dict[str, Any] = {
    **_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}


@dataclass(frozen=True)
class DiTPreset:
    """One published SD3-family teacher architecture (configs only; no weights)."""

    name: str
    transformer: dict[str, Any]  # SD3Transformer2DModel(**transformer)
    text_encoders: tuple[dict[str, Any], ...] = (CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, T5_XXL_ENCODER)
    vae: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(SD3_VAE))
    resolution: int = 1024  # native image size in pixels
    kind: str = "sd3"
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD3_SCHEDULER))
    # T5 tokens per prompt: SiD-DiT encodes SD3 prompts with max_sequence_length=77 (the pipeline's
    # default is 256); the transformer sees 77 CLIP + t5_tokens text tokens.
    t5_tokens: int = 77
    # exact parameter / buffer counts measured on meta, and the transformer's TFLOP per forward
    # (batch 1, 77 + 77 text tokens, 128x128 latents): see DIT_PRESETS
    published: dict[str, float] = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.transformer["in_channels"]), self.latent_size, self.latent_size)


# ``published``: exact counts of the networks built from these configs (meta device). They agree with
# the parameter counts measured on the released checkpoints that docs/flow_matching.md table 5.1 quotes to 3-4 digits
# (docs/flow_matching.md table 5.1); tests/families/test_sd3_presets.py checks both, and the TFLOP against a
# hand count of the MMDiT's matmuls.
_ENCODERS_AND_VAE = {"clip_l_params": 123_650_304, "clip_g_params": 694_659_840, "t5_params": 4_762_310_656,
                     "vae_params": 83_819_683}
DIT_PRESETS: dict[str, DiTPreset] = {
    "sd3_medium": DiTPreset("sd3_medium", _SD3_MEDIUM, published={
        "transformer_params": 2_028_328_000, "pos_embed_buffer": 56_623_104, "transformer_tflop": 8.437,
        **_ENCODERS_AND_VAE}),
    "sd35_medium": DiTPreset("sd35_medium", _SD35_MEDIUM, published={
        "transformer_params": 2_243_171_520, "pos_embed_buffer": 226_492_416, "transformer_tflop": 10.783,
        **_ENCODERS_AND_VAE}),
    "sd35_large": DiTPreset("sd35_large", _SD35_LARGE, published={
        "transformer_params": 8_056_627_520, "pos_embed_buffer": 89_653_248, "transformer_tflop": 29.597,
        **_ENCODERS_AND_VAE}),
}


def get_dit_preset(name: str) -> DiTPreset:
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown SD3 architecture preset {name!r}; presets: {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[name]


def transformer_config(name: str) -> dict[str, Any]:
    return copy.deepcopy(get_dit_preset(name).transformer)


def build_sd3_transformer(name: str, device: torch.device | str = "meta", seed: int | None = None) -> torch.nn.Module:
    """The preset's ``SD3Transformer2DModel``: on "meta" it costs no memory (shapes only)."""
    from diffusers import SD3Transformer2DModel

    with weights_drawn_on(device, seed):
        return SD3Transformer2DModel(**transformer_config(name))


def build_sd3_text_encoders(name: str, device: torch.device | str = "meta") -> list[torch.nn.Module]:
    """[CLIP-L with projection, bigG with projection, T5-XXL encoder], the pipeline's encoder order."""
    import transformers
    from transformers import CLIPTextConfig, T5Config

    preset = get_dit_preset(name)
    out = []
    with torch.device(device):
        for cls_name, cfg in zip(TEXT_ENCODER_CLASSES, preset.text_encoders, strict=True):
            config = T5Config(**cfg) if cls_name == "T5EncoderModel" else CLIPTextConfig(**cfg)
            out.append(getattr(transformers, cls_name)(config))
    return out


def build_sd3_vae(name: str, device: torch.device | str = "meta") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**copy.deepcopy(get_dit_preset(name).vae))


def transformer_inputs(config: Mapping[str, Any], batch: int, latent_size: int, t5_tokens: int = 77,
                       device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments of one ``SD3Transformer2DModel`` forward (``config``: the model's config).

    The prompt embedding is what ``StableDiffusion3Pipeline.encode_prompt`` returns: 77 CLIP tokens
    (zero-padded to the T5 width) followed by ``t5_tokens`` T5 tokens; pooled = both CLIP pooled
    projections. The timestep is 1000 * sigma.
    """
    c = config
    return {
        "hidden_states": torch.zeros(batch, c["in_channels"], latent_size, latent_size, device=device, dtype=dtype),
        "encoder_hidden_states": torch.zeros(batch, 77 + t5_tokens, c["joint_attention_dim"], device=device,
                                             dtype=dtype),
        "pooled_projections": torch.zeros(batch, c["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
    }


def transformer_forward_flops(name: str, batch: int = 1, t5_tokens: int = 77) -> int:
    """FLOPs of one transformer forward at 1024 px (FlopCounterMode: matmuls/convs/SDPA, 2 per MAC), on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    preset = get_dit_preset(name)
    net = build_sd3_transformer(name, "meta")
    kwargs = transformer_inputs(preset.transformer, batch, preset.latent_size, t5_tokens, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(**kwargs, return_dict=False)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------- bench / plan networks
# Big presets cut to a few blocks at their REAL width, tokens and text encoders: name -> (preset, overrides)
SLICES: dict[str, tuple[str, dict[str, int]]] = {"sd35_large_4l": ("sd35_large", {"num_layers": 4})}
SD3_PRESETS = ("sd3_tiny", *DIT_PRESETS, *SLICES)  # sd3_tiny (CPU-sized), sd3_medium, sd35_medium, sd35_large


# sd3_tiny's widths: CLIP-L, CLIP-G, T5 (= joint_attention_dim) all distinct, and CLIP-L + CLIP-G < T5
# as in the real models (768 + 1280 <= 4096), so the CLIP states are really zero-padded.
SD3_TINY_CLIP_L, SD3_TINY_CLIP_G, SD3_TINY_T5 = 32, 48, 96


@lru_cache(maxsize=1)
def sd3_tiny_preset() -> DiTPreset:
    from sidscale.families.unet_vp.tiny import tiny_clip_text_config

    width = 64
    transformer = {
        "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 4,
        "attention_head_dim": 16, "num_attention_heads": width // 16,
        "joint_attention_dim": SD3_TINY_T5, "caption_projection_dim": width,  # must equal heads x head_dim
        "pooled_projection_dim": SD3_TINY_CLIP_L + SD3_TINY_CLIP_G,
        # SD3.5-Medium's table is 6x its 1024 px token grid; 2x here keeps the buffer small but present
        "pos_embed_max_size": 32,
        "dual_attention_layers": (0, 1),  # SD3.5-M: the first 13 of 24 blocks
        "qk_norm": "rms_norm",
    }
    t5 = tiny_t5_config(SD3_TINY_T5)
    # projection_dim = width: the pooled text_embeds have the encoder's width (768 / 1280 for real)
    clip_l = tiny_clip_text_config(SD3_TINY_CLIP_L, projection_dim=SD3_TINY_CLIP_L)
    clip_g = tiny_clip_text_config(SD3_TINY_CLIP_G, projection_dim=SD3_TINY_CLIP_G)
    # SD3's 16-channel VAE (factor 8, scaling / shift, no quant convs) at ~0.1M parameters
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 1,
           "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "sample_size": 256, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False}
    return DiTPreset("sd3_tiny", transformer, text_encoders=(clip_l, clip_g, t5), vae=vae, resolution=256)


def dit_preset(preset: str) -> DiTPreset:
    """The ``DiTPreset`` of an SD3 preset: a published one, ``sd3_tiny``, or a slice."""
    if preset in SLICES:
        return slice_preset(get_dit_preset(SLICES[preset][0]), preset, SLICES[preset][1])
    return sd3_tiny_preset() if preset == "sd3_tiny" else get_dit_preset(preset)


# The trainer config whose recipe a CPU-sized SD3 preset borrows (the published ones have their own).
_SD3_CONFIG = {"sd3_tiny": "sd35_medium", "sd35_large_4l": "sd35_large"}


def build_dit_transformer(p: DiTPreset, device: torch.device | str = "meta",
                          seed: int | None = None) -> torch.nn.Module:
    """``SD3Transformer2DModel(**p.transformer)``; the weights of ``build_sd3_transformer`` for a published preset."""
    from diffusers import SD3Transformer2DModel

    with weights_drawn_on(device, seed):
        return SD3Transformer2DModel(**copy.deepcopy(p.transformer))


def build_dit_text_encoders(p: DiTPreset, device: torch.device | str = "meta",
                            configs: list[dict[str, Any]] | None = None) -> list[torch.nn.Module]:
    """[CLIP-L with projection, CLIP-G with projection, T5 encoder] of ``p`` (or of ``configs``), in the
    pipeline's order (text_encoder, text_encoder_2, text_encoder_3)."""
    import transformers
    from transformers import CLIPTextConfig, T5Config

    out = []
    with torch.device(device):
        for cls_name, cfg in zip(TEXT_ENCODER_CLASSES, configs or p.text_encoders, strict=True):
            config = T5Config(**cfg) if cls_name == "T5EncoderModel" else CLIPTextConfig(**cfg)
            out.append(getattr(transformers, cls_name)(config))
    return out


class SD3Nets:
    """SD3Transformer2DModel presets (SD3-Medium, SD3.5-Medium/Large, sd3_tiny): CLIP-L + CLIP-G + T5."""

    name = "sd3"
    presets = SD3_PRESETS

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        return build_dit_transformer(dit_preset(preset), device, seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        with weights_drawn_on(device, seed) as on:
            return build_dit_text_encoders(dit_preset(preset), on)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        return dit_preset(preset).latent_shape

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        p = dit_preset(preset)
        kw = transformer_inputs(net.config, batch, p.latent_size, p.t5_tokens, device, dtype)
        # x_t requires grad in the generator step (it comes from G); the text embeddings never do
        kw["hidden_states"].requires_grad_(True)
        return (), kw

    def checkpoint_block_types(self) -> tuple[type, ...]:
        from diffusers.models.attention import JointTransformerBlock

        return (JointTransformerBlock,)

    def teacher_kind(self, preset: str) -> str:
        return dit_preset(preset).kind

    def vae_config(self, preset: str) -> dict[str, Any]:
        return dit_preset(preset).vae

    def text_encoder_configs(self, preset: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(c) for c in dit_preset(preset).text_encoders]

    def text_encoder_class(self, preset: str, index: int) -> str:
        return TEXT_ENCODER_CLASSES[index]  # CLIP-L, CLIP-G (both with projection), T5 encoder

    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher:
        from sidscale.families.sd3.conditioning import SD3Conditioner

        p, torch_dtype = dit_preset(preset), DTYPES[dtype]
        net = self.build(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
        te1, te2, te3 = (e.to(device=device, dtype=torch_dtype) for e in self.text_encoders(preset, device, seed))
        tok = bench_clip_tokenizer()
        conditioner = SD3Conditioner(tok, tok, bench_t5_tokenizer(), te1, te2, te3,
                                     joint_attention_dim=int(net.config.joint_attention_dim),
                                     max_sequence_length=p.t5_tokens, dtype=torch_dtype)
        return Teacher(bench_teacher_path(preset), p.kind, net, conditioner, FlowSchedule(), p.latent_shape,
                       float(p.vae["scaling_factor"]), None, float(p.vae.get("shift_factor") or 0.0))

    def config_preset(self, preset: str) -> str:
        """The config preset (sidscale/configs) with this architecture's training recipe."""
        return _SD3_CONFIG.get(preset, preset)

    def case_config_base(self, preset: str) -> tuple[str, list[str]]:
        p = dit_preset(preset)
        # The preset's SiD-DiT recipe (CFG 4.5 on all three nets: both branches run, flow schedule,
        # (1 - sigma) weighting) but ONE generator step: with K > 1 each iteration draws k ~ U{1..K}
        # and its cost depends on k, so timings of different runners would not be comparable.
        return self.config_preset(preset), [
            f"teacher.kind={p.kind}", f"teacher.resolution={p.resolution}", "teacher.t5=true",
            f"teacher.max_sequence_length={p.t5_tokens}", "method.generator_steps=1"]

SD3_NETS = SD3Nets()
