"""Predicted per-GPU memory of one SiD-LSG training rank, term by term, and the largest micro-batch.

Model (P = parameters of the denoiser network, a UNet or an SD3 transformer; N = GPUs, b = bytes of
the training precision, Z = ZeRO stage).

Static, alive for the whole run:

- generator and fake net, each a DeepSpeed engine with torch Adam:
  * module params: b*P (Z1/2, replicated) or b*P/N (Z3);
  * fp32 master partition: 4*P/N (kept by ZeRO for bf16/fp16 and also for fp32);
  * Adam exp_avg + exp_avg_sq: 8*P/N.
- generator EMA: fp32, sharded 1/N like the fp32 masters it averages (ShardedEMA).
- teacher network and text encoder(s) (SD3: CLIP-L, bigG and the 4.8 B T5-XXL): replicated, in teacher.dtype;
  or (``teacher_partitioned``, ``text_encoders="partitioned"``) an optimizer-less ZeRO-3 engine: its padded
  1/N partition plus, while it runs, the parameters being gathered (``zero3_gathered_params`` below);
  ``text_encoders="off"``: encoded on the CPU or precomputed, nothing on the GPU.
- ZeRO-3 gathered parameters (any ZeRO-3 net: G and F under ZeRO-3, a partitioned teacher or text encoder):
  the module running plus one prefetch bucket (``stage3_prefetch_bucket_size`` elements; at most the whole
  net), in the largest dtype; the nets run one after the other, so one such term counts
  (sidscale/bench/scaling.py: every module gathers its parameters and releases them after use).
- network buffers (SD3's pos_embed table, 57-227 M elements; UNets have none): not parameters, so in no
  optimizer state and not partitioned by ZeRO-3; every rank holds them whole in each net. The generator
  and fake net keep them in fp32 (build_engine's ``.float()``; DeepSpeed 0.19 casts parameters only),
  the teacher in teacher.dtype.
- ZeRO-1 with bf16 and fp32 gradient accumulation (sidscale's default, DeepSpeed's BF16_Optimizer):
  a full fp32 gradient accumulation buffer per engine, 4*P, allocated at start-up.

pure_bf16 (bf16 masters, Adam moments and gradients) and SiDA (the fake phase's real-sample call, the real
captions' conditioning, the host-side real prefetch): docs/memory_plan.md "pure_bf16 and SiDA".

Nothing of the previews or exports stays resident: the full EMA is gathered into rank 0's host
memory in chunks and the preview network exists only while previewing (``preview`` phase below).

Transient: the peak is the largest of four phases of one iteration, each on top of the static part.
Measured with an allocation trace on CPU (tools/memory_plan.py --measure), the gradients and the
reduction buckets of one engine only exist from its first parameter gradient until its ``step()``
(DeepSpeed allocates the buckets lazily and releases them after the backward), so they are never
alive in both engines at once, nor (without accumulation) together with the teacher's and fake
net's activations:

- ``fake_backward``: the fake net's activations (trainable, batch 2B with CFG k1) + its gradients
  + its buckets;
- ``gen_forward``: the end of the generator step's forward, the usual peak: B samples through G
  (trainable), 2B through the frozen fake net and 2B through the frozen teacher (CFG batches; frozen
  weights save only what the input gradient needs). docs/method.md 9: three networks' activations
  are alive at once. With gradient accumulation, G's accumulated gradients are alive here too
  from the second micro-batch on;
- ``gen_backward``: the backward leaves the teacher and the fake net first, so when G's first
  parameter gradient arrives only G's activations remain, plus its gradients and buckets;
- ``optimizer_step``: the gradient partition and the fp32 copy of it that ``step()`` makes (4*P/N;
  none when the gradients accumulate in fp32 already). ZeRO-1 with BF16_Optimizer: its bf16
  gradients and the flat fp32 copy its boundary all-reduce makes (4 * min(P, 5e8));
- ``preview`` (ZeRO-1/2: rank 0, at previews and the toy evaluation): the preview network in the
  teacher's dtype (tb*P) and the gather's receive buffers on the device (at most 4 * 64Mi
  elements), nothing else of the iteration alive. ZeRO-3 previews swap the EMA into the partitioned
  generator on every rank (``sharded_ema.ema_swapped_into``): one saved copy of the working partition
  (b*P/N). On top, the largest of three steps that run one after the other: the generator's no-grad
  forward on the whole preview batch, the VAE decode of ``PREVIEW_DECODE_CHUNK`` images (measured,
  ``vae_decode_cost``, plus their fp32 output) and the teacher's reference (its no-grad
  forward on half the preview batch, doubled by CFG). A no-grad forward's peak is measured on meta by
  following every storage the ops create until it is freed (``nograd_bytes_per_sample``).
  ``previews=False`` (no previews, no toy evaluation) drops this phase.
- the VAE's weights (tb * its parameters) stay on every rank for the whole run: a static term.

Gradients: the reduced partition in the accumulation dtype g (fp32 for bf16 training, else the
training dtype), g*P/N (Z2/3; measured as ``averaged_gradients`` of a real engine), or the full
b*P (Z1: the module's own gradients). Buckets (Z1/2 with contiguous gradients, not BF16_Optimizer):
(1 + overlap_comm) * reduce_bucket_size * b, allocated at full size whatever the model.
ZeRO-3 differs: it allocates its flat gradient partition (b*P/N) and one bucket per engine at
start-up and keeps them, so they are static terms there. Not modelled: ZeRO-3's gathered
parameters with N > 1 (at most stage3_prefetch_bucket_size elements prefetched, plus the module
running), which the single-rank measurement cannot see: it is the ``zero3_gathered_params`` term, a
prediction only.

Construction (``construction``, before the first iteration, not part of the training peak): the
teacher whole in teacher.dtype (it is loaded whole, then partitioned), the text encoders, the
generator built and the fake net being built. ``deepspeed.initialize`` allocates an engine's fp32
master partition and (ZeRO-3) its gradient partition and reduction bucket; torch Adam creates its
states lazily at the first ``step()`` (DeepSpeed 0.19.8 ``runtime/zero/stage3.py``:
``_setup_for_real_optimizer``, ``initialize_optimizer_states``), so the built generator counts no
Adam states. The copy build (``copy.deepcopy(teacher).float()``, ZeRO-1/2) holds a full fp32 copy,
4*(P + buffers), while the fake net is built. The ``deepspeed.zero.Init`` build (ZeRO-3,
``sidscale.distributed.zero_init``) peaks inside the fake engine's ``initialize_optimizer_states``:
its bf16 and fp32 partitions plus a temporary fp32 gradient buffer of its largest optimizer
sub-group (4 * min(P/N, sub_group_size)); the module under construction before ZeRO-3 partitions it
(b * the largest module, bench/results/cpu_zero_init_memory_*) is smaller, at an earlier moment.

Budget: a plan fits a GPU when its total <= ``budget_fraction`` x the card - ``GPU_RESERVE_GIB`` (the
memory outside the PyTorch allocator, constants below); the fraction (default 0.9, config key
``train.memory_fraction``) covers the caching allocator's fragmentation. The micro-batch search and
``teacher.partitioned = auto`` (``sidscale.perf.placement``) use the same ``budget_bytes``.

Activations: per-sample bytes are measured with saved_tensors_hooks on a meta-device forward at
the preset's own latent size (sidscale.perf.activations), so no scaling by resolution is needed
(SD3: 77 CLIP + the preset's T5 tokens of text, 77 as SiD-DiT encodes them).
With checkpointing the saved bytes are the checkpointed blocks' inputs, plus the recomputation of
one block at a time, modelled as the no-checkpointing bytes / number of checkpointed blocks x 2
(blocks are unequal; 2x the mean covers the largest measured). In the generator step the backward
runs through the teacher, the fake net and G one after the other, so one block of ONE of the three
is recomputed at a time: the largest of the three recomputation terms counts, not their sum
(measured on sd3_tiny, ZeRO-2, checkpointing on: predicted / measured 1.29 with the sum, 1.13 with
the largest; its 4 blocks make the 2x-mean allowance large).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidscale.distributed.sharded_ema import GATHER_CHUNK_ELEMENTS
from sidscale.families.base import PREVIEW_DECODE_CHUNK
from sidscale.families.presets import latent_shape, preset_vae_config
from sidscale.families.shared.diffusers_dir import DTYPES
from sidscale.perf.preset_costs import (
    activation_bytes_per_sample,
    buffer_elements,
    checkpoint_blocks,
    largest_module_params,
    nograd_bytes_per_sample,
    param_counts,
    preset_counts,
    preview_decode_bytes,
    text_condition_bytes_per_sample,
    vae_key,
    vae_params,
)
from sidscale.perf.zero_terms import NetCounts, ds_zero_settings, partition_elements

GIB = 2**30
TEXT_ENCODER_PLACEMENTS = ("replicated", "partitioned", "off")

# Memory of a GPU that the PyTorch caching allocator never hands to a tensor, so no plan term (nor
# torch.cuda.max_memory_allocated) sees it; taken off the card before budgeting (``budget_bytes``).
# - the CUDA context with torch's and NCCL's kernels loaded: about 0.5 GiB per process on CUDA 12 with
#   lazy module loading (what nvidia-smi shows for a process that has made one tensor);
CUDA_CONTEXT_GIB = 0.5
# - NCCL's buffers: NCCL_BUFFSIZE (NCCL's default 4 MiB) per channel, per peer, send and receive, per
#   communicator (ZeRO's groups and the partitioned teacher's), plus NVLS buffers on NVSwitch machines;
#   NCCL allocates them with cudaMalloc, outside the caching allocator;
NCCL_BUFFERS_GIB = 1.0
# - cuBLAS / cuBLASLt workspaces (torch's default on Hopper: 32 MiB per handle and stream) and cuDNN's
#   convolution workspaces of the VAE decode, which cuDNN sizes to the algorithm it picks.
GPU_WORKSPACES_GIB = 0.5
GPU_RESERVE_GIB = CUDA_CONTEXT_GIB + NCCL_BUFFERS_GIB + GPU_WORKSPACES_GIB
# fraction of (card - reserve) the plan may fill: the rest is the caching allocator's fragmentation under
# ZeRO-3's variable-size gathers (the usual advice for DeepSpeed runs: keep 10-15 % free); train.memory_fraction
DEFAULT_BUDGET_FRACTION = 0.9
# The GPUs each config preset is sized for, as its yaml header and docs/memory_plan.md say: (GPUs, GiB per GPU).
# tests/trainer/test_preview_memory.py checks that every preset's default leaves >= 10 % of each card free.
PRESET_HARDWARE = {"sd15": (8, 40.0), "sd21": (8, 40.0), "sd21_768": (8, 40.0), "sdxl": (8, 40.0),
                   "sd3_medium": (8, 80.0), "sd35_medium": (8, 80.0), "sd35_large": (8, 80.0),
                   "flux_dev": (8, 80.0)}


def budget_bytes(gpu_mem_gib: float, fraction: float = DEFAULT_BUDGET_FRACTION,
                 reserve_gib: float = GPU_RESERVE_GIB) -> float:
    """Bytes of tensors a plan may predict on a device of ``gpu_mem_gib``: the fraction of the card less the
    reserve outside the allocator (module docstring). ``fraction`` must be in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory budget fraction = {fraction!r}: expected a number in (0, 1]")
    return fraction * gpu_mem_gib * GIB - reserve_gib * GIB


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
    reduce_bucket_size: int | None = None  # elements; default: the ds_configs/zero{Z}.json value
    accumulation: int = 1  # micro-batches per optimizer step: >1 keeps gradients alive between them
    grad_accum_dtype: str | None = None  # default: what build_ds_config sets (fp32 for bf16, else the precision)
    teacher_partitioned: bool = False  # teacher.partitioned: the frozen teacher as an optimizer-less ZeRO-3 engine
    text_encoders: str = "replicated"  # replicated | partitioned (ZeRO-3, no optimizer) | off (CPU / precomputed)
    previews: bool = True  # False: eval.preview_every=0 and no toy evaluation: no ``preview`` phase on the device
    adversarial: bool = False  # method.adversarial.enabled (SiDA): the fake phase's real-sample call (docstring)
    real_prefetch: int = 2  # real (latent, caption) samples each data worker keeps ready, per sample of a micro-batch
    real_workers: int = 2  # data.num_workers (the real stream is read by as many workers as the prompts)
    preview_images: int = 8  # preview.prompts x preview.seeds_per_prompt (the presets: 4 x 2)
    teacher_reference: bool = True  # eval.teacher_steps > 0: the preview draws the teacher's reference once
    budget_fraction: float = DEFAULT_BUDGET_FRACTION  # train.memory_fraction (``budget_bytes``)

    def __post_init__(self) -> None:
        if self.text_encoders not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(f"PlanInput.text_encoders = {self.text_encoders!r}; expected one of "
                             f"{TEXT_ENCODER_PLACEMENTS}")

    @property
    def work_dtype(self) -> str:
        """The dtype of the engines' working weights and activations (pure_bf16: bf16)."""
        return "bf16" if self.precision == "pure_bf16" else self.precision

    @property
    def master_bytes(self) -> int:
        """Bytes per element of the ZeRO optimizer's master partition and of each Adam moment (pure_bf16: no
        fp32 master, bf16 moments: DeepSpeed's bf16_master_weights_and_grads + bf16_optimizer_states)."""
        return 2 if self.precision == "pure_bf16" else 4

    def accumulation_dtype(self) -> str:
        if self.precision == "pure_bf16":  # build_ds_config refuses any other accumulation dtype
            return "bf16"
        return self.grad_accum_dtype or ("fp32" if self.precision == "bf16" else self.precision)

    def bf16_optimizer(self) -> bool:
        """ZeRO-1 + bf16 + fp32 accumulation: DeepSpeed replaces the ZeRO optimizer by BF16_Optimizer."""
        return self.zero == 1 and self.precision == "bf16" and self.accumulation_dtype() == "fp32"


