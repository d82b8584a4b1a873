"""Reading webdataset tar shards, shared by the prompt stream and the real-pair stream: which shards a
worker reads (a pure function of seed, epoch, rank, worker), the samples of one shard with the caption
checks and the truncated-tar check, per-worker counters and the seeded shuffle buffer.

Bad data is skipped, counted and warned about (``DataWarning`` naming the shard), never fatal: a shard
that is missing at read time, not a tar, or truncated (checked by its end-of-archive block) stops being
read where it breaks; a sample without ``.txt``, with undecodable UTF-8 or with empty (whitespace-only)
text is dropped, as is one the caller's ``select`` rejects (its reason counted as ``skipped_<reason>``).
"""

from __future__ import annotations

import glob
import os
import random
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from sidscale.data.shards import MANIFEST_FORMAT, load_manifest

# Counters every worker keeps (summed over workers for the rank); "epochs" is added by stats().
COUNTERS = ("samples", "shards_opened", "skipped_corrupt_shards", "skipped_empty", "skipped_missing_text",
            "skipped_undecodable")

# (files of one sample by lower-case extension) -> (skip reason, None) or (None, what to keep of it)
Select = Callable[[dict[str, bytes]], tuple[str | None, Any]]


class DataWarning(UserWarning):
    """Bad data skipped, or a resume that could not be exact."""


def resolve_shards(shards: str, manifest_format: str = MANIFEST_FORMAT) -> list[str]:
    """Shard paths of a brace/glob pattern (``dir/prompts-{000000..000009}.tar``), a manifest.json (of
    ``manifest_format``), or a directory holding one. ValueError when nothing matches; FileNotFoundError
    naming missing shards.
    """
    if not shards:
        raise ValueError("no shard pattern given (empty string)")
    path = Path(shards)
    if shards.endswith(".json") or path.is_dir():
        manifest = load_manifest(path, manifest_format)
        base = path if path.is_dir() else path.parent
        paths = [str(base / s["path"]) for s in manifest["shards"]]
    else:
        paths = []
        for p in braceexpand(shards):
            paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or len(missing) == len(paths):
        raise ValueError(f"shard pattern {shards!r} matches no shard files "
                         f"({len(paths)} candidates, none exist)")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards of {shards!r} are missing, "
                                f"first: {missing[0]}")
    return paths


def seeded_rng(*parts: object) -> random.Random:
    # NOTE: seeding with a str hashes it with sha512: stable across processes and Python runs
    # (unlike hash()), so the order is a pure function of these parts.
    return random.Random(":".join(["sidscale", *map(str, parts)]))


def worker_shards(shards: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  num_workers: int, resampled: bool) -> list[str]:
    """The shards logical ``worker`` of ``rank`` reads in ``epoch`` (see ``sidscale.data.stream``)."""
    if resampled:
        rng = seeded_rng("resample", seed, epoch, rank, worker)
        return [rng.choice(shards) for _ in range(max(1, len(shards) // (world_size * num_workers)))]
    order = list(shards)
    seeded_rng("epoch", seed, epoch).shuffle(order)
    return order[rank::world_size][worker::num_workers]


class _Counters:
    """A worker's counters; ``active=False`` while fast-skipping (those events were counted already)."""

    def __init__(self, start: dict[str, int], names: Sequence[str] = COUNTERS) -> None:
        self.values = {k: int(start.get(k, 0)) for k in names}
        self.active = True

    def add(self, key: str, n: int = 1) -> None:
        if self.active:
            self.values[key] += n


def _tar_samples(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by webdataset key (``dir/key.ext`` -> key, ext)."""
    key, files = None, {}
    for member in tf:
        if not member.isfile():
            continue
        k, ext = base_plus_ext(member.name)
        if k is None:
            continue
        if k != key:
            # NOTE: hand out the finished sample before reading on, so a shard that breaks later
            # still delivers every complete sample before the break
            if key is not None:
                yield key, files
            key, files = k, {}
        files[ext.lower()] = tf.extractfile(member).read()
    if key is not None:
        yield key, files


def _check_end_of_archive(path: str, offset: int) -> None:
    # NOTE: tarfile ends silently when a file is cut at (or inside) a member header; a complete
    # archive has a zero block where the members stop, so check it is there.
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block at byte {offset} (truncated?)")


def _caption(text: bytes | None) -> tuple[str | None, str]:
    """(skip reason or None, the stripped caption)."""
    if text is None:
        return "missing_text", ""
    try:
        prompt = text.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "undecodable", ""
    return (None if prompt else "empty"), prompt


def read_shard(path: str, counters: _Counters, select: Select | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, prompt)`` of one shard, skipping and counting bad samples / a broken tar. With
    ``select``: ``(key, (prompt, kept))``, ``kept`` = what ``select`` keeps of the sample's files (a sample
    it rejects is counted as ``skipped_<reason>``)."""
    counters.add("shards_opened")
    skipped: Counter[str] = Counter()
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for key, files in _tar_samples(tf):
                reason, prompt = _caption(files.get("txt"))
                kept = None
                if reason is None and select is not None:
                    reason, kept = select(files)
                if reason is not None:
                    skipped[reason] += 1
                    counters.add(f"skipped_{reason}")
                    continue
                yield f"{name}/{key}", (prompt if select is None else (prompt, kept))
            _check_end_of_archive(path, tf.offset)
    except Exception as e:  # any breakage of one shard: count it, keep streaming from the next
        counters.add("skipped_corrupt_shards")
        warnings.warn(f"skipping the rest of corrupt shard {path}: {type(e).__name__}: {e}", DataWarning,
                      stacklevel=2)
    if skipped:
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items())
        warnings.warn(f"shard {path}: skipped samples ({detail})", DataWarning, stacklevel=2)


def shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset-style shuffle buffer: memory ``bufsize``, order fixed by ``rng``."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf
