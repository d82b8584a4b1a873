"""Predicted per-GPU memory of SiD-LSG training, term by term, and the largest micro-batch that fits.

    python tools/memory_plan.py --preset sdxl --gpus 8 --zero 2 --micro-batch 2 --accumulation 32 --precision bf16 \
        --grad-checkpointing --gpu-mem-gib 80

Prints a table (GiB per GPU) and, with --json, one JSON line. The model is documented in
sidscale/perf/memory_plan.py (activations measured on the meta device at the preset's latent size).
The SD3 presets (sd3_medium, sd35_medium, sd35_large: 1024 px, text encoders incl. T5-XXL) are
planned the same way:

    python tools/memory_plan.py --preset sd35_large --zero 3 --grad-checkpointing
    python tools/memory_plan.py --preset sd35_large --zero 3 --grad-checkpointing --teacher-partitioned \
        --text-encoders off

The tables of the big presets (SD3.5-Large, FLUX.1-dev at 8 and 16 x 80 GB): tools/scaling_model.py --memory.

--measure also runs three iterations of the real trainer at that configuration (random weights, the
benchmark's teacher and config: sidscale/families/presets.py) and prints the measured peak next to the
prediction: torch.cuda.max_memory_allocated on a GPU, the profiler's allocation trace on the CPU
(sidscale/perf/measured_memory.py). One process per rank; --gpus is then the world size. On the CPU
a preset whose plan exceeds the host's memory is refused (the published SD3 presets; use the
CPU-sized tiny, mid or sd3_tiny there):

    DS_ACCELERATOR=cpu python tools/memory_plan.py --measure --preset mid --micro-batch 2
    DS_ACCELERATOR=cpu python tools/memory_plan.py --measure --preset sd3_tiny --device cpu
    torchrun --nproc_per_node 2 tools/memory_plan.py --measure --preset tiny --device cpu
    python tools/memory_plan.py --measure --preset sd35_medium --gpus 1 --grad-checkpointing --gpu-mem-gib 139
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _recipe_cfg_scales(preset: str) -> tuple[float, float, float]:
    """(k1, k2, k4) of the config preset whose recipe the architecture trains with: a scale of 1 runs
    one branch, any other two (CFG's doubled batch). flux_dev: 1 (FLUX.1-dev runs on its guidance
    embedding, no true CFG); the SD and SD3 recipes: 1.5 / 4.5."""
    from sidscale.config import load_config
    from sidscale.families.presets import preset_nets

    m = load_config(preset_nets(preset).config_preset(preset)).method
    return (m.cfg_train_fake, m.cfg_eval_fake, m.cfg_eval_real)


def main(argv: list[str] | None = None) -> int:
    # NOTE: sidscale.families.presets does not import DeepSpeed (see the --measure note below)
    from sidscale.families.presets import PLAN_PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl", choices=PLAN_PRESETS)
    p.add_argument("--gpus", type=int, default=None, help="default 8, or the world size with --measure")
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16", "pure_bf16"])
    p.add_argument("--adversarial", action="store_true",
                   help="SiDA (method.adversarial.enabled): the fake phase's real-sample call and the real prefetch")
    p.add_argument("--teacher-dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--reduce-bucket-size", type=float, default=None,
                   help="ZeRO reduce bucket size in elements (default: the ds_configs/zero{Z}.json value)")
    p.add_argument("--teacher-partitioned", action="store_true",
                   help="plan the frozen teacher as an optimizer-less ZeRO-3 engine (teacher.partitioned)")
    p.add_argument("--text-encoders", default="replicated", choices=["replicated", "partitioned", "off"],
                   help="text encoders on every GPU, ZeRO-3 partitioned, or off the GPU (CPU / precomputed)")
    p.add_argument("--budget-fraction", type=float, default=None,
                   help="share of the card the plan may fill after the reserve (train.memory_fraction; default 0.9)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.add_argument("--measure", action="store_true", help="also measure the real trainer's peak (see above)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="--measure: default cuda when available")
    p.add_argument("--steps", type=int, default=2, help="--measure: measured iterations after one warm-up")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per optimizer step")
    p.add_argument("--grad-accum-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="DeepSpeed's data_types.grad_accum_dtype (default: what sidscale sets, fp32 for bf16)")
    args = p.parse_args(argv)
    if args.measure and args.text_encoders != "replicated":
        p.error(f"--text-encoders {args.text_encoders} with --measure: the measured trainer keeps its text encoders "
                "on every rank; plan the other placements without --measure")
    if args.measure and (args.device or "").lower() == "cpu":
        # NOTE: before any sidscale.perf import: importing DeepSpeed fixes its accelerator for good.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from sidscale.perf.memory_plan import DEFAULT_BUDGET_FRACTION, GIB, GPU_RESERVE_GIB, PlanInput, plan

    measured, info = None, None
    if args.measure:
        # the world init_distributed will join (torchrun sets WORLD_SIZE; a plain start is one rank)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.gpus not in (None, world):
            p.error(f"--gpus {args.gpus} with --measure: the plan must describe the measured world ({world} ranks)")
        args.gpus = world
    args.gpus = args.gpus or 8
    rbs = None if args.reduce_bucket_size is None else int(args.reduce_bucket_size)
    # NOTE: the prediction is made before the measurement: a ZeRO-3 engine patches F.linear for the
    # rest of the process, which would change the meta-device activation count the plan relies on.
    result = plan(PlanInput(args.preset, args.gpus, args.zero, args.micro_batch, args.precision,
                            args.teacher_dtype, args.grad_checkpointing, args.gpu_mem_gib,
                            cfg_scales=_recipe_cfg_scales(args.preset), reduce_bucket_size=rbs,
                            accumulation=args.accumulation, grad_accum_dtype=args.grad_accum_dtype,
                            teacher_partitioned=args.teacher_partitioned, text_encoders=args.text_encoders,
                            adversarial=args.adversarial,
                            budget_fraction=args.budget_fraction or DEFAULT_BUDGET_FRACTION))
    if args.measure and _measure_device(args) == "cpu":
        # every rank of a CPU run lives in this host's memory: refuse before building anything
        need, have = result.total * args.gpus, _host_memory_bytes()
        if have and need > have:
            p.error(f"--measure --preset {args.preset} on the CPU: the plan predicts {need / GIB:.1f} GiB of tensors "
                    f"for {args.gpus} rank(s), more than this host's {have / GIB:.1f} GiB; measure it on GPUs, or "
                    "measure a CPU-sized preset (tiny, mid, sd3_tiny)")
    rank = 0
    if args.measure:
        info = _init(args)
        measured, rank = _measure(args, info), info.rank
    if rank != 0:
        return 0
    record = result.to_dict()
    if measured is not None:
        record["measured"] = {"peak_gib": measured["peak_bytes"] / GIB, "static_gib": measured["static_bytes"] / GIB,
                              "device": measured["device"]}
        record["predicted_over_measured"] = result.total / measured["peak_bytes"]
    if args.json:
        print(json.dumps(record, sort_keys=True))
        return 0
    print(f"{args.preset}: {args.gpus} GPUs, ZeRO-{args.zero}, micro-batch {args.micro_batch}, {args.precision}, "
          f"checkpointing {'on' if args.grad_checkpointing else 'off'}")
    for name, value in result.terms.items():
        print(f"  {name:32s} {value / GIB:9.3f} GiB")
    print(f"  {'total':32s} {result.total / GIB:9.3f} GiB of {args.gpu_mem_gib:g}")
    print(f"  budget: {result.budget / GIB:.1f} GiB ({result.inputs.budget_fraction:.0%} of the card less "
          f"{GPU_RESERVE_GIB:g} GiB outside the allocator); free at the peak: {result.free_fraction:.1%}")
    print(f"  largest micro-batch that fits the budget: {result.max_micro_batch}")
    print(f"  construction peak (teacher whole, G built, F being built): {result.construction_total / GIB:.3f} GiB")
    for name, value in result.host.items():
        print(f"  host memory per rank, {name}: {value / GIB:.3f} GiB")
    if measured is not None:
        print(f"  measured peak ({measured['device']}, largest rank) {measured['peak_bytes'] / GIB:9.3f} GiB; "
              f"predicted / measured = {record['predicted_over_measured']:.3f}")
    return 0


def _measure_device(args) -> str:
    """Where --measure will run: --device, else cuda when torch sees a GPU (init_distributed's choice)."""
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" else "cpu"


def _host_memory_bytes() -> int:
    """Physical memory of this host (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _init(args):
    from sidscale.distributed.runtime import init_distributed

    info = init_distributed()
    if args.device and info.device.type != args.device:
        raise SystemExit(f"memory_plan: --device {args.device} but the accelerator is {info.device.type} "
                         "(set DS_ACCELERATOR=cpu for CPU runs)")
    return info


def _measure(args, info) -> dict:
    """The largest per-rank peak of the real trainer at the plan's configuration."""
    import torch

    from sidscale.bench.cases import BenchCase
    from sidscale.bench.peak import measure_trainer_peak
    from sidscale.distributed import comm
    from sidscale.distributed.runtime import shutdown_distributed

    case = BenchCase(args.preset, args.zero, args.precision, args.micro_batch, args.accumulation,
                     args.grad_checkpointing,
                     args.teacher_dtype, None if args.reduce_bucket_size is None else int(args.reduce_bucket_size),
                     teacher_partitioned=args.teacher_partitioned)
    out = measure_trainer_peak(case, info, args.steps)
    if info.world_size > 1:  # the plan is per GPU: report the rank that needed most
        peaks = torch.tensor([out["peak_bytes"], out["static_bytes"]], dtype=torch.float64, device=info.device)
        peaks = comm.all_reduce(peaks, "max")
        out = {"peak_bytes": float(peaks[0]), "static_bytes": float(peaks[1])}
    shutdown_distributed()
    return {**out, "device": info.device.type}


if __name__ == "__main__":
    raise SystemExit(main())
