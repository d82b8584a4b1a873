"""Random-weight teachers at a preset's real architecture, and the trainer config of one benchmark case.

The benchmark measures the real ``Trainer`` on the real network shapes; only the weights are random
(speed and memory do not depend on them). Four presets exist only here, sized for the CPU:

- ``tiny``: the tiny UNet of sidscale/families/unet_vp/tiny.py (4-channel 8x8 latents, 0.8M parameters) with a
  tiny CLIP text tower;
- ``mid``: SD1.5's topology (same block types, attention layout and 77-token cross-attention) at a
  fifth of its width and 256 px (32x32 latents): 35M parameters, big enough that parameters,
  optimizer states and activations all show in a memory measurement;
- ``sd3_tiny``: SD3.5-Medium's MMDiT-X (joint blocks, dual attention in the first half, RMS qk-norm,
  16-channel latents, 77 CLIP + 77 T5 text tokens) at width 64, 4 blocks and 256 px (32x32 latents,
  256 image tokens): 0.7M transformer parameters, with tiny CLIP-L / CLIP-G / T5 encoders wired as
  in SD3 (distinct widths 32 / 48 / 96: the CLIP states are zero-padded up to the T5 width);
- ``flux_tiny``: FLUX.1-dev's layout (double- then single-stream blocks, guidance embedding, RoPE,
  16-channel latents packed 2x2, CLIP-L pooled + 64 T5 tokens) at width 64, 2 + 2 blocks and 256 px
  (32x32 latents, 256 image tokens), with a tiny CLIP-L (32) and T5 (96).

The UNet presets (SD1.x/2.x/XL, ``tiny``, ``mid``) have a ``UNet2DConditionModel``; the SD3 presets
(sidscale/families/sd3/presets.py, and ``sd3_tiny``) an ``SD3Transformer2DModel`` and a flow
schedule; the FLUX presets (``flux_dev`` of sidscale/families/flux/presets.py, and ``flux_tiny``) a
``FluxTransformer2DModel`` and the FLUX family's schedule. What differs between the kinds (how to
build the network, its text encoders, its forward inputs, its latent shape, the blocks gradient
checkpointing wraps, the teacher and the trainer config of a benchmark case) is decided in one
place, ``preset_nets``; the benchmark, the plan and the activation measurement only call the
``*_preset_*`` functions.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch

from sidscale.config import Config, load_config
from sidscale.core.schedule import FlowSchedule, VPSchedule
from sidscale.families.base import Teacher
from sidscale.families.sd3.presets import DIT_PRESETS, TEXT_ENCODER_CLASSES, DiTPreset, get_dit_preset
from sidscale.families.shared.clip import ClipConditioner, SdxlConditioner
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.families.unet_vp.loading import set_attention

UNET_PRESETS = ("tiny", "mid", "sd15", "sd21", "sd21_768", "sdxl")
# Big presets cut to a few blocks at their REAL width, tokens and text encoders (what one GPU can measure
# of a model it cannot hold: tools/gpu_check.py --part big): name -> (preset, transformer overrides)
SLICES: dict[str, tuple[str, dict[str, int]]] = {
    "sd35_large_4l": ("sd35_large", {"num_layers": 4}),
    "flux_dev_4l": ("flux_dev", {"num_layers": 2, "num_single_layers": 4}),
}
SD3_PRESETS = ("sd3_tiny", *DIT_PRESETS, "sd35_large_4l")  # sd3_tiny (CPU-sized), sd3_medium, sd35_medium, sd35_large
FLUX_PRESET_NAMES = ("flux_tiny", "flux_dev", "flux_dev_4l")  # flux_tiny (CPU-sized), FLUX.1-dev
# what the benchmark, the plan and --measure accept
BENCH_PRESETS = UNET_PRESETS + SD3_PRESETS + FLUX_PRESET_NAMES
PLAN_PRESETS = BENCH_PRESETS
TINY_LATENT = (4, 8, 8)
REPO = Path(__file__).resolve().parents[2]


def _mid_preset():
    from sidscale.families.unet_vp.presets import CLIP_L_TEXT, get_preset

    sd15 = get_preset("sd15")
    unet = {**sd15.unet, "block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 256, "sample_size": 32}
    text = {**CLIP_L_TEXT, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "projection_dim": 256}
    return replace(sd15, name="mid", unet=unet, text_encoders=(text,), resolution=256, published={})


def arch_preset(preset: str):
    """The ``ArchPreset`` of a published UNet preset, or of ``mid``."""
    from sidscale.families.unet_vp.presets import get_preset

    return _mid_preset() if preset == "mid" else get_preset(preset)


# sd3_tiny's widths: CLIP-L, CLIP-G, T5 (= joint_attention_dim) all distinct, and CLIP-L + CLIP-G < T5
# as in the real models (768 + 1280 <= 4096), so the CLIP states are really zero-padded.
SD3_TINY_CLIP_L, SD3_TINY_CLIP_G, SD3_TINY_T5 = 32, 48, 96
SD3_TINY_T5_VOCAB = 64  # >= len(build_tiny_t5_tokenizer()) (39)


@lru_cache(maxsize=1)
def _sd3_tiny_preset() -> DiTPreset:
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
    t5 = {"vocab_size": SD3_TINY_T5_VOCAB, "d_model": SD3_TINY_T5, "d_kv": 16, "d_ff": 2 * SD3_TINY_T5,
          "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu",
          "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False, "use_cache": False,
          "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1}
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


# flux_tiny's widths: CLIP-L (= pooled_projection_dim) and T5 (= joint_attention_dim), distinct
FLUX_TINY_CLIP_L, FLUX_TINY_T5 = 32, 96


@lru_cache(maxsize=1)
def _flux_tiny_preset() -> DiTPreset:
    from sidscale.families.flux.presets import FLUX_SCHEDULER
    from sidscale.families.unet_vp.tiny import tiny_clip_text_config

    width = 64
    transformer = {
        "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 2, "num_single_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": width // 16,
        "joint_attention_dim": FLUX_TINY_T5, "pooled_projection_dim": FLUX_TINY_CLIP_L,
        "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),  # sums to the head dim, as 16 + 56 + 56 = 128
    }
    t5 = {"vocab_size": SD3_TINY_T5_VOCAB, "d_model": FLUX_TINY_T5, "d_kv": 16, "d_ff": 2 * FLUX_TINY_T5,
          "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu",
          "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False, "use_cache": False,
          "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1}
    vae = {**_sd3_tiny_preset().vae, "scaling_factor": 0.3611, "shift_factor": 0.1159}
    return DiTPreset("flux_tiny", transformer, text_encoders=(tiny_clip_text_config(FLUX_TINY_CLIP_L), t5), vae=vae,
                     resolution=256, kind="flux", scheduler=dict(FLUX_SCHEDULER), t5_tokens=64)


def _slice(preset: str, full: DiTPreset) -> DiTPreset:
    base, blocks = SLICES[preset]
    return replace(full, name=preset, transformer={**copy.deepcopy(full.transformer), **blocks}, published={})


def flux_preset(preset: str) -> DiTPreset:
    """The ``DiTPreset`` of a FLUX preset: ``flux_dev``, the CPU-sized ``flux_tiny``, or a slice."""
    from sidscale.families.flux.presets import get_flux_preset

    if preset in SLICES:
        return _slice(preset, get_flux_preset(SLICES[preset][0]))
    return _flux_tiny_preset() if preset == "flux_tiny" else get_flux_preset(preset)


def dit_preset(preset: str) -> DiTPreset:
    """The ``DiTPreset`` of an SD3 preset: a published one, ``sd3_tiny``, or a slice."""
    if preset in SLICES:
        return _slice(preset, get_dit_preset(SLICES[preset][0]))
    return _sd3_tiny_preset() if preset == "sd3_tiny" else get_dit_preset(preset)


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
    # teacher.partitioned=true (the frozen teacher as an optimizer-less ZeRO-3 engine; issue 17 item 3's key)
    teacher_partitioned: bool = False

    @property
    def label(self) -> str:
        ckpt = "+ckpt" if self.grad_checkpointing else ""
        rbs = f"+rbs{self.reduce_bucket_size:.0e}".replace("+0", "") if self.reduce_bucket_size else ""
        comp = f"+compile({self.compile_backend})" if self.compile_backend else ""
        tpart = "+teacher_zero3" if self.teacher_partitioned else ""
        return (f"{self.preset}/zero{self.zero}/{self.precision}/mb{self.micro_batch}x{self.accumulation}"
                f"{ckpt}{rbs}{comp}{tpart}")

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
    from sidscale.families.shared.tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(Path(tempfile.mkdtemp(prefix="sidscale-bench-tok-")) / "tokenizer")


@lru_cache(maxsize=1)
def _t5_tokenizer():
    # The tiny offline T5 tokenizer (no sentencepiece model here): its ids (< 39) are valid for every
    # T5 vocabulary, and the speed of an encoder does not depend on which ids it reads.
    from sidscale.families.shared.tokenizers import build_tiny_t5_tokenizer

    return build_tiny_t5_tokenizer()


def _bench_teacher_path(preset: str) -> Path:
    # NOTE: a path without toy_mixture.json: the trainer's indexed:toy prompts fall back to the default prompts.
    return Path(tempfile.gettempdir()) / f"sidscale-bench-{preset}"


class PresetNets(Protocol):
    """What the perf tools need to know about one kind of denoiser network (see ``preset_nets``)."""

    name: str  # "unet" | "sd3" | "flux"

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module: ...
    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]: ...
    def latent_shape(self, preset: str) -> tuple[int, int, int]: ...
    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]: ...
    def checkpoint_block_types(self) -> tuple[type, ...]: ...
    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher: ...
    def teacher_kind(self, preset: str) -> str: ...
    def config_preset(self, preset: str) -> str: ...
    def case_config_base(self, preset: str) -> tuple[str, list[str]]: ...


class _UNetNets:
    """UNet2DConditionModel presets: SD1.x/2.x/XL and the CPU-sized ``tiny`` / ``mid``."""

    name = "unet"

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        if preset == "tiny":
            from sidscale.families.unet_vp.tiny import build_tiny_unet

            with torch.device(device):
                return build_tiny_unet(seed, in_channels=4, sample_size=8, cross_attention_dim=32)
        if preset == "mid":
            from diffusers import UNet2DConditionModel

            device = torch.device(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
                torch.manual_seed(seed)
                return UNet2DConditionModel(**arch_preset("mid").unet)
        from sidscale.families.unet_vp.presets import build_unet

        return build_unet(preset, device=device, seed=seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        if preset == "tiny":
            from sidscale.families.unet_vp.tiny import build_tiny_text_encoder

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
            from sidscale.families.unet_vp.presets import build_text_encoders

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

    def teacher_kind(self, preset: str) -> str:
        return "sdxl" if preset == "sdxl" else "sd"

    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher:
        torch_dtype = DTYPES[dtype]
        unet = self.build(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
        set_attention(unet, "sdpa")
        encoders = [e.to(device=device, dtype=torch_dtype) for e in self.text_encoders(preset, device, seed)]
        tok = _tokenizer()
        kind = self.teacher_kind(preset)
        if kind == "sdxl":
            conditioner: ClipConditioner = SdxlConditioner(tok, tok, encoders[0], encoders[1],
                                                           arch_preset(preset).resolution, dtype=torch_dtype)
        else:
            conditioner = ClipConditioner(tok, encoders[0], dtype=torch_dtype)
        pred = "v_prediction" if preset == "sd21_768" else "epsilon"
        return Teacher(_bench_teacher_path(preset), kind, unet, conditioner,
                       VPSchedule.from_settings(prediction_type=pred), self.latent_shape(preset), 0.18215, None)

    def config_preset(self, preset: str) -> str:
        """The config preset (sidscale/configs) with this architecture's training recipe."""
        from sidscale.config import list_presets

        return preset if preset in list_presets() else "sd15"  # tiny, mid: SD1.5's topology

    def case_config_base(self, preset: str) -> tuple[str, list[str]]:
        # the toy preset's SiD-LSG settings (CFG 1.5 on all three nets, one generator step)
        return "toy", [f"teacher.kind={self.teacher_kind(preset)}"]


