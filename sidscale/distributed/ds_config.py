"""DeepSpeed JSON configs: read the user's file, fill batch sizes and precision from sidscale.

The sidscale config owns batch sizes and precision; a ds_config that sets them differently is
a conflict and an error (rather than two sources of truth that silently disagree).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sidscale.config import Config, ConfigError, accumulation_steps, resolve_deepspeed_config

SUPPORTED_STAGES = (1, 2, 3)
# Keys sidscale fills in; a user file may omit them, or state the same values.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_ds_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"deepspeed.config {path}: cannot read ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config {path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config {path}: expected a JSON object at the top level")
    return data


def _precision_block(precision: str, user: dict) -> dict:
    """bf16/fp16 blocks from train.precision; loss-scaler settings in the user's fp16 block are kept."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if precision == "pure_bf16":
        # No fp32 master: the ZeRO optimizer's partition, its gradient and Adam's moments are bf16
        # (DeepSpeed 0.19.8, ZeRO 1/2/3; docs/precision.md).
        return {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True},
                "fp16": {"enabled": False}}
    if precision == "fp16":
        # Dynamic loss scaling (loss_scale 0); each engine keeps its own scaler.
        fp16 = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                "min_loss_scale": 1}
        fp16.update({k: v for k, v in (user.get("fp16") or {}).items() if k != "enabled"})
        return {"bf16": {"enabled": False}, "fp16": {**fp16, "enabled": True}}
    return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}


_DTYPE_NAMES = ("fp32", "bf16", "fp16")


def _ds_key(precision: str) -> str:
    """The DeepSpeed block a ``train.precision`` enables (pure_bf16 is DeepSpeed's bf16 block)."""
    return "bf16" if precision == "pure_bf16" else precision


def _bf16_accumulation_block(stage: int, user: dict, path: Path) -> dict:
    """fp32 gradient accumulation for bf16 training (measured on DeepSpeed 0.19.8, docs/precision.md).

    DeepSpeed's default accumulation dtype is the model dtype: with bf16 every ZeRO stage sums the
    micro-batch gradients in bf16, so at 16-128 micro-batches per step the late ones are rounded away
    (a contribution below 2^-9 of the running sum is lost entirely). ``data_types.grad_accum_dtype =
    fp32`` makes ZeRO-2/3 accumulate into an fp32 gradient partition, and turns ZeRO-1 into
    DeepSpeed's BF16_Optimizer with a full fp32 gradient buffer; that one is all-reduced once per
    step in ``communication_data_type``, which defaults to bf16 and would round the fp32 sum again,
    so ZeRO-1 also reduces in fp32 (once per optimizer step, not per micro-batch). ZeRO-2/3 keep
    reducing each micro-batch's gradient in bf16 (their per-micro-batch traffic), and add the
    reduced partition into the fp32 accumulator. A user's own ``data_types`` /
    ``communication_data_type`` are kept (e.g. bf16 accumulation to save memory).
    """
    data_types = user.get("data_types", {})
    if not isinstance(data_types, dict):
        raise ConfigError(f"deepspeed.config {path}: data_types must be a JSON object, got {data_types!r}")
    data_types = {**data_types}
    accum = data_types.setdefault("grad_accum_dtype", "fp32")
    if accum not in _DTYPE_NAMES:
        raise ConfigError(f"deepspeed.config {path}: data_types.grad_accum_dtype = {accum!r}; expected one of "
                          f"{_DTYPE_NAMES}")
    out: dict = {"data_types": data_types}
    zero = user.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    # NOTE: with optimizer offload DeepSpeed keeps its ZeRO-1 optimizer (no BF16_Optimizer), whose
    # reduction is not the fp32 sum's last step: leave its communication dtype alone there.
    if stage == 1 and accum == "fp32" and not offload and "communication_data_type" not in user:
        out["communication_data_type"] = "fp32"
    return out


