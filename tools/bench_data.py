"""How fast does PromptStream feed one rank, next to what the trainer consumes?

    python tools/bench_data.py [--captions FILE] [--workers 2] [--batch-size 16] [--seconds 10]
                               [--consume-rate 64]

Builds shards from the COCO captions in a temp dir, streams them as rank 0 of ``--world-size``
with real CLIP tokenisation (ids identical to SD1.5's tokenizer) inside the DataLoader workers,
and prints JSON: prompts/s delivered, the trainer's consumption rate (a parameter: SD1.5 SiD-LSG
at batch ~8/GPU and ~8 it/s on an H100 is about 64 prompts/s/GPU) and their ratio; also the
time to the first batch and the cost of a resume (fast-skip) to the middle of an epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked: no tokenizer threads
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidscale.data.shards import read_prompt_file, write_prompt_shards  # noqa: E402
from sidscale.data.stream import PromptStream  # noqa: E402
from sidscale.families.shared.tokenizers import build_clip_tokenizer  # noqa: E402


class ClipTokenize:
    """prompts -> LongTensor [B, 77], SD1.5 style (pad to max length, truncate)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str]):
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids


def measure(stream: PromptStream, seconds: float, warmup_batches: int) -> dict[str, float]:
    t0 = time.perf_counter()
    next(stream)
    first = time.perf_counter() - t0
    for _ in range(warmup_batches):
        next(stream)
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        n += len(next(stream)["prompts"])
    rate = n / (time.perf_counter() - t1)
    return {"first_batch_s": round(first, 3), "prompts_per_s": round(rate, 1), "measured_prompts": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", default="/work/shared/data/coco2014_val_captions_30k.txt")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--consume-rate", type=float, default=64.0, help="trainer prompts/s per GPU (SD1.5 scale)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = write_prompt_shards(read_prompt_file(args.captions), Path(tmp) / "shards",
                                       shard_size=args.shard_size)
        write_s = time.perf_counter() - t0
        tokenize = ClipTokenize(build_clip_tokenizer(Path(tmp) / "tokenizer", model_max_length=77))
        kw = dict(rank=0, world_size=args.world_size, batch_size=args.batch_size, seed=0,
                  num_workers=args.workers, tokenize=tokenize)
        shards = str(Path(tmp) / "shards" / "manifest.json")

        stream = PromptStream(shards, **kw)
        result = measure(stream, args.seconds, warmup_batches=4)
        untokenized = PromptStream(shards, **{**kw, "tokenize": None})
        raw = measure(untokenized, min(args.seconds, 3.0), warmup_batches=4)
        # resume cost: skip to the middle of each worker's epoch block
        state = stream.state_dict()
        stream.close()
        untokenized.close()
        per_worker = manifest["total"] // (args.world_size * max(1, args.workers))
        for w in state["workers"]:
            w["offset"] = per_worker // 2
        resumed = PromptStream(shards, **kw)
        resumed.load_state_dict(state)
        t0 = time.perf_counter()
        next(resumed)
        resume_s = time.perf_counter() - t0
        resumed.close()

    print(json.dumps({
        "prompts": manifest["total"], "shards": len(manifest["shards"]), "write_shards_s": round(write_s, 2),
        "world_size": args.world_size, "workers": args.workers, "batch_size": args.batch_size,
        "tokenizer": "CLIPTokenizer (SD1.5 ids, 77 tokens)",
        "prompts_per_s_per_rank": result["prompts_per_s"], "first_batch_s": result["first_batch_s"],
        "prompts_per_s_untokenized": raw["prompts_per_s"],
        "resume_skip_samples_per_worker": per_worker // 2, "resume_first_batch_s": round(resume_s, 3),
        "trainer_consume_rate_per_gpu": args.consume_rate,
        "supply_over_demand": round(result["prompts_per_s"] / args.consume_rate, 1),
        "cpu_cores": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
