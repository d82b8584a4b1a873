"""Write a random-weight teacher directory of a preset architecture, in the diffusers layout.

The GPU check (tools/gpu_check.sh) runs the real trainer through ``main()``, which loads its
teacher from disk through its family's ``load_teacher``. No real weights can be downloaded, so this
writes what ``save_pretrained`` would have written for a released checkpoint, with random weights.
Speed, memory and every code path of a run are those of the real teacher; only the images are noise.

- UNet presets (sidscale/families/unet_vp/presets.py, or the benchmark-only ``tiny`` / ``mid`` of
  sidscale/families/presets.py): the UNet, its text encoder(s) and VAE, the CLIP tokenizer built offline
  from open_clip's BPE vocabulary, and SD's scheduler config (``teacher.kind`` sd / sdxl).
- SD3 presets (sd3_medium, sd35_medium, sd35_large of sidscale/families/sd3/presets.py, and the
  CPU-sized ``sd3_tiny``): ``StableDiffusion3Pipeline``'s layout (model_index.json, transformer/,
  vae/, scheduler/ (flow, shift 3), text_encoder{,_2,_3}/ = CLIP-L, CLIP-G (both with projection)
  and T5, tokenizer{,_2,_3}/ = the offline CLIP tokenizer (the second one pads with "!", as SD3's)
  and the tiny offline T5 tokenizer (sidscale/families/shared/tokenizers.py; its ids fit any T5
  vocabulary)); ``teacher.kind`` sd3. ``StableDiffusion3Pipeline.from_pretrained`` loads it.
- FLUX presets (``flux_dev`` of sidscale/families/flux/presets.py, and the CPU-sized ``flux_tiny``):
  ``FluxPipeline``'s layout (transformer/, vae/, scheduler/ (flow, dynamic shift), text_encoder/ =
  CLIP-L ``CLIPTextModel``, text_encoder_2/ = T5, tokenizer/ = the offline CLIP tokenizer,
  tokenizer_2/ = the tiny offline T5 tokenizer); ``teacher.kind`` flux. ``FluxPipeline.from_pretrained``
  loads it.

    write_random_teacher("/tmp/sd15-random", "sd15", dtype="bf16")   # ~2.1 GB on disk
    write_random_teacher("/tmp/sd35m-random", "sd35_medium")          # ~15 GB (T5-XXL: 8.9 GiB of it)

Weights are saved in ``dtype`` (safetensors): bf16 halves the SD1.5 UNet to 1.7 GB, and the
loaders cast to ``teacher.dtype`` on load whatever the file holds. A ``random_teacher.json``
beside the folders says what was written (``kind`` and ``resolution`` are the trainer's
``teacher.kind`` / ``teacher.resolution`` for this directory, ``config`` the config preset whose
recipe fits it, ``network`` the denoiser's folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sidscale.families.presets import BENCH_PRESETS, SD3_PRESETS, preset_nets, preset_vae_config
from sidscale.families.shared.diffusers_dir import DTYPES

INFO_FILE = "random_teacher.json"
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PRESETS = BENCH_PRESETS  # UNet presets, then SD3 presets (sidscale/families/presets.py decides which is which)

TINY_RESOLUTION = 64  # the tiny UNet's 8x8 latents through the factor-8 VAE


def _resolution(preset: str) -> int:
    from sidscale.families.unet_vp.presets import arch_preset

    return TINY_RESOLUTION if preset == "tiny" else arch_preset(preset).resolution


def _prediction_type(preset: str) -> str:
    from sidscale.families.unet_vp.presets import arch_preset

    return "epsilon" if preset == "tiny" else arch_preset(preset).prediction_type


def text_encoder_configs(preset: str, text_layers: int | None = None) -> list[dict[str, Any]]:
    """Config kwargs of the preset's encoder(s) (CLIPTextConfig; SD3's third: T5Config); ``text_layers``
    shortens each tower (a faster, smaller stand-in with the same widths, so the denoiser's text
    inputs still fit)."""
    configs = preset_nets(preset).text_encoder_configs(preset)
    if text_layers is not None:
        if text_layers < 1:
            raise ValueError(f"text_layers = {text_layers}: expected a positive number of layers")
        # SDXL and SD3 read the CLIPs' penultimate hidden state: keep at least two layers so that it is
        # not the embedding. T5 (SD3's third encoder) names its depth num_layers.
        penultimate = preset == "sdxl" or preset in SD3_PRESETS
        for c in configs:
            key = "num_layers" if "d_model" in c else "num_hidden_layers"
            c[key] = max(text_layers, 2 if penultimate and key == "num_hidden_layers" else 1)
    return configs


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_encoder(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    import transformers
    from transformers import CLIPTextConfig, T5Config

    return getattr(transformers, class_name)(T5Config(**config) if class_name == "T5EncoderModel"
                                             else CLIPTextConfig(**config))


def _build_text_encoders(preset: str, text_layers: int | None, seed: int) -> Iterator[torch.nn.Module]:
    """The preset's encoders one at a time (a caller that saves and drops each holds one at most)."""
    nets = preset_nets(preset)
    for i, cfg in enumerate(text_encoder_configs(preset, text_layers)):
        name = nets.text_encoder_class(preset, i)
        yield _seeded(seed + 1 + i, lambda name=name, cfg=cfg: _text_encoder(name, cfg))


