"""The frozen teacher partitioned by ZeRO-3 across the ranks (``teacher.partitioned``).

A replicated teacher costs every rank its full weights (FLUX.1-dev: 22 GB in bf16). Partitioned,
each rank holds 1/N of them and DeepSpeed's ZeRO-3 hooks gather one layer at a time (plus the
prefetched ones) while the teacher runs, in its forward and again in the backward that carries the
generator's gradient through it. How (docs/flow_matching.md 5.5, measured on 2 CPU ranks):

- ``deepspeed.initialize(model=teacher, config=teacher_ds_config(...))`` WITHOUT an optimizer: an
  optimizer-less ZeRO-3 engine (``DeepSpeedZeRoOffload``) that partitions the parameters and installs
  the gather/release hooks on the module itself;
- the teacher is called as ``engine.module(...)`` (the same object as ``teacher.net``), never as
  ``engine(...)``: the engine's forward registers backward hooks that an optimizer-less engine cannot
  serve, and the generator's backward fails. Called through ``.module`` the generator's loss and every
  gradient equal the replicated teacher's bit for bit (tests/trainer/test_teacher_partition.py: tiny SD3.5, CFG
  on) -- wherever the backward sums a tensor's gradient from the same groups of consumers in both
  placements. ZeRO-3's hooks add an autograd node at each module's inputs, which regroups a sum over
  three or more consumers across module boundaries: measured, the tiny toy UNet's input gradient
  (the skip connections) and FLUX without true CFG (the generator's output read directly by the
  teacher, the fake net and the loss) then differ in the last bits (fp32 rounding), while FLUX with
  true CFG (the teacher reads a concatenation) is bit-identical again;
- its output is NEVER detached: the generator's gradient flows through the teacher.

Every rank must call the teacher the same number of times (each call's gathers are collectives):
the generator step does, in lockstep; anything that runs the teacher on one rank only (previews,
the toy evaluation) must run it on all ranks or use a gathered copy (``Trainer``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("sidscale.teacher")

# ZeRO-3 keys of the user's ds_config the teacher engine inherits (gather granularity and prefetch).
_INHERITED_ZERO_KEYS = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                        "stage3_model_persistence_threshold", "stage3_max_live_parameters",
                        "stage3_max_reuse_distance", "overlap_comm", "offload_param", "zero_hpz_partition_size")
# NOTE: DeepSpeed keeps a gathered parameter whose next use (in its recorded module order) is within
# stage3_max_reuse_distance elements; its default, 1e9, keeps a whole sub-1B teacher gathered from its
# forward through the generator's backward. The teacher's own default is one prefetch bucket, so a
# rank holds its 1/N plus the layers in flight (memory plan: ``teacher_gather``).
DEFAULT_TEACHER_ZERO = {"stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
                        "stage3_max_live_parameters": 100_000_000, "stage3_max_reuse_distance": 50_000_000}


def teacher_ds_config(ds_config: dict, teacher_dtype: str) -> dict:
    """The optimizer-less ZeRO-3 config of the teacher engine, derived from the trainable nets' config.

    Batch sizes as the trainable engines (DeepSpeed requires them; nothing here uses them), the
    teacher's own dtype (``teacher.dtype``: bf16/fp16 enabled only when the teacher is in that dtype,
    so DeepSpeed never casts it), ZeRO stage 3 with the gather settings of the user's ZeRO block where
    it sets them (``DEFAULT_TEACHER_ZERO`` otherwise) and no optimizer offload (there is no optimizer).
    """
    if teacher_dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"teacher.dtype = {teacher_dtype!r}: expected fp32, bf16 or fp16")
    user_zero = ds_config.get("zero_optimization") or {}
    # NOTE: memory_efficient_linear false: partitioning an existing module with it on replaces
    # torch.nn.functional.linear process-wide by DeepSpeed's LinearFunctionForZeroStage3 (and it is
    # never restored), which rounds differently from torch's: every later linear of the generator,
    # the fake net and the text encoders would change with the teacher's placement. torch's linear
    # saves the parameter itself for the backward, which ZeRO-3 gathers again before the module's
    # backward runs, so the result is the same (tests/trainer/test_teacher_partition.py).
    zero = {"stage": 3, **DEFAULT_TEACHER_ZERO, "memory_efficient_linear": False}
    zero.update({k: copy.deepcopy(user_zero[k]) for k in _INHERITED_ZERO_KEYS if k in user_zero})
    return {
        "train_batch_size": ds_config["train_batch_size"],
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "zero_optimization": zero,
        "bf16": {"enabled": teacher_dtype == "bf16"},
        "fp16": {"enabled": teacher_dtype == "fp16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def partition_teacher(net: torch.nn.Module, ds_config: dict, teacher_dtype: str):
    """Partition the frozen ``net`` in place across the ranks; returns the optimizer-less engine.

    Afterwards ``engine.module is net``: call ``net`` (never the engine) inside the generator's graph.
    A collective: every rank must call it, with the same network.
    """
    import deepspeed

    if any(p.requires_grad for p in net.parameters()):
        raise ValueError("the teacher network must be frozen (requires_grad False) before it is partitioned")
    was_training = net.training
    engine, optimizer, _, _ = deepspeed.initialize(model=net, config=teacher_ds_config(ds_config, teacher_dtype))
    if engine.module is not net:
        raise RuntimeError("DeepSpeed wrapped a different module than the teacher network")
    if type(optimizer).__name__ != "DeepSpeedZeRoOffload" and type(engine.optimizer).__name__ != "DeepSpeedZeRoOffload":
        raise RuntimeError(f"the teacher engine is not an optimizer-less ZeRO-3 engine ({type(engine.optimizer)})")
    net.train(was_training)
    return engine


def gathered_teacher_elements(net: torch.nn.Module) -> int:
    """Elements of the partitioned ``net`` currently held whole on this rank (persistent ones excluded)."""
    return sum(p.ds_numel for p in net.parameters()
               if hasattr(p, "ds_numel") and p.data.numel() > 0 and not getattr(p, "ds_persist", False))


@dataclass
class Placement:
    """Where the teacher lives and why (``choose_placement``)."""

    partitioned: bool
    setting: str  # teacher.partitioned: "auto", "true" or "false"
    reason: str


def choose_placement(setting: str, fits_replicated: bool | None = None, detail: str = "") -> Placement:
    """``teacher.partitioned`` -> a placement. ``auto``: replicated when the memory plan says the run fits
    with a replicated teacher (``fits_replicated``), partitioned otherwise; replicated when the plan could
    not be made (``fits_replicated`` None: the detail says why)."""
    if setting == "true":
        return Placement(True, setting, "teacher.partitioned = true")
    if setting == "false":
        return Placement(False, setting, "teacher.partitioned = false")
    if setting != "auto":
        raise ValueError(f"teacher.partitioned = {setting!r}: expected auto, true or false")
    if fits_replicated is None:
        return Placement(False, setting, f"teacher.partitioned = auto: replicated ({detail})")
    where = "replicated" if fits_replicated else "partitioned"
    return Placement(not fits_replicated, setting, f"teacher.partitioned = auto: {where} ({detail})")


class GatherProbe:
    """Records the most elements of a partitioned network held whole at once during its forwards
    (each module's pre- and post-forward hooks, checkpoint recomputations included). Diagnostics for
    the tests and benchmarks; ``remove()`` detaches it."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.peak = 0
        self.peak_names: list[str] = []  # the parameters held whole at the peak
        self._handles = []
        for m in net.modules():
            self._handles.append(m.register_forward_pre_hook(lambda *_: self._record()))
            self._handles.append(m.register_forward_hook(lambda *_: self._record()))

    def now(self) -> int:
        return gathered_teacher_elements(self.net)

    def _record(self) -> None:
        now = self.now()
        if now > self.peak:
            self.peak = now
            self.peak_names = [n for n, p in self.net.named_parameters()
                               if p.data.numel() > 0 and not getattr(p, "ds_persist", False)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
