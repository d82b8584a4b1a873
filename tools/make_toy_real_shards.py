"""Write the toy mixture's exact samples + their prompts as real-pair shards (``data.real_shards``).

    python tools/make_toy_real_shards.py --kind toy_flow --count 4096 --seed 0 --out data/toy_real

Pixel space, no VAE: a toy teacher's latent is the image, so each sample is stored as an fp32
``KEY.latent.npy`` [3, 16, 16] + ``KEY.txt``. Sample ``i``'s prompt is ``prompts[i % 24]``; the images are
``ToyMixture.sample(prompts, torch.Generator().manual_seed(seed))`` (``sidscale.data.real_shards``), the
samples ``data.real_shards: toy`` writes into the run directory with ``seed = train.seed``. The mixture is
``--teacher DIR``'s ``toy_mixture.json``, or the default toy teacher's of ``--kind`` (toy and toy_flow are
fitted on the same mixture).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sidscale.data.real_shards import TOY_REAL_COUNT, write_toy_real_shards  # noqa: E402
from sidscale.families.toy.fit import ToyTeacherSpec, load_toy_mixture  # noqa: E402
from sidscale.families.toy.mixture import ToyMixture  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("toy", "toy_flow"), default="toy", help="the toy teacher's teacher.kind")
    p.add_argument("--count", type=int, default=TOY_REAL_COUNT, help="how many exact samples")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (train.seed for data.real_shards: toy)")
    p.add_argument("--teacher", type=Path, default=None, help="a toy teacher directory (its toy_mixture.json)")
    p.add_argument("--out", required=True, type=Path, help="output dir (empty unless --overwrite)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per tar shard")
    p.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.count < 1:
        print(f"error: --count must be >= 1, got {args.count}", file=sys.stderr)
        return 2
    if args.teacher is not None:
        mixture = load_toy_mixture(args.teacher)
    else:
        spec = ToyTeacherSpec(parameterisation="flow" if args.kind == "toy_flow" else "eps")
        mixture = ToyMixture.from_dict(spec.mixture)
    try:
        manifest = write_toy_real_shards(mixture, args.out, count=args.count, seed=args.seed, teacher_kind=args.kind,
                                         shard_size=args.shard_size, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"total": manifest["total"], "shards": len(manifest["shards"]),
                      "manifest": str(args.out / "manifest.json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
