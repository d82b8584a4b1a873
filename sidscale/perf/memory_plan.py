"""Predicted per-GPU memory of one SiD-LSG training rank, term by term, and the largest micro-batch.

Model (P = UNet parameters, N = GPUs, b = bytes of the training precision, Z = ZeRO stage):

- generator and fake net, each a DeepSpeed engine with torch Adam:
  * module params: b*P (Z1/2, replicated) or b*P/N (Z3);
  * fp32 master partition: 4*P/N (kept by ZeRO for bf16/fp16 and also for fp32);
  * gradients: the reduced gradient partition in the training dtype, b*P/N (Z2/3; measured as
    ``averaged_gradients`` of a real engine), or the full b*P (Z1), plus the contiguous reduction
    buckets of Z1/2 while the backward runs: (1 + overlap_comm) * reduce_bucket_size * b. The fp32
    gradient copy made inside ``step()`` (4*P/N) is not added: activations are freed by then;
  * Adam exp_avg + exp_avg_sq: 8*P/N.
- generator EMA: fp32, sharded 1/N (ShardedEMA).
- teacher UNet and text encoder(s): replicated, in teacher.dtype.
- activations, the generator step being the peak (the method page: three UNets' activations are
  alive in its backward): B samples through G (trainable), 2B through the fake net and 2B through
  the teacher (CFG batches, frozen weights: they save only what the input gradient needs).
  Per-sample bytes are measured with saved_tensors_hooks on a meta-device forward at the preset's
  own latent size (sidscale.perf.activations), so no scaling by resolution is needed. With
  checkpointing the saved bytes are the checkpointed blocks' inputs, plus the recomputation of one
  block at a time, modelled as the no-checkpointing bytes / number of checkpointed blocks x 2
  (blocks are unequal; 2x the mean covers the largest measured).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from sidscale.models.teacher import DTYPES
from sidscale.perf.activations import flash_sdpa_on_meta, saved_tensor_bytes, unet_inputs
from sidscale.perf.setup import build_preset_text_encoders, build_preset_unet, latent_shape

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PlanInput:
    preset: str
    gpus: int = 8
    zero: int = 2
    micro_batch: int = 1
    precision: str = "bf16"
    teacher_dtype: str | None = None  # default: the training precision
    grad_checkpointing: bool = False
    gpu_mem_gib: float = 80.0
    cfg_scales: tuple[float, float, float] = (1.5, 1.5, 1.5)  # k1 (fake step), k2 (fake in G step), k4 (teacher)


@dataclass
class MemoryPlan:
    inputs: PlanInput
    terms: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    max_micro_batch: int = 0

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def to_dict(self) -> dict:
        d = {"inputs": {**self.inputs.__dict__, "cfg_scales": list(self.inputs.cfg_scales)},
             "terms_gib": {k: v / GIB for k, v in self.terms.items()}, "total_gib": self.total / GIB,
             "max_micro_batch": self.max_micro_batch}
        return d


def ds_zero_settings(zero: int) -> dict:
    """The zero_optimization block of ds_configs/zero{zero}.json."""
    return json.loads((REPO / "ds_configs" / f"zero{zero}.json").read_text())["zero_optimization"]


@lru_cache(maxsize=8)
def param_counts(preset: str) -> tuple[int, int]:
    """(UNet parameters, text-encoder parameters), counted on meta."""
    unet = sum(p.numel() for p in build_preset_unet(preset, "meta").parameters())
    text = sum(p.numel() for e in build_preset_text_encoders(preset, "meta") for p in e.parameters())
    return unet, text


@lru_cache(maxsize=32)
def activation_bytes_per_sample(preset: str, dtype_name: str, trainable: bool, grad_checkpointing: bool) -> float:
    """Saved bytes per sample of one UNet forward at the preset's latent size (meta device).

    ``trainable``: weights require grad (G, and the fake net in its own step); else frozen weights
    with an input that requires grad (fake net and teacher in the generator step).
    """
    dtype = DTYPES[dtype_name]
    unet = build_preset_unet(preset, "meta").to(dtype).requires_grad_(trainable)
    size = latent_shape(preset)[1]
    if grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    def run(batch: int) -> int:
        args, kw = unet_inputs(unet, batch, size, "meta", dtype)
        with torch.enable_grad(), flash_sdpa_on_meta():
            return saved_tensor_bytes(lambda: unet(*args, **kw, return_dict=False)[0], list(unet.parameters()))

    return (run(4) - run(2)) / 2


def checkpoint_blocks(preset: str) -> int:
    """Modules diffusers checkpoints one by one (each resnet and each transformer)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = build_preset_unet(preset, "meta")
    return sum(isinstance(m, ResnetBlock2D | Transformer2DModel) for m in unet.modules())


def _activations(inp: PlanInput, micro_batch: int) -> dict[str, float]:
    teacher_dtype = inp.teacher_dtype or inp.precision
    k1, k2, k4 = inp.cfg_scales
    ck = inp.grad_checkpointing

    def per_sample(dtype: str, trainable: bool) -> float:
        a = activation_bytes_per_sample(inp.preset, dtype, trainable, ck)
        if ck:  # one block recomputed at a time on top of the saved block inputs
            a += 2 * activation_bytes_per_sample(inp.preset, dtype, trainable, False) / checkpoint_blocks(inp.preset)
        return a

    cfg_batch = (lambda k: 2 * micro_batch if k != 1.0 else micro_batch)
    gen_step = (micro_batch * per_sample(inp.precision, True)
                + cfg_batch(k2) * per_sample(inp.precision, False)
                + cfg_batch(k4) * per_sample(teacher_dtype, False))
    fake_step = cfg_batch(k1) * per_sample(inp.precision, True)
    return {"activations": max(gen_step, fake_step)}


def plan(inp: PlanInput, micro_batch: int | None = None) -> MemoryPlan:
    mb = inp.micro_batch if micro_batch is None else micro_batch
    n, z = inp.gpus, inp.zero
    b = DTYPES[inp.precision].itemsize
    tb = DTYPES[inp.teacher_dtype or inp.precision].itemsize
    unet_p, text_p = param_counts(inp.preset)
    zs = ds_zero_settings(z)
    terms: dict[str, float] = {}
    per_engine = {
        "params": b * unet_p / (n if z == 3 else 1),
        "fp32_master": 4 * unet_p / n,
        "grads": b * unet_p / (1 if z == 1 else n),
        "adam_states": 8 * unet_p / n,
    }
    if z in (1, 2) and zs.get("contiguous_gradients", True):
        per_engine["grad_buckets"] = (1 + bool(zs.get("overlap_comm"))) * float(zs["reduce_bucket_size"]) * b
    for name in ("generator", "fake"):
        for k, v in per_engine.items():
            terms[f"{name}_{k}"] = v
    terms["ema_fp32"] = 4 * unet_p / n
    terms["teacher_unet"] = tb * unet_p
    terms["text_encoders"] = tb * text_p
    terms.update(_activations(inp, mb))
    out = MemoryPlan(inp, terms)
    out.max_micro_batch = max_micro_batch(inp) if micro_batch is None else 0
    return out


def max_micro_batch(inp: PlanInput, limit: int = 1024) -> int:
    """Largest micro-batch whose predicted total fits ``gpu_mem_gib`` (0: not even 1)."""
    budget = inp.gpu_mem_gib * GIB
    best, mb = 0, 1
    while mb <= limit and plan(inp, mb).total <= budget:
        best, mb = mb, mb + 1
    return best
