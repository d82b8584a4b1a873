"""Reference FID statistics (mu, sigma) of an image folder, with the evaluation's preprocessing.

    python tools/ref_stats.py --images /data/coco/val2014 --out stats/coco2014_val_clean256.npz \
        --inception-weights ~/weights/inception-2015-12-05.pt [--device cuda] [--batch 128] [--workers 8]

Every image under --images (recursive), with the FID preprocessing of --protocol (default
sid_lsg_coco30k: torchvision-rounded centre crop, PIL Lanczos 256, clean-fid "clean" = bicubic 299,
TF-Inception pool3; dmd2_coco10k_512: Lanczos 512; sid_dit_coco10k: Lanczos 256, the network resizes
inside). The npz records the protocol (and its version): tools/fid_eval.py refuses statistics of
another preprocessing. Cached: when --out already holds statistics of the same folder, image count,
protocol and weights file, nothing is recomputed (--force recomputes). clean-fid's published
statistics skip the 256 step, so they are not interchangeable with these.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sidscale.eval.fid import cached_folder_stats, check_inception_file  # noqa: E402
from sidscale.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="npz: mu, sigma, meta")
    p.add_argument("--inception-weights", required=True, type=Path, help="local inception-2015-12-05.pt")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--force", action="store_true", help="recompute even if --out matches")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=sorted(PROTOCOLS),
                   help="whose FID preprocessing (sidscale/eval/protocols.py); default %(default)s")
    args = p.parse_args(argv)
    check_inception_file(args.inception_weights)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    mu, _, meta = cached_folder_stats(args.images, args.out, args.inception_weights, force=args.force,
                                      device=device, batch=args.batch, workers=args.workers,
                                      description="features", protocol=get_protocol(args.protocol))
    print(f"{args.out}: {meta['num_images']} images, {mu.shape[0]}-d features ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