def _pure_bf16_block(user: dict, path: Path) -> dict:
    """bf16 gradient accumulation for pure_bf16, and a refusal of what DeepSpeed 0.19.8 cannot run.

    The gradients are bf16 by definition here (the authors accumulate micro-batches in the bf16
    ``.grad``). An fp32 accumulation dtype would make ZeRO-1 DeepSpeed's BF16_Optimizer, which keeps
    fp32 masters and ignores ``bf16_master_weights_and_grads``: refused rather than silently fp32.
    Offload is refused: with bf16 masters DeepSpeed 0.19.8 asserts on anything but a
    DeepSpeedCPUAdam built with ``fp32_optimizer_states=False`` (``base_optimizer.py:
    _configure_master_weights``), while sidscale's offload configs pass a torch Adam
    (``engines.build_optimizer``).
    """
    data_types = user.get("data_types", {})
    if not isinstance(data_types, dict):
        raise ConfigError(f"deepspeed.config {path}: data_types must be a JSON object, got {data_types!r}")
    accum = data_types.get("grad_accum_dtype", "bf16")
    if accum != "bf16":
        raise ConfigError(f"deepspeed.config {path}: data_types.grad_accum_dtype = {accum!r} with train.precision = "
                          "'pure_bf16', whose gradients are bf16; remove the key, or use train.precision = bf16 "
                          "(fp32 masters and fp32 accumulation)")
    zero = user.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "null"):
            raise ConfigError(f"deepspeed.config {path}: zero_optimization.{key} with train.precision = 'pure_bf16' "
                              "is not supported (DeepSpeed 0.19.8 needs its CPU Adam with bf16 moments for bf16 "
                              "masters under offload, and sidscale's offload runs use torch Adam); use "
                              "train.precision = bf16, or no offload")
    return {"data_types": {**data_types, "grad_accum_dtype": "bf16"}}


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The effective DeepSpeed config of both engines for this run."""
    path = resolve_deepspeed_config(cfg)
    user = read_ds_config(path)
    gas = accumulation_steps(cfg, world_size)
    owned = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": gas,
    }
    for key in _OWNED_KEYS:
        if key in user and user[key] != "auto" and user[key] != owned[key]:
            raise ConfigError(
                f"deepspeed.config {path}: {key} = {user[key]!r} conflicts with the sidscale config "
                f"({key} = {owned[key]} from train.global_batch={cfg.train.global_batch}, "
                f"train.micro_batch={cfg.train.micro_batch}, world size {world_size}); remove it from the "
                "JSON: sidscale fills it in"
            )
    for key in ("bf16", "fp16"):
        block = user.get(key)
        if isinstance(block, dict) and block.get("enabled") and _ds_key(cfg.train.precision) != key:
            raise ConfigError(
                f"deepspeed.config {path}: {key}.enabled is true but train.precision = "
                f"{cfg.train.precision!r}; set precision in the sidscale config only"
            )
    if "optimizer" in user or "scheduler" in user:
        raise ConfigError(
            f"deepspeed.config {path}: remove the 'optimizer'/'scheduler' blocks; sidscale passes a torch "
            "Adam per engine built from generator.* and fake.* (a DeepSpeed-declared optimizer would also "
            "JIT-compile FusedAdam on CPU)"
        )
    zero = user.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(
            f"deepspeed.config {path}: zero_optimization.stage = {stage!r}; expected one of {SUPPORTED_STAGES}"
        )
    hpz = zero.get("zero_hpz_partition_size", 1) if isinstance(zero, dict) else 1
    if hpz not in (None, 1):
        # NOTE: DeepSpeed builds hpZ's secondary partitions from the zero.Init weights and refreshes them
        # only after an optimizer step: sidscale's partition loading (zero.Init, the partitioned teacher,
        # resume) and the EMA swap write the primary partition only, so the gathers would read stale
        # (random-init, or training-instead-of-EMA) weights.
        raise ConfigError(
            f"deepspeed.config {path}: zero_optimization.zero_hpz_partition_size = {hpz!r} is not supported "
            "(hpZ's secondary partitions would keep stale weights after sidscale loads or swaps the primary "
            "ones); remove it or set it to 1"
        )
    out = copy.deepcopy(user)
    out.update(owned)
    out.update(_precision_block(cfg.train.precision, user))
    if cfg.train.precision == "bf16":
        out.update(_bf16_accumulation_block(stage, user, path))
    if cfg.train.precision == "pure_bf16":
        out.update(_pure_bf16_block(user, path))
    out.setdefault("steps_per_print", 10**9)
    # NOTE: DeepSpeed's default is gradient-norm clipping at 1.0 (GRADIENT_CLIPPING_DEFAULT); the
    # method has no norm clipping (its fp16 rule is value clipping, generator.grad_clip_value), so a
    # ds_config that does not ask for it explicitly must not get it.
    out.setdefault("gradient_clipping", 0.0)
    return out


def zero_stage(ds_config: dict) -> int:
    return int(ds_config["zero_optimization"]["stage"])


def check_precision_supported(precision: str) -> None:
    """Refuse a precision the DeepSpeed accelerator of this machine cannot train in, before any model
    is built. NOTE: on CPU, fp16 needs oneDNN fp16 kernels, which only some CPUs have (AVX512-FP16 /
    AMX-FP16): hosts of one machine kind differ, so this is asked of the running host, never assumed."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}[_ds_key(precision)]
    if not supported:
        raise ConfigError(
            f"train.precision = {precision!r} is not supported by DeepSpeed's {acc.device_name()!r} accelerator on "
            f"this machine{' (this CPU has no oneDNN fp16 kernels)' if acc.device_name() == 'cpu' else ''}; "
            "use train.precision=bf16 or fp32"
        )
