"""Turn prompt files into webdataset tar shards + manifest.json for training.

    python tools/make_prompt_shards.py captions.txt more.jsonl.gz --out data/prompts \
        --shard-size 10000 --dedupe --min-chars 3 --max-chars 400

Inputs: ``.txt`` (one prompt per line), ``.jsonl`` (``--field``, default "caption"), ``.csv`` /
``.tsv`` (``--column``, default "caption"); any of them gzipped with a ``.gz`` suffix. Train on the
result with ``data.shards=data/prompts/manifest.json`` (or the brace pattern
``data/prompts/prompts-{000000..000002}.tar``). All the logic lives in ``sidscale.data.shards``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sidscale.data.shards import read_prompt_file, write_prompt_shards  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="prompt files (.txt/.jsonl/.csv/.tsv[.gz])")
    p.add_argument("--out", required=True, type=Path, help="output dir (empty unless --overwrite)")
    p.add_argument("--shard-size", type=int, default=10000, help="prompts per tar shard")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicates (after whitespace strip)")
    p.add_argument("--min-chars", type=int, default=1, help="drop prompts shorter than this")
    p.add_argument("--max-chars", type=int, default=None, help="drop prompts longer than this")
    p.add_argument("--field", default="caption", help="JSONL field holding the prompt")
    p.add_argument("--column", default="caption", help="CSV/TSV column holding the prompt")
    p.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        print(f"error: input file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    items = itertools.chain.from_iterable(
        read_prompt_file(p, field=args.field, column=args.column) for p in args.inputs
    )
    try:
        manifest = write_prompt_shards(
            items, args.out, shard_size=args.shard_size, dedupe=args.dedupe, min_chars=args.min_chars,
            max_chars=args.max_chars, overwrite=args.overwrite, progress=True,
            sources=[str(p) for p in args.inputs],
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("total", "seen", "dropped", "content_sha256")}
    summary.update(shards=len(manifest["shards"]), manifest=str(args.out / "manifest.json"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