def _build_vae(preset: str, seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    config = preset_vae_config(preset)
    return _seeded(seed + 10, lambda: AutoencoderKL(**config))


def _write_tokenizer(path: Path, pad_token: str | None = None) -> None:
    from sidscale.families.shared.tokenizers import write_clip_tokenizer_files

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
    ``dtype`` and saved one at a time, so the peak host memory is about one fp32 denoiser (SD3.5-Large:
    32 GB) or one fp32 T5-XXL (19 GB). The denoiser's weights are ``build_preset_net(preset, "cpu",
    seed)``'s.
    """
    from sidscale.families.presets import build_preset_net

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    nets = preset_nets(preset)  # the one place that knows the preset's kind of network
    sd3, flux = nets.name == "sd3", nets.name == "flux"
    network = "transformer" if sd3 or flux else "unet"
    counts: dict[str, int] = {}

    net = build_preset_net(preset, "cpu", seed)
    counts[network] = _count(net)
    buffers = sum(b.numel() for b in net.buffers() if b.is_floating_point())  # SD3's pos_embed table
    net.to(torch_dtype).save_pretrained(out / network)
    del net
    for name, encoder in zip(TEXT_ENCODER_FOLDERS, _build_text_encoders(preset, text_layers, seed), strict=False):
        counts[name] = _count(encoder)
        encoder.to(torch_dtype).save_pretrained(out / name)
        del encoder
    _write_tokenizer(out / "tokenizer")
    if preset == "sdxl" or sd3:
        _write_tokenizer(out / "tokenizer_2", pad_token="!")  # FLUX's tokenizer_2 is T5's (_write_flux_rest)
    vae = _build_vae(preset, seed)
    counts["vae"] = _count(vae)
    vae.to(torch_dtype).save_pretrained(out / "vae")
    if sd3:
        resolution = _write_sd3_rest(out, preset)
    elif flux:
        resolution = _write_flux_rest(out, preset)
    else:
        from diffusers import DDPMScheduler

        from sidscale.families.toy.fit import SD_SCHEDULER_CONFIG

        scheduler = {**SD_SCHEDULER_CONFIG, "prediction_type": _prediction_type(preset)}
        DDPMScheduler(**scheduler).save_pretrained(out / "scheduler")
        resolution = _resolution(preset)

    info = {
        "preset": preset, "kind": nets.teacher_kind(preset), "resolution": resolution,
        "config": nets.config_preset(preset), "network": network, "dtype": dtype, "seed": seed,
        "text_layers": text_layers, "parameters": counts, "buffers": {network: buffers},
        "bytes_on_disk": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "note": "random weights: for systems checks (speed, memory, code paths), never for images",
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def _write_sd3_rest(out: Path, preset: str) -> int:
    """SD3's scheduler, T5 tokenizer (tokenizer_3) and model_index.json; returns the preset's resolution."""
    from sidscale.families.sd3.presets import TEXT_ENCODER_CLASSES, dit_preset

    # NOTE: model_index.json by hand, not StableDiffusion3Pipeline.save_pretrained: that would hold every
    # network in memory at once (SD3.5-Large + T5-XXL in fp32: over 50 GB).
    return _write_flow_rest(out, preset, dit_preset(preset), "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                            TEXT_ENCODER_CLASSES, clip_tokenizers=2)


def _write_flux_rest(out: Path, preset: str) -> int:
    """FLUX's scheduler, T5 tokenizer (tokenizer_2) and model_index.json; returns the preset's resolution."""
    from sidscale.families.flux.presets import FLUX_TEXT_ENCODER_CLASSES, flux_preset

    return _write_flow_rest(out, preset, flux_preset(preset), "FluxPipeline", "FluxTransformer2DModel",
                            FLUX_TEXT_ENCODER_CLASSES, clip_tokenizers=1)


def _write_flow_rest(out: Path, preset: str, p: Any, pipeline: str, transformer: str, text_classes: Sequence[str],
                     clip_tokenizers: int) -> int:
    """The flow-matching pipelines' scheduler, their T5 tokenizer (the folder after the CLIP tokenizers; T5 is
    the last text encoder) and model_index.json, written by hand (a pipeline's save_pretrained would hold every
    network in memory at once); returns the preset's resolution."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sidscale.families.shared.tokenizers import build_tiny_t5_tokenizer

    FlowMatchEulerDiscreteScheduler(**p.scheduler).save_pretrained(out / "scheduler")
    t5_tokenizer = build_tiny_t5_tokenizer()
    t5_vocab = int(p.text_encoders[clip_tokenizers]["vocab_size"])
    if len(t5_tokenizer) > t5_vocab:  # an id past the T5 embedding table would fail at the first prompt
        raise RuntimeError(f"the offline T5 tokenizer has {len(t5_tokenizer)} ids > {preset}'s T5 vocab_size "
                           f"{t5_vocab}")
    tokenizer_folders = ["tokenizer"] + [f"tokenizer_{i}" for i in range(2, clip_tokenizers + 2)]
    t5_tokenizer.save_pretrained(out / tokenizer_folders[-1])
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
                             "feature_extractor": [None, None], "image_encoder": [None, None],
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                             "transformer": ["diffusers", transformer], "vae": ["diffusers", "AutoencoderKL"]}
    for folder in tokenizer_folders[:-1]:
        index[folder] = ["transformers", "CLIPTokenizer"]
    index[tokenizer_folders[-1]] = ["transformers", type(t5_tokenizer).__name__]
    for folder, cls in zip(TEXT_ENCODER_FOLDERS[:len(text_classes)], text_classes, strict=True):
        index[folder] = ["transformers", cls]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return int(p.resolution)


def read_info(teacher_dir: str | Path) -> dict[str, Any]:
    path = Path(teacher_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a random teacher directory (written by tools/write_random_teacher.py)")
    return json.loads(path.read_text())
