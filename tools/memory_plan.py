"""Predicted per-GPU memory of SiD-LSG training, term by term, and the largest micro-batch that fits.

    python tools/memory_plan.py --preset sdxl --gpus 8 --zero 2 --micro-batch 4 --precision bf16 \
        --grad-checkpointing --gpu-mem-gib 80

Prints a table (GiB per GPU) and, with --json, one JSON line. The model is documented in
sidscale/perf/memory_plan.py (activations measured on the meta device at the preset's latent size).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl", choices=["tiny", "sd15", "sd21", "sd21_768", "sdxl"])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--teacher-dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = p.parse_args(argv)

    from sidscale.perf.memory_plan import GIB, PlanInput, plan

    result = plan(PlanInput(args.preset, args.gpus, args.zero, args.micro_batch, args.precision,
                            args.teacher_dtype, args.grad_checkpointing, args.gpu_mem_gib))
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
        return 0
    print(f"{args.preset}: {args.gpus} GPUs, ZeRO-{args.zero}, micro-batch {args.micro_batch}, {args.precision}, "
          f"checkpointing {'on' if args.grad_checkpointing else 'off'}")
    for name, value in result.terms.items():
        print(f"  {name:28s} {value / GIB:9.2f} GiB")
    print(f"  {'total':28s} {result.total / GIB:9.2f} GiB of {args.gpu_mem_gib:g}")
    print(f"  largest micro-batch that fits: {result.max_micro_batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