@dataclass
class MemoryPlan:
    inputs: PlanInput
    terms: dict[str, float] = field(default_factory=dict)  # bytes per GPU: static + the peak phase's
    peak_phase: str = ""
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # every phase's transient terms
    max_micro_batch: int = 0
    construction: dict[str, float] = field(default_factory=dict)  # bytes per GPU at the construction peak
    host: dict[str, float] = field(default_factory=dict)  # bytes per rank in host memory (SiDA's real prefetch)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def construction_total(self) -> float:
        return sum(self.construction.values())

    @property
    def budget(self) -> float:
        """Bytes of tensors this plan may reach on its GPU (``budget_bytes``)."""
        return budget_bytes(self.inputs.gpu_mem_gib, self.inputs.budget_fraction)

    @property
    def free_fraction(self) -> float:
        """Share of the card left free at the peak, after the reserve outside the allocator."""
        return 1.0 - (self.total / GIB + GPU_RESERVE_GIB) / self.inputs.gpu_mem_gib

    def to_dict(self) -> dict:
        d = {"inputs": {**self.inputs.__dict__, "cfg_scales": list(self.inputs.cfg_scales)},
             "terms_gib": {k: v / GIB for k, v in self.terms.items()}, "total_gib": self.total / GIB,
             "max_micro_batch": self.max_micro_batch, "peak_phase": self.peak_phase,
             "phase_transient_gib": {k: sum(v.values()) / GIB for k, v in self.phases.items()},
             "construction_gib": {k: v / GIB for k, v in self.construction.items()},
             "construction_total_gib": self.construction_total / GIB,
             "host_gib": {k: v / GIB for k, v in self.host.items()},
             "budget_gib": self.budget / GIB, "reserve_gib": GPU_RESERVE_GIB, "free_fraction": self.free_fraction}
        return d


