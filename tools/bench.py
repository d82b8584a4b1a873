"""Benchmark full SiD iterations of the DeepSpeed trainer; one JSON line per configuration.

Random weights at the preset's real architecture, the real ``Trainer.train_step`` (fake step +
generator step with accumulation + EMA). FLOPs are counted on one actual iteration with
FlopCounterMode (recomputation included when checkpointing), also in units of one denoiser forward
per sample (``net_fwd_equivalents_per_sample``). UNet presets run the toy config's SiD-LSG settings;
SD3 presets (sd3_tiny on a CPU, sd3_medium / sd35_medium / sd35_large on GPUs) their config
preset's SiD-DiT settings (flow schedule, CFG 4.5 on all three nets) with one generator step.
Several values per option give the cartesian product, timed round-robin in one process (fair on a
shared CPU):

    python tools/bench.py --preset tiny --device cpu --zero 1 2 3 --precision fp32 --baseline reference
    python tools/bench.py --preset sd15 --device cuda --zero 2 --precision bf16 --micro-batch 4 \
        --grad-checkpointing --baseline reference --json-out bench/results/sd15.json
    torchrun --nproc_per_node 8 tools/bench.py --preset sdxl --device cuda --micro-batch 2   # rank 0 prints
    OMP_NUM_THREADS=1 python tools/bench.py --preset sd3_tiny --device cpu --precision fp32 --baseline reference
    python tools/bench.py --preset sd35_medium --device cuda --grad-checkpointing                 # 1024 px

``--baseline reference``: the reference recipe (plain fp32 PyTorch ReferenceLoop, TF32 off, no
checkpointing, micro-batch ``--baseline-micro-batch``, default 1) on the same preset; every line
then carries ``ratio_vs_reference`` = our samples/s / the reference's samples/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # NOTE: sidscale.families.presets does not import DeepSpeed (its accelerator is fixed at import, see main)
    from sidscale.families.presets import BENCH_PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=BENCH_PRESETS,
                   help="UNet: tiny, mid (CPU-sized), sd15, sd21, sd21_768, sdxl; SD3 (rectified flow, MMDiT): "
                        "sd3_tiny (CPU-sized), sd3_medium, sd35_medium, sd35_large")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--zero", type=int, nargs="+", default=[2], choices=[1, 2, 3])
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1])
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per optimizer step")
    p.add_argument("--grad-checkpointing", action="store_true", help="teacher, generator and fake networks")
    p.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: the training precision")
    p.add_argument("--reduce-bucket-size", type=float, nargs="+", default=[None],
                   help="ZeRO reduce/allgather bucket sizes in elements (default: the ds_configs value)")
    p.add_argument("--compile", nargs="+", default=["none"], choices=["none", "inductor", "aot_eager", "eager"],
                   help="train.compile backends to compare ('none': eager PyTorch)")
    p.add_argument("--steps", type=int, default=5, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--baseline", choices=["none", "reference"], default="none")
    p.add_argument("--baseline-micro-batch", type=int, default=1)
    p.add_argument("--no-flops", action="store_true", help="skip the counted iteration")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak per device for MFU (default: known GPUs)")
    p.add_argument("--sequential", action="store_true",
                   help="one configuration at a time, freed before the next (default on CUDA: memory)")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from sidscale.bench import bench
    from sidscale.bench.cases import BenchCase
    from sidscale.distributed import comm
    from sidscale.distributed.runtime import init_distributed, shutdown_distributed

    dist_info = init_distributed(args.local_rank)
    if dist_info.device.type != args.device:
        raise SystemExit(f"bench: --device {args.device} but the accelerator is {dist_info.device.type} "
                         "(set DS_ACCELERATOR=cpu for CPU runs)")
    cases = [BenchCase(args.preset, z, prec, mb, args.accumulation, args.grad_checkpointing, args.teacher_dtype,
                       None if rbs is None else int(rbs), None if comp == "none" else comp)
             for z, prec, mb, rbs, comp in itertools.product(args.zero, args.precision, args.micro_batch,
                                                            args.reduce_bucket_size, args.compile)]
    sequential = args.sequential or args.device == "cuda"
    net_fwd = None if args.no_flops else bench.net_forward_flops_per_sample(args.preset)

    def make(i: int):
        if i < len(cases):
            return bench.trainer_runner(cases[i], dist_info, args.seed)
        return bench.reference_runner(args.preset, dist_info.device, args.baseline_micro_batch, args.seed)

    n = len(cases) + (args.baseline == "reference")
    records: list[dict] = [{} for _ in range(n)]

    def finish(i: int, runner) -> None:
        try:
            flops = None if args.no_flops else bench.iteration_flops(runner)
            records[i] = bench.summarize(runner, flops, net_fwd, args.peak_tflops, bool(runner.info["tf32"]))
        finally:
            bench.release(runner)

    # Under several ranks every rank runs every configuration (the reference only on rank 0's
    # schedule too, so collectives stay aligned: it has none); rank 0 reports.
    groups = [[i] for i in range(n)] if sequential else [list(range(n))]
    for group in groups:
        runners = []
        try:
            runners = [make(i) for i in group]
            bench.measure(runners, args.warmup, args.steps)
        except torch.OutOfMemoryError as e:
            for i in group:
                records[i] = {"config": cases[i].label if i < len(cases) else "reference", "error": "OOM",
                              "detail": str(e).splitlines()[0]}
            for r in runners:
                bench.release(r)
            continue
        for i, r in zip(group, runners, strict=True):
            finish(i, r)

    # Peak memory of every rank, gathered to rank 0 (ranks differ under ZeRO partitioning).
    mine = [{k: v for k, v in rec.items() if k.endswith("_gib")} for rec in records]
    gathered = comm.all_gather_object(mine)
    ref = records[-1] if args.baseline == "reference" else None
    lines = []
    for i, rec in enumerate(records):
        if dist_info.world_size > 1:
            rec["per_rank_memory"] = [g[i] for g in gathered]
        if ref is not None and i < len(cases) and "samples_per_s" in rec and "samples_per_s" in ref:
            # per-rank throughput of ours vs the single-device reference recipe
            rec["ratio_vs_reference"] = rec["samples_per_s"] / ref["samples_per_s"]
            rec["reference_config"] = ref["config"]
        rec["preset"] = args.preset
        lines.append(json.dumps(rec, sort_keys=True))
    if dist_info.is_main:
        for line in lines:
            print(line, flush=True)
        if args.json_out:
            out = Path(args.json_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write("".join(line + "\n" for line in lines))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
