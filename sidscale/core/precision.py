"""Process-wide math settings of each ``train.precision``: the one place that sets them.

    fp32  the reference recipe's numerics: TF32 OFF for matmuls and for cuDNN convolutions, and
          ``float32_matmul_precision = "highest"`` (true IEEE fp32 everywhere). PyTorch's own
          defaults are NOT that: cuDNN allows TF32 by default, so a UNet's convolutions would run
          with a 10-bit mantissa in a run that claims to be the fp32 reproduction setting.
    bf16  TF32 ALLOWED for the parts that still run in fp32 (an fp32 teacher, the fp32 losses).
          TF32 keeps 10 mantissa bits, bf16 keeps 7: every fp32 matmul done in TF32 is still more
          precise than the bf16 matmuls of the trainable nets, so it cannot lower the run's
          precision floor, and it is up to 8x faster on A100/H100 tensor cores.
    fp16  TF32 ALLOWED, for the same reason (fp16 also keeps 10 mantissa bits).
    pure_bf16  the authors' ``--bf16 1``: bf16 weights, gradients and Adam states (no fp32 master,
          docs/precision.md). TF32 OFF, as in their loop: the fp32 parts left (the losses, the
          reductions) are the run's only full-precision arithmetic, and are kept exact.

The Trainer applies them at start (``Trainer.__init__``); the benchmark's trainer and reference
runners go through the same functions (``sidscale.bench.bench``). For bf16/fp16 only the CUDA
flags are set: ``torch.set_float32_matmul_precision("high")`` would also switch oneDNN's CPU
matmuls to reduced precision, which is not wanted for the CPU tests' fp32 comparisons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16")


@dataclass(frozen=True)
class MathSettings:
    cuda_matmul_allow_tf32: bool
    cudnn_allow_tf32: bool
    float32_matmul_precision: str | None  # None: leave torch.set_float32_matmul_precision as it is


def math_settings(precision: str) -> MathSettings:
    """What ``precision`` (a ``train.precision`` value) sets; see the module docstring for why."""
    if precision in ("fp32", "pure_bf16"):
        return MathSettings(False, False, "highest")
    if precision in ("bf16", "fp16"):
        return MathSettings(True, True, None)
    raise ValueError(f"train.precision = {precision!r}: expected one of {', '.join(PRECISIONS)}")


def uses_tf32(precision: str) -> bool:
    """Whether fp32 matmuls run in TF32 under ``precision`` (for MFU denominators)."""
    return math_settings(precision).cuda_matmul_allow_tf32


def current_settings() -> MathSettings:
    return MathSettings(bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32),
                        torch.get_float32_matmul_precision())


def apply_precision(precision: str) -> MathSettings:
    """Set the process-wide flags for ``precision``; returns the settings that were in force before."""
    before = current_settings()
    s = math_settings(precision)
    if s.float32_matmul_precision is not None:
        # NOTE: set first: set_float32_matmul_precision also writes cuda.matmul.allow_tf32, and the
        # explicit flags below must win.
        torch.set_float32_matmul_precision(s.float32_matmul_precision)
    torch.backends.cuda.matmul.allow_tf32 = s.cuda_matmul_allow_tf32
    torch.backends.cudnn.allow_tf32 = s.cudnn_allow_tf32
    return before


def restore_settings(saved: MathSettings) -> None:
    torch.set_float32_matmul_precision(saved.float32_matmul_precision or "highest")
    torch.backends.cuda.matmul.allow_tf32 = saved.cuda_matmul_allow_tf32
    torch.backends.cudnn.allow_tf32 = saved.cudnn_allow_tf32


@contextlib.contextmanager
def precision_context(precision: str) -> Iterator[None]:
    """``apply_precision`` for a block, restoring the previous flags after (benchmarks that
    alternate runners of different precisions in one process)."""
    saved = apply_precision(precision)
    try:
        yield
    finally:
        restore_settings(saved)


# --------------------------------------------------------------------------------------------
# Optimizer numerics per precision (docs/method.md 5-6, docs/precision.md)
# --------------------------------------------------------------------------------------------

ADAM_EPS = 1e-8
# The method's fp16 rule. The reference ran Adam in pure fp16, where 1e-8 underflows (fp16's smallest
# subnormal is 6e-8); DeepSpeed's fp16 keeps fp32 masters and Adam states, but the recipe's value
# stays the default so an fp16 run follows the recipe (override with generator.eps / fake.eps).
ADAM_EPS_FP16 = 1e-6
GRAD_CLIP_VALUE_FP16 = 1.0  # the method's fp16 rule: clip gradient values to [-1, 1] before each step
# The authors' pure-bf16 rules (SiD-DiT ``--bf16 1``): Adam moments in bf16 carry 8 mantissa bits, so
# sqrt(v) of a tiny gradient is coarse and 1e-8 would let the update of such an entry blow up to ~lr;
# eps 1e-4 bounds it. Gradient entries are clipped to [-1, 1] before every step (bf16 has no loss
# scaler and no fp32 master to absorb a large one).
ADAM_EPS_PURE_BF16 = 1e-4
GRAD_CLIP_VALUE_PURE_BF16 = 1.0
_DEFAULT_EPS = {"fp16": ADAM_EPS_FP16, "pure_bf16": ADAM_EPS_PURE_BF16}
_DEFAULT_CLIP = {"fp16": GRAD_CLIP_VALUE_FP16, "pure_bf16": GRAD_CLIP_VALUE_PURE_BF16}


def adam_eps(net_cfg, precision: str) -> float:
    """``net_cfg.eps`` (a ``config.NetConfig``), or, when it is null, 1e-8 (1e-6 under fp16, 1e-4
    under pure_bf16)."""
    if net_cfg.eps is not None:
        return float(net_cfg.eps)
    return _DEFAULT_EPS.get(precision, ADAM_EPS)


def grad_clip_value(net_cfg, precision: str) -> float | None:
    """The entry-wise gradient clip of ``net_cfg``: None = off. Null in the config means 1.0
    under fp16 and pure_bf16, off otherwise; 0 switches it off explicitly."""
    value = net_cfg.grad_clip_value
    if value is None:
        return _DEFAULT_CLIP.get(precision)
    return float(value) if value > 0 else None