def construction_terms(c: NetCounts, text_params: int, inp: PlanInput, trained_static: dict[str, float],
                       zero_init: bool) -> dict[str, float]:
    """Bytes per GPU at the construction peak: while the fake net is built (module docstring)."""
    tb = DTYPES[inp.teacher_dtype or inp.work_dtype].itemsize
    b = DTYPES[inp.work_dtype].itemsize
    # teacher.text_encoders = cpu (plan: off) loads them straight to the host
    text = 0.0 if inp.text_encoders == "off" else float(tb * text_params)
    out = {"teacher_whole": float(tb * (c.params + c.buffers)), "text_encoders": text,
           "vae": float(trained_static.get("vae", 0.0)),
           # torch Adam's states appear at the first step(), not at deepspeed.initialize
           "generator_built": sum(v for k, v in trained_static.items()
                                  if k.startswith("generator") and k != "generator_adam_states")}
    if zero_init:
        # the peak: inside the fake engine's initialize_optimizer_states (module docstring)
        sub_group = int(ds_zero_settings(3).get("sub_group_size", 1_000_000_000))
        out["fake_params"] = float(b * partition_elements(c.params, inp.gpus) + 4 * c.buffers)
        mb = inp.master_bytes
        out["fake_fp32_master" if mb == 4 else "fake_bf16_master"] = float(mb * partition_elements(c.params, inp.gpus))
        out["fake_fp32_grad_buffer_at_init" if mb == 4 else "fake_bf16_grad_buffer_at_init"] = float(
            mb * min(partition_elements(c.params, inp.gpus), sub_group))
    else:
        out["fake_fp32_copy"] = float(4 * (c.params + c.buffers))
    return out


