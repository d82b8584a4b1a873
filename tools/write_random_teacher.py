"""Write a random-weight teacher directory of a preset architecture (diffusers layout, no download).

    python tools/write_random_teacher.py --preset sd15 --out /tmp/sd15-random            # bf16, ~2.1 GB
    python tools/write_random_teacher.py --preset tiny --out /tmp/tiny --dtype fp32       # CPU-sized
    python sidscale/train.py --config sd15 --set teacher.path=/tmp/sd15-random ...       # then train on it
    python tools/write_random_teacher.py --preset sd35_medium --out /tmp/sd35m-random    # SD3 layout, ~15 GB
    python tools/write_random_teacher.py --preset sd3_tiny --out /tmp/sd3-tiny            # CPU-sized SD3.5
    python sidscale/train.py --config sd35_medium --set teacher.path=/tmp/sd3-tiny --set teacher.resolution=256 ...
    python tools/write_random_teacher.py --preset flux_dev --out /tmp/flux-random      # FLUX layout, ~33 GB bf16
    python tools/write_random_teacher.py --preset flux_tiny --out /tmp/flux-tiny          # CPU-sized FLUX.1-dev
    python sidscale/train.py --config flux_dev --set teacher.path=/tmp/flux-tiny --set teacher.resolution=256 \
        --set teacher.max_sequence_length=64 ...

For systems checks only (speed, memory, checkpoint/resume/export paths): the weights are random.
Prints the directory's random_teacher.json (preset, kind, resolution, the config preset to train it
with, parameter counts). SD3 presets are written in StableDiffusion3Pipeline's layout (T5 included),
FLUX presets in FluxPipeline's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from sidscale.testing.random_teacher import PRESETS, write_random_teacher

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=PRESETS)
    p.add_argument("--out", type=Path, required=True, help="teacher directory to write (created)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument("--text-layers", type=int, default=None,
                   help="layers per text encoder (default: the preset's; fewer = faster, same widths)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = write_random_teacher(args.out, args.preset, args.dtype, args.text_layers, args.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
