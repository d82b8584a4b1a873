"""The ZeRO terms of the memory plan that depend on a network's element counts, not on a preset: a
network's counts (``counts_of``), the partitioned teacher (``teacher_terms``), the module a
``deepspeed.zero.Init`` build holds whole, and the ZeRO blocks of ds_configs/. The model they belong to
is ``sidscale.perf.memory_plan``'s docstring."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sidscale.families.shared.diffusers_dir import DTYPES

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NetCounts:
    """Element counts of a real network (``counts_of``): what the plan needs of it, from the network itself
    instead of a preset (``sidscale.perf.placement``: teacher.partitioned = auto)."""

    params: int
    buffers: int  # floating-point buffers (SD3's pos_embed)
    largest_module: int  # the most parameters one module owns directly (the plan's ZeRO-3 gather unit)
    persistent: int  # parameters in tensors of at most the persistence threshold (ZeRO-3 keeps them whole)
    # the most parameters of one block (an element of a ModuleList: a transformer / UNet block); measured:
    # DeepSpeed 0.19 held one whole transformer block of a partitioned teacher gathered at once, in the
    # checkpoint recomputation of the generator's backward (tiny SD3.5, 2 ranks, prefetch 0)
    largest_block: int = 0


def counts_of(net, persistence_threshold: int) -> NetCounts:
    """``NetCounts`` of ``net`` (any device, meta included; a ZeRO-3 partitioned net counts its full sizes)."""
    def numel(p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = [numel(p) for p in net.parameters()]
    largest = max((sum(numel(p) for p in m.parameters(recurse=False)) for m in net.modules()), default=0)
    blocks = [sum(numel(p) for p in b.parameters()) for m in net.modules() if isinstance(m, torch.nn.ModuleList)
              for b in m]
    return NetCounts(params=sum(params), buffers=sum(b.numel() for b in net.buffers() if b.is_floating_point()),
                     largest_module=largest, persistent=sum(n for n in params if n <= persistence_threshold),
                     largest_block=max([largest, *blocks]))


def teacher_zero_settings(zs: dict) -> dict:
    """The ZeRO block the partitioned teacher runs with (``teacher_partition.teacher_ds_config``)."""
    from sidscale.distributed.teacher_partition import teacher_ds_config

    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": zs}
    return teacher_ds_config(ds, "fp32")["zero_optimization"]


def teacher_terms(c: NetCounts, teacher_bytes: int, gpus: int, partitioned: bool,
                  zt: dict) -> tuple[dict[str, float], float]:
    """(static bytes of the teacher network, bytes of its gathered layers while it runs), per GPU, as measured
    on 2 ranks (tests/trainer/test_teacher_partition.py) -- finer than the plan's own teacher terms (``plan``:
    ``teacher_net`` = its padded 1/N, ``zero3_gathered_params`` = largest module + one prefetch bucket):

    - tensors of at most stage3_param_persistence_threshold elements stay whole on every rank;
    - in flight: at most max(B, min(stage3_max_live_parameters, B + prefetch bucket + reuse distance))
      elements, B the largest block (``NetCounts.largest_block``), never more than the sharded teacher.

    ``zt``: the teacher's ZeRO block (``teacher_zero_settings``)."""
    tb = teacher_bytes
    if not partitioned:
        return {"teacher_net": float(tb * c.params)}, 0.0
    sharded = c.params - c.persistent
    block = max(c.largest_block, c.largest_module)
    in_flight = max(block, min(int(zt["stage3_max_live_parameters"]),
                               block + int(zt["stage3_prefetch_bucket_size"]) + int(zt["stage3_max_reuse_distance"])))
    static = {"teacher_net_partition": tb * sharded / gpus}
    if c.persistent:
        static["teacher_net_persistent"] = float(tb * c.persistent)
    return static, float(tb * min(sharded, in_flight))


def zero_init_module_transient(c: NetCounts, precision: str) -> float:
    """Bytes of the module a ``deepspeed.zero.Init`` build holds whole before partitioning it (the
    largest module, in the training dtype; the buffers in fp32)."""
    return float(DTYPES[precision].itemsize * c.largest_module + 4 * c.buffers)


def ds_zero_settings(zero: int) -> dict:
    """The zero_optimization block of ds_configs/zero{zero}.json."""
    return json.loads((REPO / "ds_configs" / f"zero{zero}.json").read_text())["zero_optimization"]


def partition_elements(numel: int, n: int) -> int:
    """Elements one rank keeps of a ZeRO-3 partitioned tensor (padded to a multiple of N)."""
    return -(-numel // n)
