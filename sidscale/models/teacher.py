"""Load a frozen teacher from a local diffusers directory (never from a hub).

A teacher directory is what ``save_pretrained`` writes: ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``vae/`` (and for SDXL ``text_encoder_2/``, ``tokenizer_2/``).
The built-in toy teacher has the same layout without ``vae/`` (it lives in pixel space).
Presets (sidscale/configs/sd15.yaml, ...) ship placeholder paths; the checks below turn a
placeholder or a half-copied directory into an error that says what a teacher dir must hold.

Memory levers applied here to the teacher UNet (the trainable copies inherit the attention
processors through ``copy.deepcopy``): SDPA attention (diffusers' ``AttnProcessor2_0``, its
default on torch 2) or eager attention, channels-last weights, and the teacher dtype.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from sidscale.config import ATTENTION_MODES, ConfigError, TeacherConfig
from sidscale.core.schedule import VPSchedule
from sidscale.errors import TeacherDirError
from sidscale.families.base import Teacher
from sidscale.models.conditioning import load_conditioner

__all__ = ["Teacher", "TeacherDirError", "load_teacher", "check_teacher_dir", "resolve_teacher_dir",
           "decode_latents", "decode_precision", "schedule_from_dir", "DTYPES", "REQUIRED"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REQUIRED = {
    "toy": ("unet", "text_encoder", "tokenizer", "scheduler"),
    "sd": ("unet", "text_encoder", "tokenizer", "scheduler", "vae"),
    "sdxl": ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler", "vae"),
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "model.safetensors", "pytorch_model.bin")
# NOTE: sharded checkpoints (large text encoders) ship an index instead of one weights file.
WEIGHT_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json")


def resolve_teacher_dir(cfg: TeacherConfig) -> Path:
    """The teacher directory; for the built-in toy teachers (kinds toy, toy_flow), fitted once and cached."""
    if cfg.is_toy and not cfg.path:
        from sidscale.models.toy_teacher import ToyTeacherSpec, ensure_toy_teacher

        spec = ToyTeacherSpec(parameterisation="flow" if cfg.kind == "toy_flow" else "eps")
        return ensure_toy_teacher(Path(cfg.cache_dir).expanduser(), spec)
    return Path(cfg.path).expanduser()


def check_teacher_dir(path: Path, kind: str, required: tuple[str, ...] | None = None) -> None:
    """Every folder the teacher needs is present, with its config and weights (``required``: the
    folders of a family not listed in ``REQUIRED``)."""
    if required is None:
        if kind not in REQUIRED:
            raise TeacherDirError(f"teacher.kind = {kind!r}: expected one of {', '.join(REQUIRED)}")
        required = REQUIRED[kind]
    layout = ", ".join(f"{d}/" for d in required)
    if not path.is_dir():
        hint = (" (the preset's placeholder: set teacher.path to your local copy)"
                if str(path).startswith("/path/to/") else "")
        raise TeacherDirError(f"teacher.path {path}: not a directory{hint}; a {kind} teacher directory must "
                              f"contain {layout} (as written by diffusers' save_pretrained; sidscale never "
                              "downloads from a model hub)")
    for sub in required:
        d = path / sub
        if not d.is_dir():
            raise TeacherDirError(f"teacher.path {path}: missing {sub}/; a {kind} teacher directory must "
                                  f"contain {layout}")
        if sub.startswith("tokenizer"):
            if not any((d / f).is_file() for f in ("vocab.json", "tokenizer.json", "spiece.model")):
                raise TeacherDirError(f"teacher tokenizer {d}: no vocab.json, tokenizer.json or spiece.model")
            continue
        cfg_name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        if not (d / cfg_name).is_file():
            raise TeacherDirError(f"teacher {sub} {d}: missing {cfg_name}")
        if sub != "scheduler" and not any((d / f).is_file() for f in WEIGHT_FILES + WEIGHT_INDEX_FILES):
            raise TeacherDirError(f"teacher {sub} {d}: no weights file (expected one of "
                                  f"{', '.join(WEIGHT_FILES)}, or a sharded *.index.json)")


def schedule_from_dir(path: Path, prediction_type: str = "auto") -> VPSchedule:
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    pred = sched.get("prediction_type", "epsilon") if prediction_type == "auto" else prediction_type
    return VPSchedule.from_settings(
        num_train_timesteps=sched.get("num_train_timesteps", 1000),
        beta_start=sched.get("beta_start", 0.00085),
        beta_end=sched.get("beta_end", 0.012), beta_schedule=sched.get("beta_schedule", "scaled_linear"),
        prediction_type=pred,
    )


def set_attention(unet: torch.nn.Module, mode: str = "sdpa") -> None:
    """``sdpa``: torch's fused scaled_dot_product_attention (``AttnProcessor2_0``, flash /
    memory-efficient kernels on GPU, no [B, heads, N, N] matrix kept); ``eager``: the plain
    softmax(QK^T)V processor, the memory-hungry reference."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if mode not in ATTENTION_MODES:
        raise ConfigError(f"teacher.attention = {mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
    unet.set_attn_processor(AttnProcessor2_0() if mode == "sdpa" else AttnProcessor())


def attention_processors(unet: torch.nn.Module) -> set[str]:
    """Class names of the attention processors in use (a check that a mode really applies)."""
    return {type(p).__name__ for p in unet.attn_processors.values()}


def set_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """4-D weights in NHWC: faster convolutions on tensor cores. Affects the frozen teacher only:
    DeepSpeed ZeRO re-lays the trainable copies' parameters out in flat (contiguous) buffers."""
    return module.to(memory_format=torch.channels_last)


def check_unet_matches(unet: torch.nn.Module, path: Path, kind: str) -> None:
    """An SD UNet under kind sdxl (or the reverse) would fail deep in the first forward."""
    is_xl = unet.config.get("addition_embed_type") == "text_time"
    if is_xl != (kind == "sdxl"):
        found = "an SDXL" if is_xl else "a non-SDXL"
        raise TeacherDirError(f"teacher.path {path}: unet/config.json describes {found} UNet "
                              f"(addition_embed_type={unet.config.get('addition_embed_type')!r}) but "
                              f"teacher.kind = {kind!r}")


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """UNet + text conditioner + schedule (+ VAE) of the teacher, frozen, in ``cfg.dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = resolve_teacher_dir(cfg)
    check_teacher_dir(path, cfg.kind)
    dtype = DTYPES[cfg.dtype]
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, local_files_only=True)
    check_unet_matches(unet, path, cfg.kind)
    # NOTE: getattr: the keys teacher.attention / teacher.channels_last are proposed for config.py;
    # until they exist the defaults (SDPA, contiguous) apply.
    set_attention(unet, cfg.attention)
    if cfg.channels_last:
        set_channels_last(unet)
    unet = unet.to(device).requires_grad_(False).eval()
    conditioner = load_conditioner(path, cfg.kind, dtype, device, resolution=cfg.resolution)
    vae, scaling = None, 1.0
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, local_files_only=True)
        vae = vae.to(device).requires_grad_(False).eval()
        scaling = float(vae.config.scaling_factor)
    down = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if cfg.resolution % down:
        raise ConfigError(f"teacher.resolution = {cfg.resolution}: must be a multiple of the VAE factor "
                          f"{down}")
    latent_shape = (int(unet.config.in_channels), cfg.resolution // down, cfg.resolution // down)
    return Teacher(path, cfg.kind, unet, conditioner, schedule_from_dir(path, cfg.prediction_type),
                   latent_shape, scaling, vae)


def _fp16_decoder_parts(vae: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """What an upcast leaves in fp16: with SDPA (or xformers) attention, SiD-LSG's ``upcast_vae`` (a
    copy of diffusers' former ``StableDiffusionXLPipeline.upcast_vae``) keeps post_quant_conv, the
    decoder's conv_in and its mid-block in fp16 ("attention does not need to be in float32");
    with any other attention everything is fp32."""
    from diffusers.models import attention_processor as ap

    sdpa = tuple(getattr(ap, n) for n in ("AttnProcessor2_0", "XFormersAttnProcessor", "FusedAttnProcessor2_0",
                                          "LoRAAttnProcessor2_0", "LoRAXFormersAttnProcessor") if hasattr(ap, n))
    mid = vae.decoder.mid_block
    attentions = getattr(mid, "attentions", None) or [None]
    if attentions[0] is None or not isinstance(attentions[0].processor, sdpa):
        return ()
    return tuple(m for m in (getattr(vae, "post_quant_conv", None), vae.decoder.conv_in, mid) if m is not None)


@contextlib.contextmanager
def decode_precision(vae: torch.nn.Module) -> Iterator[torch.dtype]:
    """The VAE in the precision the reference decodes with; yields the dtype to give the latents.

    SiD-LSG's sampler (``sid_sd_sampler``) upcasts an fp16 VAE whose config asks for it
    (``force_upcast``, diffusers' default True: SD1.5/2.1/SDXL/SD3 VAEs overflow in fp16 at high
    resolution) for the decode, casts the latents to post_quant_conv's dtype, and casts the VAE back
    afterwards (fp16 -> fp32 -> fp16 is exact). bf16 / fp32 VAEs, or ``force_upcast`` false: as they are."""
    dtype = next(vae.parameters()).dtype
    if dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield dtype
        return
    vae.to(torch.float32)
    hook = None
    try:
        parts = _fp16_decoder_parts(vae)
        for part in parts:
            part.to(torch.float16)
        if parts:
            # diffusers 0.27 (SiD-LSG's) cast the mid-block's output to the up-blocks' dtype inside
            # Decoder.forward; later versions dropped that cast (and made upcast_vae all-fp32)
            hook = vae.decoder.mid_block.register_forward_hook(lambda module, args, out: out.to(torch.float32))
        first = getattr(vae, "post_quant_conv", None) or vae.decoder.conv_in
        yield next(first.parameters()).dtype
    finally:
        if hook is not None:
            hook.remove()
        vae.to(torch.float16)


def decode_latents(teacher_vae: torch.nn.Module | None, latents: torch.Tensor,
                   scaling_factor: float) -> torch.Tensor:
    """Latents -> images in [-1, 1] (the toy teacher's latents are already pixels); an fp16 VAE with
    ``force_upcast`` decodes upcast (``decode_precision``)."""
    if teacher_vae is None:
        return latents.float()
    with torch.no_grad(), decode_precision(teacher_vae) as dtype:
        return teacher_vae.decode(latents.to(dtype) / scaling_factor).sample.float()
