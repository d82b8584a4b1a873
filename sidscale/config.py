"""Typed run configuration: dataclasses, YAML presets, ``--set`` overrides, validation, dump.

A run is described by one ``Config`` tree. It is loaded from a preset in ``sidscale/configs``
(by name, e.g. ``toy``) or from a YAML file (by path); a YAML may be partial, missing keys take
the defaults below, which are the authors' SD1.5 SiD-LSG recipe (docs: sid_lsg_method.md).
Repeatable ``--set key.sub=value`` overrides apply on top, then everything is validated before
any model is built, so a typo costs seconds, not a queued cluster job.

    cfg = load_config("toy", ["train.max_steps=50", "generator.betas=[0.0, 0.99]"])
    validate(cfg, world_size=8)          # the trainer adds the world-size check
    dump_config(cfg, run_dir / "config.yaml")

Every user-facing problem raises ``ConfigError`` naming the key path, the bad value, what was
expected and, where it came from a file, the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from sidscale.core.io import atomic_write_text
from sidscale.errors import ConfigError  # noqa: F401 (re-exported: the config layer's error)
from sidscale.families import TEACHER_KINDS  # one list of kinds: the family registry
from sidscale.method.losses import GEN_WEIGHTINGS

PRESET_DIR = Path(__file__).resolve().parent / "configs"
REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
ATTENTION_MODES = ("sdpa", "eager")
TEXT_ENCODER_DEVICES = ("gpu", "cpu")
BETA_SCHEDULES = ("scaled_linear", "linear")
METHODS = ("sid_lsg",)
# The built-in toy teachers (fitted once, cached under teacher.cache_dir when teacher.path is ""):
# toy = VP / eps, toy_flow = rectified flow / velocity (sidscale/models/toy_teacher.py).
TOY_KINDS = ("toy", "toy_flow")
# Teachers with a guidance embedding: the distilled_guidance section applies (sidscale/families/flux.py).
GUIDANCE_EMBED_KINDS = ("flux",)
# distilled_guidance.mode: official = SiD-DiT's FLUX coupling (embedding = each call's CFG scale), per_role
# = one fixed embedding per net (sidscale/families/flux.py)
GUIDANCE_MODES = ("official", "per_role")


# --------------------------------------------------------------------------------------------
# Schema. Field names are an interface: other modules read them directly.
# --------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    # toy | sd | sdxl (UNet, VP) | sd3 (SD3 / SD3.5 MMDiT, rectified flow) | flux (FLUX.1, rectified flow)
    # | toy_flow (UNet, flow)
    kind: str = "toy"
    path: str = ""  # local diffusers directory; "" only for kinds toy / toy_flow (built-in teachers)
    cache_dir: str = "~/.cache/sidscale"  # where the toy teacher is fitted and cached
    dtype: str = "bf16"  # frozen teacher + text encoders: fp32 | bf16 | fp16
    prediction_type: str = "auto"  # auto (teacher's scheduler) | epsilon | v_prediction
    resolution: int = 512  # image size in pixels
    grad_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa (torch SDPA, diffusers AttnProcessor2_0) | eager (reference, more memory)
    channels_last: bool = False  # teacher UNet weights in NHWC (GPU conv speed; the teacher only)
    # SD3 family: the T5 encoder (off: zeros in its place, as diffusers does without text_encoder_3,
    # and 9 GB of T5-XXL never loaded) and its token count (SiD-DiT: 77; diffusers' pipeline: 256).
    # FLUX: T5 is its only text sequence (t5 must stay true); SiD-DiT and FluxPipeline use 512 tokens.
    t5: bool = True
    max_sequence_length: int = 77
    # Where the text encoders run: gpu (on every rank's device) | cpu (host memory; only their outputs go
    # to the device: saves T5-XXL's 9 GB per GPU, costs CPU encodes in the critical path; models/host_conditioner.py)
    text_encoders: str = "gpu"
    # The frozen teacher network: true = partitioned across the ranks by an optimizer-less ZeRO-3
    # engine (1/N of its weights per rank, gathered layer by layer while it runs); false = a full copy
    # per rank; auto = replicated where the memory plan (sidscale/perf) says the run fits, else
    # partitioned (the choice is logged). YAML's true/false are accepted as well as the strings.
    partitioned: str = "auto"

    @property
    def is_toy(self) -> bool:
        """A built-in toy teacher (pixel space, exact mixture samples: the toy evaluation applies)."""
        return self.kind in TOY_KINDS


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # scaled_linear | linear


@dataclass
class MethodConfig:
    name: str = "sid_lsg"
    cfg_train_fake: float = 1.5  # k1: CFG on the fake net in its own DSM loss
    cfg_eval_fake: float = 1.5  # k2 = k3: CFG on the fake net inside the generator loss
    cfg_eval_real: float = 1.5  # k4: CFG on the teacher inside the generator loss
    alpha: float = 1.0
    t_init: int = 625  # the generator's single timestep
    t_min: int = 20  # t ~ UniformInt{t_min .. t_max - 1}
    t_max: int = 980
    prompt_dropout: float = 0.1
    fake_loss_scale: float = 1.0
    gen_loss_scale: float = 1.0
    # K-step generator (1 = SiD-LSG's one step). Each iteration trains step k for one k in 1..K.
    generator_steps: int = 1
    # generator loss weighting: sid_legacy (divide by SiD-LSG's mean |x_g - y_real|) or
    # one_minus_sigma (multiply by 1 - sigma: SiD-DiT's default for flow teachers)
    gen_weighting: str = "sid_legacy"
    # flow-matching teachers (SD3): the generator's first sigma and the loss sigmas' logit-normal
    sigma_init: float = 1.0
    sigma_logit_mean: float = 0.6931471805599453  # ln 2 (median sigma 2/3), SiD-DiT
    sigma_logit_std: float = 1.6


@dataclass
class DistilledGuidanceConfig:
    """Guidance-distilled teachers (teacher.kind flux with guidance_embeds, FLUX.1-dev): the guidance
    scale each net gets as its guidance EMBEDDING (an input of the network, not CFG).
    mode official (the flux_dev preset, SiD-DiT's FLUX code): teacher and fake net take each call's
    method.cfg_* scale as embedding AND as true-CFG scale (teacher / fake below are not read);
    mode per_role: the fixed embeddings below, true CFG on top = the cfg_* scales (1 = off)."""

    mode: str = "per_role"
    teacher: float = 3.5  # FLUX.1-dev's default (FluxPipeline guidance_scale)
    fake: float | None = None  # null = the teacher's: the fake net models G's output at the teacher's guidance
    generator: float = 1.0  # SiD-DiT calls the generator with embedding 1.0, in training and sampling


@dataclass
class NetConfig:
    """Optimizer and memory settings of one trainable net (generator or fake score)."""

    lr: float = 1e-6
    betas: tuple[float, float] = (0.0, 0.999)
    # Adam eps; null = the method's default: 1e-8, or 1e-6 when train.precision = fp16 (method page).
    eps: float | None = None
    weight_decay: float = 0.0
    # Clip every gradient entry to [-v, v] right before Adam (after loss-scale unscaling, accumulation
    # and the data-parallel reduction); null = 1.0 when train.precision = fp16 (method page), off
    # otherwise; 0 = off.
    grad_clip_value: float | None = None
    grad_checkpointing: bool = False


@dataclass
class TrainConfig:
    global_batch: int = 512
    micro_batch: int = 1  # per rank
    max_steps: int = 20000
    seed: int = 0
    precision: str = "bf16"  # fp32 | bf16 | fp16
    ema_halflife_kimg: float = 50.0
    ema_rampup_ratio: float = 0.05  # halflife = min(halflife, ratio * images_seen); 0 disables
    log_every: int = 10
    preview_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    export_at_end: bool = True
    # the export copies the teacher's text encoders / tokenizers / VAE / scheduler (self-contained);
    # true: symlinks them instead (no disk, but the export then needs the teacher directory)
    export_link_frozen: bool = False
    # torch.compile of the three UNets (generator, fake, teacher). Off by default: measure it
    # first (tools/bench.py --compile); the first iterations pay the compilation. ZeRO-1/2 only.
    compile: bool = False
    compile_backend: str = "inductor"  # a torch.compile backend: inductor | aot_eager | eager
    # share of each device the memory plan may fill (teacher.partitioned=auto, tools/memory_plan.py): the rest
    # is the caching allocator's fragmentation; a GPU also keeps a fixed reserve (sidscale/perf/memory_plan.py)
    memory_fraction: float = 0.9


@dataclass
class DataConfig:
    shards: str = ""  # brace pattern of webdataset tars, a manifest.json, or "toy"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"  # relative: against the cwd, then the repo root


def _default_preview_prompts() -> list[str]:
    return [
        "a photo of an astronaut riding a horse on the moon",
        "a red fox sitting in fresh snow, highly detailed",
        "a bowl of fruit on a wooden table, studio lighting",
        "a lighthouse on a cliff at sunset, oil painting",
    ]


@dataclass
class PreviewConfig:
    prompts: list[str] = field(default_factory=_default_preview_prompts)
    seeds_per_prompt: int = 2


@dataclass
class EvalConfig:
    num_samples: int = 2000  # toy Frechet sample count; 0 = no toy evaluation at the end
    teacher_steps: int = 25


@dataclass
class DistConfig:
    # Seconds any collective may wait for the slowest rank before the job fails (NCCL: the watchdog
    # ends the process; gloo: the call raises). It bounds a hang on a stuck rank, and must exceed
    # the longest rank-0-only work the other ranks wait for (checkpoint pruning, export, previews,
    # the toy evaluation, fitting the toy teacher): raise it for slow filesystems.
    timeout_s: int = 600


@dataclass
class Config:
    resume: bool = True  # resume from RUN/checkpoints/latest; false refuses a non-empty run dir
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    generator: NetConfig = field(default_factory=NetConfig)
    fake: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distilled_guidance: DistilledGuidanceConfig = field(default_factory=DistilledGuidanceConfig)


# --------------------------------------------------------------------------------------------
# Errors and type coercion
# --------------------------------------------------------------------------------------------


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _unknown_key(key: str, prefix: str, known: Sequence[str], source: str | None) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else "."
    level = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"{_where(source)}unknown key '{full}'{hint} Keys {level}: {', '.join(known)}")


def _type_error(path: str, value: Any, expected: str, source: str | None) -> ConfigError:
    return ConfigError(f"{_where(source)}{path} = {value!r}: expected {expected}, got {type(value).__name__}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is None:
        return tp.__name__ if isinstance(tp, type) else str(tp)
    return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # NOTE: annotations are strings (``from __future__ import annotations``); resolve them once.
    return get_type_hints(cls)


# str keys whose values include true / false (YAML 1.1 turns those into bools)
_BOOL_OR_STR_KEYS = ("teacher.partitioned",)
TEACHER_PLACEMENTS = ("auto", "true", "false")


def _coerce(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Check ``value`` against the field type ``tp`` and convert where lossless; else ConfigError."""
    if isinstance(tp, types.UnionType) or get_origin(tp) is Union:
        # Only ``X | None`` is used: null means "the default that depends on other keys".
        others = [a for a in get_args(tp) if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"config.py: unsupported union type {tp!r} at {path}")  # a schema bug
        return None if value is None else _coerce(value, others[0], path, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _type_error(path, value, f"a mapping of {tp.__name__} keys", source)
        return _build(tp, value, path, source)
    origin = get_origin(tp)
    if origin in (tuple, list):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, f"a list ({_type_name(tp)})", source)
        if origin is tuple and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(
                    f"{_where(source)}{path} = {list(value)!r}: expected {len(args)} items, got {len(value)}"
                )
            elem_types = list(args)
        else:
            elem_types = [args[0]] * len(value)
        pairs = enumerate(zip(value, elem_types, strict=True))
        items = [_coerce(v, t, f"{path}[{i}]", source) for i, (v, t) in pairs]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        # NOTE: no truthiness: "false" or 0 silently meaning False/True is how flags get lost.
        if not isinstance(value, bool):
            raise _type_error(path, value, "a bool (true/false)", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, value, "an int", source)
        return value
    if tp is float:
        if isinstance(value, str):
            # NOTE: PyYAML (YAML 1.1) reads "1e-6" (no dot) as a string; accept numeric text.
            try:
                value = float(value)
            except ValueError:
                raise _type_error(path, value, "a float", source) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, value, "a float", source)
        if not math.isfinite(value):
            raise ConfigError(f"{_where(source)}{path} = {value!r}: expected a finite float")
        return float(value)
    if tp is str and path in _BOOL_OR_STR_KEYS and isinstance(value, bool):
        return "true" if value else "false"  # YAML reads `partitioned: true` as a bool
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, value, "a string", source)
        return value
    raise TypeError(f"config.py: unsupported field type {tp!r} at {path}")  # a schema bug, not user's


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str | None) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) mapping; missing keys take defaults."""
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(str(key), prefix, known, source)
        path = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], path, source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Validation of values (types are already right by construction)
# --------------------------------------------------------------------------------------------


def _check(ok: bool, path: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{path} = {value!r}: expected {expected}")


def _check_enum(path: str, value: str, allowed: Sequence[str]) -> None:
    _check(value in allowed, path, value, f"one of {', '.join(allowed)}")


def _check_positive(section: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        _check(getattr(section, name) > 0, f"{prefix}.{name}", getattr(section, name), "a positive value")


def _check_non_negative(section: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= 0, f"{prefix}.{name}", value, "a value >= 0")


def _validate_net(net: NetConfig, prefix: str) -> None:
    _check_non_negative(net, prefix, ["lr", "weight_decay"])
    _check(net.eps is None or net.eps > 0, f"{prefix}.eps", net.eps,
           "a positive value, or null (1e-8; 1e-6 when train.precision = fp16)")
    _check(net.grad_clip_value is None or net.grad_clip_value >= 0, f"{prefix}.grad_clip_value",
           net.grad_clip_value, "a value >= 0 (0 = off), or null (1.0 when train.precision = fp16, else off)")
    for i, beta in enumerate(net.betas):
        _check(0.0 <= beta < 1.0, f"{prefix}.betas[{i}]", beta, "a value in [0, 1)")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError on the first impossible value; with ``world_size``, also check batching."""
    t = cfg.teacher
    _check_enum("teacher.kind", t.kind, TEACHER_KINDS)
    _check(t.is_toy or t.path != "", "teacher.path", t.path,
           f"a local diffusers directory (only kinds {' / '.join(TOY_KINDS)} have a built-in teacher; "
           f"kind is {t.kind!r})")
    _check(t.cache_dir != "", "teacher.cache_dir", t.cache_dir, "a directory path")
    _check_enum("teacher.dtype", t.dtype, DTYPES)
    _check_enum("teacher.prediction_type", t.prediction_type, PREDICTION_TYPES)
    _check_enum("teacher.attention", t.attention, ATTENTION_MODES)
    _check_enum("teacher.text_encoders", t.text_encoders, TEXT_ENCODER_DEVICES)
    _check_enum("teacher.partitioned", t.partitioned, TEACHER_PLACEMENTS)
    _check_positive(t, "teacher", ["resolution", "max_sequence_length"])
    # NOTE: SD VAEs downsample by 8; any other size cannot map to a latent grid.
    _check(t.is_toy or t.resolution % 8 == 0, "teacher.resolution", t.resolution,
           f"a multiple of 8 for kind {t.kind!r}")

    s = cfg.schedule
    _check_positive(s, "schedule", ["num_train_timesteps", "beta_start"])
    _check(s.beta_start < s.beta_end < 1.0, "schedule.beta_end", s.beta_end,
           f"a value in (beta_start={s.beta_start}, 1)")
    _check_enum("schedule.beta_schedule", s.beta_schedule, BETA_SCHEDULES)

    m, n_t = cfg.method, cfg.schedule.num_train_timesteps
    _check_enum("method.name", m.name, METHODS)
    _check_non_negative(m, "method", ["cfg_train_fake", "cfg_eval_fake", "cfg_eval_real", "alpha",
                                      "fake_loss_scale", "gen_loss_scale"])
    _check(0 <= m.t_init < n_t, "method.t_init", m.t_init, f"a timestep in [0, {n_t})")
    _check(0 <= m.t_min < n_t, "method.t_min", m.t_min, f"a timestep in [0, {n_t})")
    # NOTE: t_max is exclusive (t ~ UniformInt{t_min .. t_max-1}), so t_max == T is still valid.
    _check(0 < m.t_max <= n_t, "method.t_max", m.t_max, f"an exclusive bound in (0, {n_t}]")
    _check(m.t_min < m.t_max, "method.t_min", m.t_min, f"a value below method.t_max={m.t_max}")
    _check(0.0 <= m.prompt_dropout < 1.0, "method.prompt_dropout", m.prompt_dropout, "a value in [0, 1)")
    # NOTE: VP steps t_i = int(t_init (1 - i/K)) must stay distinct and >= 1 step apart.
    _check(1 <= m.generator_steps <= max(1, m.t_init), "method.generator_steps", m.generator_steps,
           f"an int in [1, method.t_init={m.t_init}]")
    _check_enum("method.gen_weighting", m.gen_weighting, GEN_WEIGHTINGS)
    _check(0.0 < m.sigma_init <= 1.0, "method.sigma_init", m.sigma_init, "a sigma in (0, 1]")
    _check(m.sigma_logit_std > 0, "method.sigma_logit_std", m.sigma_logit_std, "a positive std")

    g = cfg.distilled_guidance
    _check_enum("distilled_guidance.mode", g.mode, GUIDANCE_MODES)
    _check_non_negative(g, "distilled_guidance", ["teacher", "generator"])
    # NOTE: in mode official the teacher / fake embeddings are each call's cfg_* scale: a value set here
    # would be silently ignored
    _check(g.mode != "official" or (g.teacher == DistilledGuidanceConfig.teacher and g.fake is None),
           "distilled_guidance", config_to_dict(g),
           f"teacher = {DistilledGuidanceConfig.teacher} and fake = null in mode official (teacher and fake "
           "take each call's method.cfg_* scale as their embedding); set mode per_role for fixed embeddings")
    _check(g.fake is None or g.fake >= 0, "distilled_guidance.fake", g.fake,
           "a value >= 0, or null (the teacher's scale)")
    # NOTE: only a guidance-distilled teacher reads these; elsewhere a changed value would be silently ignored
    if t.kind not in GUIDANCE_EMBED_KINDS:
        _check(g == DistilledGuidanceConfig(), "distilled_guidance", config_to_dict(g),
               f"the defaults for teacher.kind {t.kind!r} (only kinds {', '.join(GUIDANCE_EMBED_KINDS)} have a "
               "guidance embedding; use method.cfg_* for classifier-free guidance)")
    _check(t.kind != "flux" or t.t5, "teacher.t5", t.t5, "true for teacher.kind flux (T5 is FLUX's text sequence)")
    _check(t.kind != "flux" or t.max_sequence_length <= 512, "teacher.max_sequence_length", t.max_sequence_length,
           "at most 512 T5 tokens for teacher.kind flux (FluxPipeline's limit)")

    _validate_net(cfg.generator, "generator")
    _validate_net(cfg.fake, "fake")

    tr = cfg.train
    _check_positive(tr, "train", ["global_batch", "micro_batch", "max_steps", "ema_halflife_kimg",
                                  "log_every", "preview_every", "ckpt_every", "keep_last"])
    _check_non_negative(tr, "train", ["ema_rampup_ratio"])
    _check(0.0 < tr.memory_fraction <= 1.0, "train.memory_fraction", tr.memory_fraction, "a fraction in (0, 1]")
    # NOTE: numpy seeds must fit in uint32; torch would take more, but one range for both.
    _check(0 <= tr.seed < 2**32, "train.seed", tr.seed, "an int in [0, 2**32)")
    _check_enum("train.precision", tr.precision, DTYPES)
    _check_enum("train.compile_backend", tr.compile_backend, COMPILE_BACKENDS)
    # NOTE: ZeRO-3's gather/release hooks on the partitioned teacher's modules break compiled graphs.
    _check(not (tr.compile and t.partitioned == "true"), "train.compile", tr.compile,
           "false with teacher.partitioned = true (ZeRO-3's parameter hooks break torch.compile's graphs); "
           "set teacher.partitioned=false or train.compile=false")
    _check(tr.global_batch % tr.micro_batch == 0, "train.global_batch", tr.global_batch,
           f"a multiple of train.micro_batch={tr.micro_batch}")

    _check_non_negative(cfg.data, "data", ["num_workers", "shuffle_buffer"])
    _check(cfg.deepspeed.config != "", "deepspeed.config", cfg.deepspeed.config, "a JSON file path")
    _check(len(cfg.preview.prompts) > 0, "preview.prompts", cfg.preview.prompts, "at least one prompt")
    _check_positive(cfg.preview, "preview", ["seeds_per_prompt"])
    # 0 switches the toy evaluation (or its teacher half) off; a Frechet distance needs >= 2 samples.
    _check_non_negative(cfg.eval, "eval", ["teacher_steps"])
    _check(cfg.eval.num_samples == 0 or cfg.eval.num_samples >= 2, "eval.num_samples", cfg.eval.num_samples,
           "0 (no toy evaluation) or at least 2")

    # NOTE: a few seconds would already trip on an ordinary checkpoint save or a rank's slower start-up.
    _check(cfg.dist.timeout_s >= 10, "dist.timeout_s", cfg.dist.timeout_s,
           "seconds >= 10 (default 600, NCCL's own; raise it for slow checkpoint filesystems)")

    if world_size is not None:
        accumulation_steps(cfg, world_size)


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step: global / (micro * world)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size = {world_size!r}: expected a positive int")
    g, mb = cfg.train.global_batch, cfg.train.micro_batch
    if g % (mb * world_size) != 0:
        raise ConfigError(
            f"train.global_batch = {g} is not divisible by train.micro_batch ({mb}) x world_size "
            f"({world_size}) = {mb * world_size}: pick a global_batch that is a multiple of "
            f"{mb * world_size}, or change micro_batch / the number of ranks"
        )
    return g // (mb * world_size)


