"""FLOPs counted on real executions with ``torch.utils.flop_counter.FlopCounterMode``, and MFU.

Counting conventions (those of FlopCounterMode): 2 FLOPs per multiply-accumulate of matmuls,
convolutions and attention, forward and backward; element-wise ops, norms and the optimizer are
not counted (they are <2% of a UNet's arithmetic and do not run on tensor cores). What is counted
is what executed: with activation checkpointing the recomputed forwards are included, so the
resulting utilisation is hardware FLOPs utilisation (HFU), which is >= MFU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

aten = torch.ops.aten

# NOTE: torch registers SDPA formulas for the CUDA kernels (flash / efficient / cuDNN) only. On CPU
# SDPA runs ``_scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode would count as 0:
# map it to the same formulas so CPU and GPU counts agree (argument order q, k, v / grad, q, k, v).
_EXTRA_FORMULAS: dict[Any, Callable] = {}


def _reuse(registered: Callable) -> Callable:
    """A registered (already shape-wrapped) formula, marked raw so custom_mapping does not wrap it twice."""
    def formula(*args: Any, **kwargs: Any) -> int:
        return registered(*args, **kwargs)

    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


for _cpu_op, _cuda_op in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward",
                           "_scaled_dot_product_flash_attention_backward")):
    if hasattr(aten, _cpu_op):
        _EXTRA_FORMULAS[getattr(aten, _cpu_op)] = _reuse(flop_registry[getattr(aten, _cuda_op)])


# Dense peak TFLOP/s per GPU from vendor data sheets (no sparsity). fp32 = non-tensor-core FP32;
# tf32 = tensor-core TF32 (what fp32 matmuls use when TF32 is allowed).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=dict(_EXTRA_FORMULAS))


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs executed by ``fn()``, its result). Counts forward and any backward run inside fn."""
    with flop_counter() as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Known dense peak of a GPU by its ``torch.cuda.get_device_name`` (None when unknown).

    ``precision`` is the math the matmuls run in: bf16 | fp16 | tf32 | fp32.
    """
    name = device_name.upper()
    if "H200" in name:
        key = "H200"
    elif "H100" in name:  # "NVIDIA H100 80GB HBM3" is the SXM part
        key = "H100 PCIe" if "PCIE" in name else "H100 SXM"
    elif "A100" in name:
        key = "A100"
    elif "L40S" in name:
        key = "L40S"
    else:
        return None
    return PEAK_TFLOPS[key][precision]


def matmul_precision(train_precision: str, tf32: bool) -> str:
    """The math precision that bounds the iteration's matmuls for the MFU denominator."""
    if train_precision in ("bf16", "fp16"):
        return train_precision
    if train_precision == "pure_bf16":
        return "bf16"
    return "tf32" if tf32 else "fp32"


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Achieved / peak FLOP/s, or None without a peak."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