def _preview_phase(inp: PlanInput, micro_batch: int, p: int, buffers: int,
                   one_block: dict[str, float]) -> dict[str, float]:
    """The ``preview`` phase's terms (module docstring). ``one_block``: per-sample peak bytes of a no-grad
    forward (``nograd_bytes_per_sample``), by dtype name."""
    teacher_dtype = inp.teacher_dtype or inp.work_dtype
    if inp.zero == 3:  # the EMA swapped into the partitioned generator (sharded_ema.ema_swapped_into)
        out = {"saved_working_partition": DTYPES[inp.work_dtype].itemsize * p / inp.gpus}
        gen_dtype = inp.work_dtype
    else:  # rank 0's copy of the EMA generator in the teacher's dtype
        out = {"preview_net": DTYPES[teacher_dtype].itemsize * (p + buffers),
               "ema_gather_buffers": 4.0 * min(p, GATHER_CHUNK_ELEMENTS)}
        gen_dtype = teacher_dtype
    n = max(1, inp.preview_images)
    steps = {"preview_generation": n * one_block[gen_dtype],
             "preview_decode": preview_decode_bytes(inp.preset, teacher_dtype, min(n, PREVIEW_DECODE_CHUNK))}
    if inp.teacher_reference:  # Trainer._teacher_samples: chunks of half the preview, CFG doubles them
        chunk = max(micro_batch, n // 2)
        steps["teacher_reference"] = (2 * chunk if inp.cfg_scales[2] != 1.0 else chunk) * one_block[teacher_dtype]
    largest = max(steps, key=steps.get)  # one after the other: only the largest is alive at the peak
    out.update({k: (v if k == largest else 0.0) for k, v in steps.items()})
    return out


def _phases(inp: PlanInput, micro_batch: int, grads: float, buckets: float, p: int,
            buffers: int) -> dict[str, dict[str, float]]:
    """The transient bytes of each phase of one iteration (module docstring), term by term."""
    teacher_dtype = inp.teacher_dtype or inp.work_dtype
    w = inp.work_dtype
    k1, k2, k4 = inp.cfg_scales
    ck = inp.grad_checkpointing

    def saved(dtype: str, trainable: bool) -> float:  # per sample, alive from the forward to the backward
        return activation_bytes_per_sample(inp.preset, dtype, trainable, ck)

    def recompute(dtype: str, trainable: bool) -> float:  # per sample: one checkpointed block re-run in backward
        if not ck:
            return 0.0
        return 2 * activation_bytes_per_sample(inp.preset, dtype, trainable, False) / checkpoint_blocks(inp.preset)

    def cfg_batch(k: float) -> int:
        return 2 * micro_batch if k != 1.0 else micro_batch

    gen_acts = micro_batch * (saved(w, True) + recompute(w, True))
    fp32_grads = inp.accumulation_dtype() == "fp32"
    if inp.precision == "pure_bf16":  # step() flattens the bf16 gradient partition; no fp32 copy of it
        step = {"grads": grads, "bf16_grad_copy": 2 * p / inp.gpus}
    elif inp.bf16_optimizer():  # fp32 gradients already; the boundary all-reduce flattens them into one copy
        step = {"grads": grads, "allreduce_flat_copy": 4.0 * min(p, 500_000_000)}
    else:
        step = {"grads": grads, "fp32_grad_copy": 0.0 if fp32_grads and inp.precision != "fp32" else 4 * p / inp.gpus}
    # The generator step's three networks: their saved activations are alive together; with checkpointing
    # only ONE block of one network is recomputed at a time (the backward leaves the teacher and the fake
    # net first, then G), so the recomputation term is the largest of the three, not their sum.
    gen_saved = (micro_batch * saved(w, True) + cfg_batch(k2) * saved(w, False)
                 + cfg_batch(k4) * saved(teacher_dtype, False))
    gen_recompute = max(micro_batch * recompute(w, True), cfg_batch(k2) * recompute(w, False),
                        cfg_batch(k4) * recompute(teacher_dtype, False))
    fake = {"activations": cfg_batch(k1) * (saved(w, True) + recompute(w, True)), "grads": grads,
            "grad_buckets": buckets}
    if inp.adversarial:
        # SiDA: the fake net's conditional call on the real samples (trainable, no CFG batch) keeps its
        # activations alive beside the DSM call's until the one backward of their summed loss; one block is
        # recomputed at a time, the DSM call's (the larger batch), already counted. Plus the real captions'
        # encoded conditioning, in the text encoders' dtype (the teacher's).
        fake["real_call_activations"] = micro_batch * saved(w, True)
        fake["real_text_condition"] = micro_batch * text_condition_bytes_per_sample(inp.preset, teacher_dtype)
    return {
        "fake_backward": fake,
        "gen_forward": {"activations": gen_saved + gen_recompute,
                        # from the second micro-batch on, G's accumulated gradient partition is alive
                        "grads": grads if inp.accumulation > 1 else 0.0},
        "gen_backward": {"activations": gen_acts, "grads": grads, "grad_buckets": buckets},
        "optimizer_step": step,
        "preview": _preview_phase(inp, micro_batch, p, buffers,
                                  {d: nograd_bytes_per_sample(inp.preset, d) for d in {w, teacher_dtype}}),
    }


def static_terms(inp: PlanInput, net_p: int, text_p: int, buf: int, largest_net: int, largest_text: int,
                 zs: dict, vae_p: int = 0) -> tuple[dict[str, float], float, float]:
    """(static bytes per GPU by term, transient gradient bytes, reduction-bucket bytes) of a denoiser of
    ``net_p`` parameters under the ZeRO block ``zs`` (module docstring): the one formula of ``plan``
    (preset counts) and of ``sidscale.perf.placement`` (the run's own networks)."""
    n, z = inp.gpus, inp.zero
    b = DTYPES[inp.work_dtype].itemsize
    tb = DTYPES[inp.teacher_dtype or inp.work_dtype].itemsize
    mb = inp.master_bytes
    terms: dict[str, float] = {}
    for name in ("generator", "fake"):
        terms[f"{name}_params"] = b * net_p / (n if z == 3 else 1)
        terms[f"{name}_fp32_master" if mb == 4 else f"{name}_bf16_master"] = mb * net_p / n
        terms[f"{name}_adam_states"] = 2 * mb * net_p / n
    terms["ema_fp32"] = 4 * net_p / n
    terms["teacher_net"] = tb * (partition_elements(net_p, n) if inp.teacher_partitioned else net_p)
    if buf:  # whole on every rank, fp32 in the two engines (module docstring)
        terms["generator_buffers"] = terms["fake_buffers"] = 4.0 * buf
        terms["teacher_buffers"] = tb * buf  # buffers are not parameters: ZeRO-3 never partitions them
    if vae_p:  # the VAE stays on every rank (sidscale.families.unet_vp.loading: loaded to the device)
        terms["vae"] = float(tb * vae_p)
    if inp.text_encoders == "replicated":
        terms["text_encoders"] = tb * text_p
    elif inp.text_encoders == "partitioned":
        terms["text_encoders"] = tb * partition_elements(text_p, n)
    gathered = []  # (elements, bytes each) of the largest module + one prefetch bucket of each ZeRO-3 net
    prefetch = int(ds_zero_settings(3).get("stage3_prefetch_bucket_size", 50_000_000))
    live_net = min(largest_net + prefetch, net_p)  # a prefetch cannot hold more than the whole network
    if z == 3:
        gathered.append(live_net * b)
    if inp.teacher_partitioned:
        gathered.append(live_net * tb)
    if inp.text_encoders == "partitioned":
        gathered.append(min(largest_text + prefetch, text_p) * tb)
    if gathered:
        terms["zero3_gathered_params"] = float(max(gathered))
    g = DTYPES[inp.accumulation_dtype()].itemsize
    grads = b * net_p if z == 1 else g * net_p / n
    bucket_bytes = float(inp.reduce_bucket_size or zs["reduce_bucket_size"]) * b
    buckets = 0.0
    if inp.bf16_optimizer():
        for name in ("generator", "fake"):
            terms[f"{name}_fp32_grad_accum"] = 4.0 * net_p
    elif z in (1, 2) and zs.get("contiguous_gradients", True):
        buckets = (1 + bool(zs.get("overlap_comm"))) * bucket_bytes
    if z == 3:  # ZeRO-3 allocates its gradient partition and one reduction bucket once, at start-up
        for name in ("generator", "fake"):
            terms[f"{name}_grads"] = grads
            if zs.get("contiguous_gradients", True):
                terms[f"{name}_grad_bucket"] = bucket_bytes
        grads = 0.0
    return terms, grads, buckets


def plan(inp: PlanInput, micro_batch: int | None = None) -> MemoryPlan:
    """Predicted peak bytes per GPU: static terms plus the largest phase (module docstring).

    ``micro_batch`` overrides ``inp.micro_batch`` and skips the largest-micro-batch search.
    """
    mb = inp.micro_batch if micro_batch is None else micro_batch
    net_p, text_p = param_counts(inp.preset)
    buf = buffer_elements(inp.preset)
    largest_net, largest_text = largest_module_params(inp.preset)
    vae_p = vae_params(vae_key(preset_vae_config(inp.preset)))
    terms, grads, buckets = static_terms(inp, net_p, text_p, buf, largest_net, largest_text,
                                         ds_zero_settings(inp.zero), vae_p)
    construction = construction_terms(preset_counts(inp.preset), text_p, inp, terms, zero_init=inp.zero == 3)
    phases = _phases(inp, mb, grads, buckets, net_p, buf)
    if not inp.previews:
        del phases["preview"]
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    terms.update({f"{k} ({peak})": v for k, v in phases[peak].items() if v})
    out = MemoryPlan(inp, terms, peak_phase=peak, phases=phases, construction=construction,
                     host=host_terms(inp, mb))
    out.max_micro_batch = max_micro_batch(inp) if micro_batch is None else 0
    return out


REAL_LATENT_BYTES = 4  # a real latent as the loader hands it over (fp32; the shards may store fp16)


def host_terms(inp: PlanInput, micro_batch: int) -> dict[str, float]:
    """Host memory per rank that the plan knows of: SiDA's real-latent prefetch (one latent per sample of a
    micro-batch, ``real_prefetch`` micro-batches ready in each of ``real_workers`` data workers)."""
    if not inp.adversarial:
        return {}
    c, h, w = latent_shape(inp.preset)
    return {"real_latent_prefetch": float(REAL_LATENT_BYTES * c * h * w * micro_batch * inp.real_prefetch
                                          * max(1, inp.real_workers))}


def max_micro_batch(inp: PlanInput, limit: int = 1024) -> int:
    """Largest micro-batch whose predicted total fits the budget of ``gpu_mem_gib`` (``budget_bytes``;
    0: not even 1)."""
    budget = budget_bytes(inp.gpu_mem_gib, inp.budget_fraction)
    best, mb = 0, 1
    while mb <= limit and plan(inp, mb).total <= budget:
        best, mb = mb, mb + 1
    return best