# --------------------------------------------------------------------------------------------
# Dict / YAML conversion
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of the config, YAML-friendly (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Strict inverse of ``config_to_dict`` (partial dicts allowed); validates the result."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
    cfg = _build(Config, d, "", source)
    _validate_from(cfg, source)
    return cfg


def _validate_from(cfg: Config, source: str | None, overrides: Sequence[str] = ()) -> None:
    """``validate`` with the origin of the values appended to the message."""
    try:
        validate(cfg)
    except ConfigError as e:
        origin = f"from {source}" if source else ""
        if overrides:
            origin += (" with " if origin else "from ") + "--set " + " --set ".join(overrides)
        raise ConfigError(f"{e} ({origin})" if origin else str(e)) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}: duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# sidscale resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# Presets, overrides, loading
# --------------------------------------------------------------------------------------------


def list_presets() -> list[str]:
    """Names of the built-in presets (``sidscale/configs/*.yaml``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = list_presets()
        close = difflib.get_close_matches(name, presets, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ConfigError(f"unknown preset {name!r}{hint} Presets: {', '.join(presets) or '(none)'}")
    return path


def _resolve_source(name_or_path: str) -> Path:
    # NOTE: a bare name that is a preset wins over a same-named file in the cwd; anything that
    # looks like a path (separator or .yaml/.yml suffix) is a path.
    has_sep = os.sep in name_or_path or "/" in name_or_path
    looks_like_path = has_sep or name_or_path.endswith((".yaml", ".yml"))
    if not looks_like_path and name_or_path in list_presets():
        return preset_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if looks_like_path:
        raise ConfigError(f"config file not found: {name_or_path}")
    return preset_path(name_or_path)  # raises with the list of presets


def _parse_override(text: str, field_type: Any) -> Any:
    raw = text.split("=", 1)[1]
    if field_type is str:
        # NOTE: str fields take the raw text, so "a{0..3}.tar" or "yes" stay strings; a fully
        # quoted value is unquoted so `--set teacher.path=""` gives the empty string.
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return yaml.safe_load(raw)
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: value is not valid YAML: {e}") from None


def apply_override(cfg: Config, text: str) -> None:
    """Apply one ``key.sub=value`` override in place (type-checked, not yet validated)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.max_steps=100")
    key = text.split("=", 1)[0].strip()
    parts = key.split(".")
    section: Any = cfg
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"--set {text}: '{prefix}' is a value, not a section")
        hints = _hints(type(section))
        if part not in hints:
            raise _unknown_key(part, prefix, list(hints), f"--set {text}")
        if depth < len(parts) - 1:
            section = getattr(section, part)
    name, tp = parts[-1], hints[parts[-1]]
    value = _parse_override(text, tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        # NOTE: a whole-section override (`--set method={alpha: 1.2}`) merges into the current
        # section instead of resetting its other keys to defaults.
        value = {**config_to_dict(getattr(section, name)), **value}
    value = _coerce(value, tp, key, f"--set {text}")
    setattr(section, name, value)


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Load a preset (by name) or YAML file (by path), apply ``--set`` overrides, validate."""
    path = _resolve_source(str(name_or_path))
    source = str(path)
    cfg = _build(Config, _read_yaml(path), "", source)
    for text in overrides:
        apply_override(cfg, text)
    _validate_from(cfg, source, overrides)
    return cfg


def resolve_deepspeed_config(cfg: Config) -> Path:
    """The DeepSpeed JSON path: absolute as is; relative against the cwd, then the repo root."""
    raw = Path(cfg.deepspeed.config).expanduser()
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw, REPO_ROOT / raw]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"deepspeed.config = {cfg.deepspeed.config!r}: file not found (tried {tried})")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    presets = ", ".join(list_presets()) or "(none)"
    parser.add_argument("--config", default="toy",
                        help=f"preset name ({presets}) or path to a YAML file (default: toy)")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.max_steps=100 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set or ())


__all__ = [
    "Config", "ConfigError", "DataConfig", "DeepSpeedSection", "DistilledGuidanceConfig", "EvalConfig", "MethodConfig",
    "NetConfig", "PreviewConfig", "ScheduleConfig", "TeacherConfig", "TrainConfig",
    "accumulation_steps", "add_config_args", "apply_override", "config_from_args",
    "config_from_dict", "config_to_dict", "dump_config", "list_presets", "load_config",
    "preset_path", "resolve_deepspeed_config", "validate",
]
