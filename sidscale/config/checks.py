"""Checks of the values of a run configuration (their types are already right by construction).

``validate`` raises ``ConfigError`` on the first impossible value, naming the key path, the value and
what was expected. The generic checks come first; the rules of one teacher family come last, in
``family_rules``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidscale.config.schema import TOY_KINDS, Config, NetConfig
from sidscale.errors import ConfigError
from sidscale.families import TEACHER_KINDS, validate_family_config  # the family registry owns kinds and rules
from sidscale.method.base import METHODS
from sidscale.method.losses import GEN_WEIGHTING_NAMES
from sidscale.method.sid_lsg import NOISE_TYPES

DTYPES = ("fp32", "bf16", "fp16")
TRAIN_PRECISIONS = (*DTYPES, "pure_bf16")  # pure_bf16: bf16 weights, grads and Adam states (docs/precision.md)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
ATTENTION_MODES = ("sdpa", "eager")
TEXT_ENCODER_DEVICES = ("gpu", "cpu")
BETA_SCHEDULES = ("scaled_linear", "linear")
TEACHER_PLACEMENTS = ("auto", "true", "false")


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
    # NOTE: null eps / grad_clip_value under pure_bf16 mean 1e-4 / 1.0 (sidscale.core.precision); the messages
    # below keep their wording (tests/unit/test_config.py asserts it)
    _check_non_negative(net, prefix, ["lr", "weight_decay"])
    _check(net.eps is None or net.eps > 0, f"{prefix}.eps", net.eps,
           "a positive value, or null (1e-8; 1e-6 when train.precision = fp16, 1e-4 when pure_bf16)")
    _check(net.grad_clip_value is None or net.grad_clip_value >= 0, f"{prefix}.grad_clip_value",
           net.grad_clip_value,
           "a value >= 0 (0 = off), or null (1.0 when train.precision = fp16 or pure_bf16, else off)")
    for i, beta in enumerate(net.betas):
        _check(0.0 <= beta < 1.0, f"{prefix}.betas[{i}]", beta, "a value in [0, 1)")


def _validate_adversarial(cfg: Config) -> None:
    a = cfg.method.adversarial
    _check_non_negative(a, "method.adversarial", ["disc_scale", "gen_scale", "disc_warmup_kimg"])
    _check(a.mix_after_kimg >= a.disc_warmup_kimg, "method.adversarial.mix_after_kimg", a.mix_after_kimg,
           f"a value >= method.adversarial.disc_warmup_kimg = {a.disc_warmup_kimg}")
    _check(0.0 <= a.mix_weight <= 1.0, "method.adversarial.mix_weight", a.mix_weight, "a weight in [0, 1]")
    _check(a.logit_clamp > 0, "method.adversarial.logit_clamp", a.logit_clamp, "a positive bound")
    _check(not a.enabled or cfg.data.real_shards != "", "data.real_shards", cfg.data.real_shards,
           "real (latent or image, caption) shards when method.adversarial.enabled = true "
           "(tools/make_real_shards.py; 'toy' for the toy teachers' exact samples)")
    # NOTE: the discriminator's read-out is a forward hook added per call: torch.compile would recompile
    _check(not (a.enabled and cfg.train.compile), "train.compile", cfg.train.compile,
           "false with method.adversarial.enabled = true (its feature read-out is a forward hook)")
    _check(a.enabled or cfg.data.real_shards == "", "data.real_shards", cfg.data.real_shards,
           "'' when method.adversarial.enabled = false (real pairs are read only by the adversarial method)")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError on the first impossible value; with ``world_size``, also check batching."""
    t = cfg.teacher
    _check_enum("teacher.kind", t.kind, TEACHER_KINDS)
    _check(t.cache_dir != "", "teacher.cache_dir", t.cache_dir, "a directory path")
    _check_enum("teacher.dtype", t.dtype, DTYPES)
    _check_enum("teacher.prediction_type", t.prediction_type, PREDICTION_TYPES)
    _check_enum("teacher.attention", t.attention, ATTENTION_MODES)
    _check_enum("teacher.text_encoders", t.text_encoders, TEXT_ENCODER_DEVICES)
    _check_enum("teacher.partitioned", t.partitioned, TEACHER_PLACEMENTS)
    _check_positive(t, "teacher", ["resolution", "max_sequence_length"])

    s = cfg.schedule
    _check_positive(s, "schedule", ["num_train_timesteps", "beta_start"])
    _check(s.beta_start < s.beta_end < 1.0, "schedule.beta_end", s.beta_end,
           f"a value in (beta_start={s.beta_start}, 1)")
    _check_enum("schedule.beta_schedule", s.beta_schedule, BETA_SCHEDULES)

    m, n_t = cfg.method, cfg.schedule.num_train_timesteps
    _check_enum("method.name", m.name, tuple(METHODS))  # the method registry (method/base.py)
    _check_non_negative(m, "method", ["cfg_eval_real", "alpha", "fake_loss_scale", "gen_loss_scale"])
    # NOTE: cfg_train_fake / cfg_eval_fake may be negative (Anti-CFG, a negative fake-net guidance); the
    # teacher's cfg_eval_real may not. Non-finite floats are already refused when the value is parsed.
    _check(0 <= m.t_init < n_t, "method.t_init", m.t_init, f"a timestep in [0, {n_t})")
    _check(0 <= m.t_min < n_t, "method.t_min", m.t_min, f"a timestep in [0, {n_t})")
    # NOTE: t_max is exclusive (t ~ UniformInt{t_min .. t_max-1}), so t_max == T is still valid.
    _check(0 < m.t_max <= n_t, "method.t_max", m.t_max, f"an exclusive bound in (0, {n_t}]")
    _check(m.t_min < m.t_max, "method.t_min", m.t_min, f"a value below method.t_max={m.t_max}")
    _check(0.0 <= m.prompt_dropout < 1.0, "method.prompt_dropout", m.prompt_dropout, "a value in [0, 1)")
    # NOTE: VP steps t_i = int(t_init (1 - i/K)) must stay distinct and >= 1 step apart.
    _check(1 <= m.generator_steps <= max(1, m.t_init), "method.generator_steps", m.generator_steps,
           f"an int in [1, method.t_init={m.t_init}]")
    _check_enum("method.gen_weighting", m.gen_weighting, GEN_WEIGHTING_NAMES)  # ours and the authors' spellings
    _check(0.0 < m.sigma_init <= 1.0, "method.sigma_init", m.sigma_init, "a sigma in (0, 1]")
    _check_enum("method.noise_type", m.noise_type, NOISE_TYPES)
    _validate_adversarial(cfg)
    _check(m.sigma_logit_std > 0, "method.sigma_logit_std", m.sigma_logit_std, "a positive std")

    _validate_net(cfg.generator, "generator")
    _validate_net(cfg.fake, "fake")

    tr = cfg.train
    _check_positive(tr, "train", ["global_batch", "micro_batch", "max_steps", "ema_halflife_kimg",
                                  "log_every", "preview_every", "ckpt_every", "keep_last"])
    _check_non_negative(tr, "train", ["ema_rampup_ratio"])
    _check(0.0 < tr.memory_fraction <= 1.0, "train.memory_fraction", tr.memory_fraction, "a fraction in (0, 1]")
    # NOTE: numpy seeds must fit in uint32; torch would take more, but one range for both.
    _check(0 <= tr.seed < 2**32, "train.seed", tr.seed, "an int in [0, 2**32)")
    _check_enum("train.precision", tr.precision, TRAIN_PRECISIONS)
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

    family_rules(cfg)

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


# at merge: replaced by families.family_for_kind(cfg.teacher.kind).validate(cfg)
def family_rules(cfg: Config) -> None:
    """The rules that depend on ``teacher.kind`` (``validate`` has already checked the kind itself): a
    directory and a latent-compatible resolution for every teacher that is not built in, then the
    family's own rules from its spec (``sidscale.families``: the family owns its options)."""
    t = cfg.teacher
    # built-in teachers (toy kinds) need no directory; every other family loads one
    _check(t.is_toy or t.path != "", "teacher.path", t.path,
           f"a local diffusers directory (only kinds {' / '.join(TOY_KINDS)} have a built-in teacher; "
           f"kind is {t.kind!r})")
    # NOTE: SD VAEs downsample by 8; any other size cannot map to a latent grid.
    _check(t.is_toy or t.resolution % 8 == 0, "teacher.resolution", t.resolution,
           f"a multiple of 8 for kind {t.kind!r}")
    validate_family_config(cfg)