# The trainer config whose recipe a CPU-sized SD3 preset borrows (the published ones have their own).
_SD3_CONFIG = {"sd3_tiny": "sd35_medium", "sd35_large_4l": "sd35_large"}


def build_dit_transformer(p: DiTPreset, device: torch.device | str = "meta",
                          seed: int | None = None) -> torch.nn.Module:
    """``SD3Transformer2DModel(**p.transformer)``; the weights of ``build_sd3_transformer`` for a published preset."""
    from diffusers import SD3Transformer2DModel

    device = torch.device(device)
    # NOTE: fork the device's generator too when the weights are drawn on a GPU (the caller's streams stay)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        if seed is not None:
            torch.manual_seed(seed)
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


class _SD3Nets:
    """SD3Transformer2DModel presets (SD3-Medium, SD3.5-Medium/Large, sd3_tiny): CLIP-L + CLIP-G + T5."""

    name = "sd3"

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        return build_dit_transformer(dit_preset(preset), device, seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return build_dit_text_encoders(dit_preset(preset), device)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        return dit_preset(preset).latent_shape

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        from sidscale.families.sd3.presets import transformer_inputs

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

    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher:
        from sidscale.families.sd3.conditioning import SD3Conditioner

        p, torch_dtype = dit_preset(preset), DTYPES[dtype]
        net = self.build(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
        te1, te2, te3 = (e.to(device=device, dtype=torch_dtype) for e in self.text_encoders(preset, device, seed))
        tok = _tokenizer()
        conditioner = SD3Conditioner(tok, tok, _t5_tokenizer(), te1, te2, te3,
                                     joint_attention_dim=int(net.config.joint_attention_dim),
                                     max_sequence_length=p.t5_tokens, dtype=torch_dtype)
        return Teacher(_bench_teacher_path(preset), p.kind, net, conditioner, FlowSchedule(), p.latent_shape,
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


class _FluxNets:
    """FluxTransformer2DModel presets (FLUX.1-dev, flux_tiny): CLIP-L pooled + T5, latents packed 2x2."""

    name = "flux"

    def build(self, preset: str, device: torch.device | str, seed: int) -> torch.nn.Module:
        from sidscale.families.flux.presets import build_flux_transformer_from

        return build_flux_transformer_from(flux_preset(preset).transformer, device, seed)

    def text_encoders(self, preset: str, device: torch.device | str, seed: int) -> list[torch.nn.Module]:
        from sidscale.families.flux.presets import build_flux_text_encoders_from

        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return build_flux_text_encoders_from(flux_preset(preset).text_encoders, device)

    def latent_shape(self, preset: str) -> tuple[int, int, int]:
        p = flux_preset(preset)
        return (int(p.transformer["in_channels"]) // 4, p.latent_size, p.latent_size)  # unpacked

    def inputs(self, preset: str, net: torch.nn.Module, batch: int, device: Any,
               dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        from sidscale.families.flux.presets import transformer_inputs

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

    def teacher(self, preset: str, device: torch.device | str, dtype: str, seed: int) -> Teacher:
        from sidscale.families.flux.adapter import FluxSchedule
        from sidscale.families.flux.conditioning import FluxConditioner

        p, torch_dtype = flux_preset(preset), DTYPES[dtype]
        net = self.build(preset, device, seed).to(torch_dtype).requires_grad_(False).eval()
        te1, te2 = (e.to(device=device, dtype=torch_dtype) for e in self.text_encoders(preset, device, seed))
        conditioner = FluxConditioner(_tokenizer(), _t5_tokenizer(), te1, te2,
                                      int(net.config.joint_attention_dim), int(net.config.pooled_projection_dim),
                                      max_sequence_length=p.t5_tokens, dtype=torch_dtype)
        # the flux_dev recipe's guidance: mode official (teacher / fake embedding = each call's CFG scale), G 1.0
        schedule = FluxSchedule(guidance={"teacher": None, "fake": None, "generator": 1.0}, mode="official")
        return Teacher(_bench_teacher_path(preset), "flux", net, conditioner, schedule,
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


_NETS: dict[str, PresetNets] = {"unet": _UNetNets(), "sd3": _SD3Nets(), "flux": _FluxNets()}


def preset_nets(preset: str) -> PresetNets:
    """The one place that decides, per preset, which kind of denoiser network it has."""
    if preset in SD3_PRESETS:
        return _NETS["sd3"]
    if preset in FLUX_PRESET_NAMES:
        return _NETS["flux"]
    if preset in UNET_PRESETS:
        return _NETS["unet"]
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PLAN_PRESETS)}")


def latent_shape(preset: str) -> tuple[int, int, int]:
    return preset_nets(preset).latent_shape(preset)


def build_preset_net(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The preset's denoiser (UNet or SD3 transformer) with random weights (``device="meta"``: shapes only)."""
    return preset_nets(preset).build(preset, device, seed)


def build_preset_unet(preset: str, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The preset's UNet with random weights (``device="meta"``: shapes only); UNet presets only."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"preset {preset!r} has no UNet; UNet presets: {', '.join(UNET_PRESETS)}")
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


def preset_vae_config(preset: str) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of the preset's teacher (what sidscale.testing.random_teacher writes)."""
    if preset == "tiny":
        from sidscale.testing.random_teacher import TINY_VAE

        return dict(TINY_VAE)
    kind = preset_nets(preset).name
    p = dit_preset(preset) if kind == "sd3" else flux_preset(preset) if kind == "flux" else arch_preset(preset)
    return copy.deepcopy(p.vae)


def build_preset_teacher(preset: str, device: torch.device | str, dtype: str = "fp32", seed: int = 0) -> Teacher:
    """A frozen random-weight teacher (network + text encoders, no VAE: training never decodes).

    UNet presets: a VP teacher with a CLIP (SDXL: CLIP-L + bigG) conditioner; SD3 presets: a flow
    teacher with ``SD3Conditioner`` (CLIP-L + CLIP-G + T5, the preset's T5 tokens).
    """
    return preset_nets(preset).teacher(preset, device, dtype, seed)


def case_config(case: BenchCase, world_size: int, seed: int = 0) -> Config:
    """The trainer config of ``case``: the preset kind's method settings (UNet: the toy preset's;
    SD3: the SD3 config preset's with one generator step), the case's systems knobs."""
    base, kind_overrides = preset_nets(case.preset).case_config_base(case.preset)
    ckpt = str(case.grad_checkpointing).lower()
    overrides = [
        *kind_overrides, f"teacher.path=preset:{case.preset}",
        f"teacher.dtype={case.resolved_teacher_dtype()}", f"teacher.grad_checkpointing={ckpt}",
        f"generator.grad_checkpointing={ckpt}", f"fake.grad_checkpointing={ckpt}",
        f"train.precision={case.precision}", f"train.micro_batch={case.micro_batch}",
        f"train.global_batch={case.micro_batch * case.accumulation * world_size}", f"train.seed={seed}",
        "data.shards=indexed:toy", f"deepspeed.config={case.ds_config_path()}", "eval.num_samples=0",
    ]
    if case.compile_backend:
        overrides += ["train.compile=true", f"train.compile_backend={case.compile_backend}"]
    if case.teacher_partitioned:  # only when asked: the key exists once the partitioned teacher is merged
        overrides.append("teacher.partitioned=true")
    return load_config(base, overrides)
