"""How the cost of one SiD iteration grows with the cluster: bytes each ZeRO stage moves per rank, and step time.

One iteration (sidscale/train.py ``train_step``) is a fake-score step then a generator step, each over
``A`` micro-batches of ``m`` samples per rank, then the EMA update. Per micro-batch (sidscale/method/sid_lsg.py):

- fake step: the generator G runs k times without grad (k = generator steps this iteration, 1..K), the fake
  net F forward and backward (trainable; one batched call of 2m with CFG, still ONE gather per module);
- generator step: G k-1 times without grad and once with grad (forward + backward), F and the teacher T
  forward and backward with frozen weights (the backward only computes input gradients). T does not run in
  the fake step.

What each ZeRO stage sends per rank (DeepSpeed 0.19.8, measured at ``deepspeed.comm`` on 2 CPU ranks:
tests/unit/test_scaling.py). Message sizes are what DeepSpeed's
comms logger records: the tensor a rank contributes (all-gather: its partition; reduce-scatter and all-reduce:
the full buffer). ``b``: 2 bytes for bf16/fp16, 4 for fp32.

- ZeRO-1/2 gradients: ``all_reduce`` of the whole gradient, b*P per engine per micro-batch (ZeRO-2) or once
  per optimizer step in fp32 (ZeRO-1 with bf16 = BF16_Optimizer). NOTE: DeepSpeed 0.19's ZeRO-2 default
  ``use_multi_rank_bucket_allreduce=True`` all-reduces the bucket instead of reducing each slice to its owner,
  so ZeRO-2 moves an all-reduce's bytes, twice a reduce-scatter's on a ring.
- ZeRO-1/2 parameters: after each optimizer step every engine all-gathers its updated 16-bit partition:
  padded(P)/N per rank, the flat buffer padded to a multiple of 2N (``nccl_start_alignment_factor`` 2).
  ZeRO-1 is modelled from DeepSpeed's source only (not measured: the 2-rank check runs ZeRO-2 and ZeRO-3).
- ZeRO-3 gradients: ``reduce_scatter_tensor`` of the padded gradient, b * sum_p N*ceil(p/N), per engine per
  micro-batch.
- ZeRO-3 parameters: every module call gathers its own parameters (partition ceil(p/N) per rank) and
  releases them after; the backward gathers them again for every module whose output requires grad (all of
  them in a trainable net; in a frozen net only those on the path from x_t: e.g. no cross-attention K/V, no
  timestep embedding). Which modules those are is found by a forward on the meta device with hooks.
  With gradient checkpointing, each backward through a checkpointed block re-runs its forward, which gathers
  the block's parameters once more (an upper bound: 1.08 x the measured bytes on the tiny UNet).
  Exact (measured byte for byte) with ``stage3_max_reuse_distance``, ``stage3_param_persistence_threshold`` and
  ``stage3_prefetch_bucket_size`` at 0. DeepSpeed's defaults (1e9, 1e5, 5e7) gather less, so the model is an
  upper bound there: a parameter reused within 1e9 elements of the engine's trace is kept once the trace is
  complete (the tiny UNet, persistence 0: 14% fewer gathered bytes), and parameters of <= 1e5 elements are kept
  whole (the tiny UNet has only such: half the bytes; SD1.5, SDXL, SD3.5-Large and FLUX.1-dev have 0.03-0.06%
  of their parameters in such tensors). Results: bench/results/cpu_scaling_comm_bytes_2ranks_2026-11-30.json.
- partitioned frozen teacher (``teacher.partitioned``): an optimizer-less ZeRO-3 engine, gathered like F in
  the generator step; no gradient traffic.
- per optimizer step per engine, scalars: ZeRO-1/2 an overflow flag (1 B) and a norm (4 B), ZeRO-3 a norm
  (8 B). ZeRO-3 also broadcasts its trace checks (int64 module ids, kB): not modelled.
- EMA: no traffic per step (each rank averages its own fp32 master partition); at previews and the export the
  fp32 EMA is gathered to rank 0, 4*P bytes, amortised over ``preview_every``.
- SiDA (``adversarial``): the fake step runs the fake net a second time, conditional only, on the micro-batch of
  real samples, with grad: one more forward and trainable backward of F per micro-batch (ZeRO-3 gathers
  them like any call); the generator step adds no network call.
- checkpoints: every rank writes its optimizer partitions (fp32 master + Adam, 12P/N per engine;
  pure_bf16: 6P/N) and EMA shard
  (4P/N); the 16-bit module weights are written by rank 0 (ZeRO-1/2, b*P per engine) or as partitions (ZeRO-3),
  amortised over ``ckpt_every`` at a storage bandwidth per node.

Time: ring algorithms over the slowest link (intra-node when all ranks share one node, else inter-node per
GPU): all-gather / reduce-scatter move (N-1)/N of the full buffer per rank, all-reduce 2(N-1)/N.
No per-message latency term (bandwidth only: ZeRO-3's per-module gathers at 256 ranks would add latency).
Compute: the iteration's FLOPs (forward FLOPs per sample, counted on meta as the benchmark does, times the
network calls above: backward = 2x forward for a trainable net, 1x for a frozen one, +1 forward per backward
with checkpointing) over peak x MFU. Overlap: gradient reductions run during the backward and ZeRO-3
gathers are prefetched during compute (``overlap`` of the smaller of the two is hidden); the post-step
parameter all-gather, scalars, EMA gathers and checkpoints are serial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

ENGINES = ("generator", "fake")


@dataclass(frozen=True)
class NetProfile:
    """What one denoiser network's module calls gather under ZeRO-3 (one forward at the preset's size).

    ``calls``: per module call that owns parameters: (its direct parameters' element counts, whether its output
    requires grad with trainable weights, with frozen weights and x_t requiring grad, whether it runs inside a
    gradient-checkpointed block).
    """

    name: str
    params: tuple[int, ...]  # element counts of all parameters
    calls: tuple[tuple[tuple[int, ...], bool, bool, bool], ...]
    fwd_flops_per_sample: int

    @property
    def num_params(self) -> int:
        return sum(self.params)

    def gathered(self, n: int, phase: str) -> int:
        """Elements one rank contributes to the all-gathers of one pass: ``phase`` is "fwd", "bwd_trainable",
        "bwd_frozen", or "recompute" (the checkpointed blocks' forward re-run in a backward)."""
        total = 0
        for numels, out_grad_trainable, out_grad_frozen, in_ckpt in self.calls:
            take = {"fwd": True, "bwd_trainable": out_grad_trainable, "bwd_frozen": out_grad_frozen,
                    "recompute": in_ckpt}[phase]
            if take:
                total += sum(math.ceil(p / n) for p in numels)
        return total

    def padded_zero3(self, n: int) -> int:
        """Elements of ZeRO-3's padded flat gradient: each parameter padded to a multiple of N."""
        return sum(n * math.ceil(p / n) for p in self.params)

    def padded_zero12(self, n: int) -> int:
        """Elements of ZeRO-1/2's flat 16-bit buffer, padded to a multiple of 2N."""
        return 2 * n * math.ceil(self.num_params / (2 * n))


def profile_module(name: str, net: torch.nn.Module, args: tuple, kwargs: dict,
                   checkpoint_types: tuple[type, ...], fwd_flops_per_sample: int) -> NetProfile:
    """Record the module calls of one forward of ``net`` (meta device is enough), trainable and frozen."""
    inside = set()
    for m in net.modules():
        if checkpoint_types and isinstance(m, checkpoint_types):
            inside.update(id(s) for s in m.modules())
    runs: dict[bool, list[tuple[tuple[int, ...], bool, bool]]] = {}
    for trainable in (True, False):
        net.requires_grad_(trainable)
        rec: list[tuple[tuple[int, ...], bool, bool]] = []

        def hook(module, _inputs, output, rec=rec):
            own = tuple(p.numel() for p in module.parameters(recurse=False))
            if own:
                rec.append((own, _requires_grad(output), id(module) in inside))

        handles = [m.register_forward_hook(hook) for m in net.modules()]
        try:
            with torch.enable_grad():
                net(*args, **kwargs, return_dict=False)
        finally:
            for h in handles:
                h.remove()
        runs[trainable] = rec
    if [r[0] for r in runs[True]] != [r[0] for r in runs[False]]:
        raise RuntimeError(f"{name}: the trainable and frozen forwards called different modules")
    calls = tuple((t[0], t[1], f[1], t[2]) for t, f in zip(runs[True], runs[False], strict=True))
    return NetProfile(name, tuple(p.numel() for p in net.parameters()), calls, fwd_flops_per_sample)


def _requires_grad(output) -> bool:
    if torch.is_tensor(output):
        return output.requires_grad
    if isinstance(output, (tuple, list)):
        return any(_requires_grad(o) for o in output)
    if isinstance(output, dict):
        return any(_requires_grad(o) for o in output.values())
    return any(_requires_grad(v) for v in getattr(output, "__dict__", {}).values())


@lru_cache(maxsize=16)
def preset_profile(preset: str) -> NetProfile:
    """The ``NetProfile`` of any preset ``sidscale.families.presets.preset_nets`` knows (built on meta)."""
    from sidscale.bench.bench import net_forward_flops_per_sample
    from sidscale.families.presets import build_preset_net, checkpoint_block_types, preset_net_inputs

    net = build_preset_net(preset, "meta")
    args, kwargs = preset_net_inputs(preset, net, 1, "meta")
    return profile_module(preset, net, args, kwargs, checkpoint_block_types(preset),
                          net_forward_flops_per_sample(preset))


@dataclass(frozen=True)
class Setup:
    """One training configuration on one cluster (defaults: a bf16 H100-class cluster, see docs/performance.md)."""

    gpus: int = 8
    zero: int = 2
    micro_batch: int = 1
    global_batch: int | None = None  # None: gpus x micro_batch (accumulation 1)
    precision: str = "bf16"
    grad_checkpointing: bool = False
    teacher_partitioned: bool = False
    generator_steps: int = 1  # K: each iteration runs k ~ U{1..K} steps; the mean (K+1)/2 is used
    cfg_scales: tuple[float, float, float] = (1.5, 1.5, 1.5)  # k1, k2, k4 (only != 1 matters: doubled batch)
    adversarial: bool = False  # SiDA: + one conditional trainable fake-net call on the real samples per micro-batch
    gpus_per_node: int = 8
    intra_gbps: float = 300.0  # GB/s per GPU, ring bus bandwidth inside a node (NVLink/NVSwitch)
    inter_gbps: float = 40.0  # GB/s per GPU across nodes (e.g. 400 Gb/s InfiniBand per GPU)
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100 SXM)
    mfu: float = 0.35
    overlap: float = 1.0  # share of the smaller of (overlappable communication, compute) that is hidden
    ckpt_every: int = 500
    preview_every: int = 500
    storage_gbps_per_node: float = 5.0

    @property
    def accumulation(self) -> int:
        gb = self.global_batch or self.gpus * self.micro_batch
        return max(1, gb // (self.gpus * self.micro_batch))

    @property
    def samples_per_iter(self) -> int:
        return self.gpus * self.micro_batch * self.accumulation

    @property
    def bytes_per_el(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def link_gbps(self) -> float:
        return self.intra_gbps if self.gpus <= self.gpus_per_node else self.inter_gbps


@dataclass
class CommOp:
    """One class of collective in one iteration, per rank: ``msg_bytes`` as DeepSpeed's comms logger counts
    it (summed over calls), and the bytes a ring sends per rank (``wire_bytes``)."""

    op: str  # all_reduce | all_gather_into_tensor | reduce_scatter_tensor | gather
    msg_bytes: float
    wire_bytes: float
    overlappable: bool


@dataclass
class IterationCost:
    setup: Setup
    ops: dict[str, CommOp] = field(default_factory=dict)
    flops_per_rank: float = 0.0
    compute_s: float = 0.0
    comm_overlappable_s: float = 0.0
    comm_serial_s: float = 0.0

    @property
    def step_s(self) -> float:
        hidden = self.setup.overlap * min(self.compute_s, self.comm_overlappable_s)
        return self.compute_s + self.comm_overlappable_s + self.comm_serial_s - hidden

    @property
    def samples_per_s(self) -> float:
        return self.setup.samples_per_iter / self.step_s

    def msg_bytes_by_op(self) -> dict[str, float]:
        """Bytes per collective kind, summed over the classes: what the comms logger reports."""
        out: dict[str, float] = {}
        for c in self.ops.values():
            out[c.op] = out.get(c.op, 0.0) + c.msg_bytes
        return out


def ring_wire_bytes(op: str, full_bytes: float, n: int) -> float:
    """Bytes one rank sends for a ring collective over a buffer of ``full_bytes`` (the whole, not a partition)."""
    if n <= 1:
        return 0.0
    if op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        return (n - 1) / n * full_bytes
    if op == "all_reduce":
        return 2 * (n - 1) / n * full_bytes
    if op == "gather":  # to one root: the root receives (n-1)/n of it, which bounds the time
        return (n - 1) / n * full_bytes
    raise ValueError(f"unknown collective {op!r}")


def net_calls_per_micro_batch(s: Setup) -> dict[str, dict[str, float]]:
    """Passes of each network per micro-batch (mean over k), by kind: fwd, bwd_trainable, bwd_frozen."""
    k_mean = (s.generator_steps + 1) / 2
    return {
        # fake step: k no-grad forwards; generator step: k-1 no-grad + 1 forward and backward
        "generator": {"fwd": 2 * k_mean, "bwd_trainable": 1.0, "bwd_frozen": 0.0},
        # SiDA adds the fake step's second call (real samples, with grad): one more forward and backward
        "fake": {"fwd": 2.0 + s.adversarial, "bwd_trainable": 1.0 + s.adversarial, "bwd_frozen": 1.0},
        "teacher": {"fwd": 1.0, "bwd_trainable": 0.0, "bwd_frozen": 1.0},
    }


def forward_equivalents_per_sample(s: Setup) -> float:
    """Network forwards' worth of FLOPs per sample of one iteration (backward: 2x trainable, 1x frozen)."""
    k1, k2, k4 = (2.0 if k != 1.0 else 1.0 for k in s.cfg_scales)
    k_mean = (s.generator_steps + 1) / 2
    ck = 1.0 if s.grad_checkpointing else 0.0
    fake_step = k_mean + k1 * (3 + ck) + (3 + ck) * s.adversarial  # SiDA: the real samples, conditional only
    gen_step = (k_mean - 1) + (3 + ck) + k2 * (2 + ck) + k4 * (2 + ck)
    return fake_step + gen_step


def iteration_cost(profile: NetProfile, s: Setup) -> IterationCost:
    """Bytes per collective class and step time of one iteration of ``profile``'s preset under ``s``."""
    if s.zero not in (1, 2, 3):
        raise ValueError(f"zero stage {s.zero}: expected 1, 2 or 3")
    n, b, a = s.gpus, s.bytes_per_el, s.accumulation
    out = IterationCost(s)

    def add(name: str, op: str, msg: float, full: float, overlappable: bool) -> None:
        out.ops[name] = CommOp(op, msg, ring_wire_bytes(op, full, n), overlappable)

    p = profile.num_params
    if s.zero == 3:
        rs = b * profile.padded_zero3(n)
        add("grad_reduce_scatter", "reduce_scatter_tensor", 2 * a * rs, 2 * a * rs, True)
        calls = net_calls_per_micro_batch(s)
        nets = ("generator", "fake", "teacher") if s.teacher_partitioned else ENGINES
        for net in nets:
            per_mb = sum(calls[net][ph] * profile.gathered(n, ph) for ph in ("fwd", "bwd_trainable", "bwd_frozen"))
            if s.grad_checkpointing:
                per_mb += (calls[net]["bwd_trainable"] + calls[net]["bwd_frozen"]) * profile.gathered(n, "recompute")
            msg = a * b * per_mb
            add(f"param_all_gather_{net}", "all_gather_into_tensor", msg, msg * n, True)
        add("scalars", "all_reduce", 2 * 8.0, 2 * 8.0, False)
    else:
        flat = profile.padded_zero12(n)
        if s.zero == 2:
            grads = 2 * a * b * p
        else:  # once per step; ZeRO-1 with bf16 all-reduces its fp32 accumulation buffer (BF16_Optimizer)
            grads = 2 * (4 if s.precision == "bf16" else b) * p
        add("grad_all_reduce", "all_reduce", grads, grads, True)
        msg = 2 * b * flat / n
        add("param_all_gather_after_step", "all_gather_into_tensor", msg, msg * n, False)
        add("scalars", "all_reduce", 2 * 5.0, 2 * 5.0, False)
    # previews / export: the fp32 EMA gathered to rank 0 (sharded_ema.gather_to_main), amortised
    ema = 4.0 * p / n / max(1, s.preview_every)
    add("ema_gather_amortised", "gather", ema, ema * n, False)

    bw = s.link_gbps * 1e9
    out.comm_overlappable_s = sum(c.wire_bytes for c in out.ops.values() if c.overlappable) / bw
    out.comm_serial_s = sum(c.wire_bytes for c in out.ops.values() if not c.overlappable) / bw
    out.comm_serial_s += checkpoint_bytes_per_rank(p, s) / max(1, s.ckpt_every) / (
        s.storage_gbps_per_node * 1e9 / min(s.gpus, s.gpus_per_node))
    out.flops_per_rank = forward_equivalents_per_sample(s) * profile.fwd_flops_per_sample * s.micro_batch * a
    out.compute_s = out.flops_per_rank / (s.peak_tflops * 1e12 * s.mfu)
    return out


def checkpoint_bytes_per_rank(p: int, s: Setup) -> float:
    """Bytes the busiest rank writes per checkpoint (rank 0: it also writes ZeRO-1/2's 16-bit weights)."""
    n, b = s.gpus, s.bytes_per_el
    optimizer = 6.0 if s.precision == "pure_bf16" else 12.0  # master + Adam's two moments, bf16 or fp32 each
    per_engine = optimizer * p / n + (b * p / n if s.zero == 3 else b * p)
    return 2 * per_engine + 4.0 * p / n


def scaling_rows(profile: NetProfile, base: Setup, gpus: tuple[int, ...] = (8, 64, 256)) -> list[dict]:
    """One row per cluster size: step time, samples/s and the communication share."""
    from dataclasses import replace

    rows = []
    for g in gpus:
        c = iteration_cost(profile, replace(base, gpus=g))
        rows.append({"preset": profile.name, "gpus": g, "zero": base.zero, "micro_batch": base.micro_batch,
                     "accumulation": c.setup.accumulation, "samples_per_iter": c.setup.samples_per_iter,
                     "compute_s": c.compute_s, "comm_overlappable_s": c.comm_overlappable_s,
                     "comm_serial_s": c.comm_serial_s, "step_s": c.step_s, "samples_per_s": c.samples_per_s,
                     "samples_per_s_per_gpu": c.samples_per_s / g,
                     "wire_gb_per_rank": sum(o.wire_bytes for o in c.ops.values()) / 1e9})
    return rows
