"""What every family's loader shares: a local diffusers directory checked folder by folder (config and
weights), the teacher dtypes, the VAE and the precision it decodes in; for the transformer (MMDiT)
families, SD3 and FLUX, the UNet-only levers refused and the transformer read with a check of its class."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from sidscale.errors import ConfigError, TeacherDirError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "model.safetensors", "pytorch_model.bin")
# NOTE: sharded checkpoints (large text encoders) ship an index instead of one weights file.
WEIGHT_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json")


def check_teacher_dir(path: Path, kind: str, required: tuple[str, ...]) -> None:
    """Every folder in ``required`` (the family's teacher layout) is present, with its config and weights."""
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


def refuse_unet_levers(teacher_cfg, model: str) -> None:
    """teacher.attention / teacher.channels_last tune a UNet; a transformer always uses SDPA."""
    t = teacher_cfg
    if t.attention != "sdpa" or t.channels_last:
        raise ConfigError(f"teacher.attention = {t.attention!r} / teacher.channels_last = {t.channels_last}: "
                          f"these UNet levers do not apply to {model} (it always uses SDPA); "
                          "set teacher.attention=sdpa and teacher.channels_last=false")


def load_transformer(path: Path, network_class: type, kind: str, dtype: torch.dtype,
                     device: torch.device | str) -> torch.nn.Module:
    """``path/transformer`` as a frozen ``network_class`` in ``dtype`` on ``device``; a config of
    another class is a clear error (a directory of another family under this teacher.kind)."""
    config = json.loads((path / "transformer" / "config.json").read_text())
    name = network_class.__name__
    if config.get("_class_name") not in (None, name):
        raise ConfigError(f"teacher.path {path}: transformer/config.json describes a {config.get('_class_name')}, "
                          f"not a {name}, but teacher.kind = {kind!r}")
    net = network_class.from_pretrained(path / "transformer", torch_dtype=dtype, local_files_only=True)
    return net.to(device).requires_grad_(False).eval()


def load_vae(path: Path, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, local_files_only=True)
    return vae.to(device).requires_grad_(False).eval()


def vae_downsampling(vae: torch.nn.Module) -> int:
    """Pixels per latent position along each side: 2 per resolution level of the VAE's encoder after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


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


def decode_shifted(vae: torch.nn.Module, latents: torch.Tensor, scaling_factor: float,
                   shift_factor: float) -> torch.Tensor:
    """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling + shift)``, as the SD3 and FLUX pipelines;
    an fp16 VAE with ``force_upcast`` decodes upcast like SiD-LSG's (``decode_precision``)."""
    with torch.no_grad(), decode_precision(vae) as dtype:
        return vae.decode((latents / scaling_factor + shift_factor).to(dtype)).sample.float()
