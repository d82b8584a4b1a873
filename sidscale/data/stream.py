"""The trainer's prompt source: batches of prompts streamed from webdataset tar shards, resumable.

Order: a pure function of (seed, rank, worker, epoch)
    Each rank runs ``W = max(1, num_workers)`` *logical workers* (DataLoader worker processes, or
    one in-process worker when ``num_workers=0``). In epoch ``e`` a worker reads a shard list and
    passes its samples through a shuffle buffer; both are seeded from (seed, epoch, rank, worker)
    only, so a worker's sample sequence in an epoch never depends on timing or on other workers.

    - ``resampled=False`` (epoch mode): in epoch ``e`` the shard list is permuted with (seed, e)
      (the same permutation on every rank) and split ``perm[rank::world_size][worker::W]``, so the
      ranks x workers read disjoint shards that together cover every sample exactly once per epoch.
      Each worker then moves on to epoch ``e + 1`` by itself (ranks may be in different epochs
      at a given step; epochs differ in length per worker). Batches may straddle two epochs.
    - ``resampled=True``: a worker's "epoch" is ``max(1, n_shards // (world_size * W))`` shards
      drawn with replacement using (seed, e, rank, worker): infinite, different per rank/worker.

    Batches are formed inside the worker (and tokenised there: skipped samples never reach the
    tokenizer), and the DataLoader hands them out round-robin: batch ``i`` of this rank comes from
    logical worker ``i % W``. Workers never run dry (both modes are infinite), so this stays exact.

Resume: a cursor per worker, counted at the consumer
    Every batch carries its worker's cursor ``(epoch, offset)`` = the position just after its last
    sample (offset counts the samples the worker produced in that epoch) plus the worker's counters.
    The main process keeps the cursor of the *last batch it received* from each worker; batches a
    worker prefetched but the trainer never took are not counted. ``state_dict()`` = those cursors +
    the number of batches received ``n``. ``load_state_dict`` restarts each worker at the start of
    its saved epoch and fast-skips ``offset`` samples (read and decoded, not tokenised, not batched;
    at most one worker-epoch of reading), and rotates the DataLoader worker ids by ``n % W`` so that
    the next batch comes from the logical worker that was next in line. Result: the resumed stream
    yields exactly the batches the uninterrupted one would have, and ``stats()`` match too.
    ``batch_size`` may change between runs (positions are in samples); the resumed batches then
    start from the same sample positions.

World size (or num_workers, seed, shard list, resampled, shuffle_buffer) changed between runs
    A cursor is only meaningful for the split it was taken in, so the stream restarts the *new*
    split at the beginning of epoch ``E = min(epoch of the saved workers)`` of the loaded state, with
    a ``DataWarning``. Preserved: that epoch number (epoch mode: nothing of epoch ``E`` is lost; the
    part of ``E`` already consumed before the change is read again) and the counters of ``stats()``.
    Not preserved: the exact sample order (it is a function of the new rank/worker split). The
    ranks of one run only agree on ``E`` if they load states with the same minimum epoch, so on a
    world-size change the trainer should load one rank's state (e.g. rank 0's) on every rank.

Bad data is skipped, counted and warned about (``DataWarning`` naming the shard), never fatal: a
shard that is missing at read time, not a tar, or truncated (checked by its end-of-archive block)
stops being read where it breaks; a sample without ``.txt``, with undecodable UTF-8 or with empty
(whitespace-only) text is dropped. The counters reach the trainer in ``batch["stats"]`` and
``stats()``. Only a worker that finds no valid sample in ``MAX_EMPTY_PASSES`` consecutive epochs
raises (a hang would be the only alternative).
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import signal
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from sidscale.data.shards import load_manifest

STATE_VERSION = 1
MAX_EMPTY_PASSES = 10
# Counters each worker keeps (summed over workers for the rank); "epochs" is added by stats().
COUNTERS = ("samples", "shards_opened", "skipped_corrupt_shards", "skipped_empty", "skipped_missing_text",
            "skipped_undecodable")

Tokenize = Callable[[list[str]], torch.Tensor]


class DataWarning(UserWarning):
    """Bad data skipped, or a resume that could not be exact."""


def resolve_shards(shards: str) -> list[str]:
    """Shard paths of a brace/glob pattern (``dir/prompts-{000000..000009}.tar``), a manifest.json, or a
    directory holding one. ValueError when nothing matches; FileNotFoundError naming missing shards.
    """
    if not shards:
        raise ValueError("no shard pattern given (empty string)")
    path = Path(shards)
    if shards.endswith(".json") or path.is_dir():
        manifest = load_manifest(path)
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


def _rng(*parts: object) -> random.Random:
    # NOTE: seeding with a str hashes it with sha512: stable across processes and Python runs
    # (unlike hash()), so the order is a pure function of these parts.
    return random.Random(":".join(["sidscale", *map(str, parts)]))


def worker_shards(shards: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  num_workers: int, resampled: bool) -> list[str]:
    """The shards logical ``worker`` of ``rank`` reads in ``epoch`` (see module docstring)."""
    if resampled:
        rng = _rng("resample", seed, epoch, rank, worker)
        return [rng.choice(shards) for _ in range(max(1, len(shards) // (world_size * num_workers)))]
    order = list(shards)
    _rng("epoch", seed, epoch).shuffle(order)
    return order[rank::world_size][worker::num_workers]


class _Counters:
    """A worker's counters; ``active=False`` while fast-skipping (those events were counted already)."""

    def __init__(self, start: dict[str, int]) -> None:
        self.values = {k: int(start.get(k, 0)) for k in COUNTERS}
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


def read_shard(path: str, counters: _Counters) -> Iterator[tuple[str, str]]:
    """Yield ``(key, prompt)`` of one shard, skipping and counting bad samples / a broken tar."""
    counters.add("shards_opened")
    skipped = dict.fromkeys(("missing_text", "undecodable", "empty"), 0)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for key, files in _tar_samples(tf):
                text = files.get("txt")
                reason = None
                if text is None:
                    reason = "missing_text"
                else:
                    try:
                        prompt = text.decode("utf-8").strip()
                        reason = None if prompt else "empty"
                    except UnicodeDecodeError:
                        reason = "undecodable"
                if reason is not None:
                    skipped[reason] += 1
                    counters.add(f"skipped_{reason}")
                    continue
                yield f"{name}/{key}", prompt
            _check_end_of_archive(path, tf.offset)
    except Exception as e:  # any breakage of one shard: count it, keep streaming from the next
        counters.add("skipped_corrupt_shards")
        warnings.warn(f"skipping the rest of corrupt shard {path}: {type(e).__name__}: {e}", DataWarning,
                      stacklevel=2)
    if any(skipped.values()):
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items() if v)
        warnings.warn(f"shard {path}: skipped samples ({detail})", DataWarning, stacklevel=2)


def first_prompt(paths: Sequence[str]) -> str | None:
    """The first readable prompt of ``paths`` in order (None: every shard is bad), without warnings."""
    counters = _Counters({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for path in paths:
            for _key, prompt in read_shard(path, counters):
                return prompt
    return None


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


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to produce its batches (picklable for spawn-started workers)."""

    shards: tuple[str, ...]
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers, >= 1
    resampled: bool
    shuffle_buffer: int
    batch_size: int
    tokenize: Tokenize | None


def worker_batches(plan: _Plan, worker: int, start: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Infinite batches of logical ``worker``, starting at cursor ``start`` = {epoch, offset, stats}."""
    counters = _Counters(start.get("stats", {}))
    epoch, skip = int(start["epoch"]), int(start["offset"])
    counters.active = skip == 0
    pending: list[tuple[str, str, int]] = []
    empty_passes = 0
    while True:
        shards = worker_shards(list(plan.shards), seed=plan.seed, epoch=epoch, rank=plan.rank,
                               world_size=plan.world_size, worker=worker, num_workers=plan.num_workers,
                               resampled=plan.resampled)
        samples = (s for path in shards for s in read_shard(path, counters))
        rng = _rng("buffer", plan.seed, epoch, plan.rank, worker)
        offset = 0
        for key, prompt in shuffled(samples, plan.shuffle_buffer, rng):
            offset += 1
            if offset <= skip:  # fast-forward to the saved cursor: no batching, no tokenising
                counters.active = offset == skip
                continue
            pending.append((key, prompt, epoch))
            if len(pending) == plan.batch_size:
                yield _make_batch(plan, pending, counters, worker, epoch, offset)
                pending = []
        counters.active, skip = True, 0  # (the epoch may be shorter than the cursor if data changed)
        empty_passes = 0 if offset else empty_passes + 1
        if empty_passes >= MAX_EMPTY_PASSES:
            raise RuntimeError(f"rank {plan.rank} worker {worker}: no valid prompt in {empty_passes} "
                               f"consecutive epochs; last shards read: {shards}")
        epoch += 1


def _make_batch(plan: _Plan, samples: list[tuple[str, str, int]], counters: _Counters, worker: int,
                epoch: int, offset: int) -> dict[str, Any]:
    counters.add("samples", len(samples))
    prompts = [s[1] for s in samples]
    batch: dict[str, Any] = {"prompts": prompts, "keys": [s[0] for s in samples],
                             "epoch": [s[2] for s in samples]}
    if plan.tokenize is not None:
        ids = plan.tokenize(prompts)
        if not isinstance(ids, torch.Tensor) or ids.shape[0] != len(prompts):
            raise TypeError(f"tokenize must return a tensor [B, L] with B={len(prompts)}, got {type(ids)}")
        batch["input_ids"] = ids.long()
    batch["_cursor"] = {"worker": worker, "epoch": epoch, "offset": offset, "stats": dict(counters.values)}
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals: SLURM's scancel / time limit and torchrun deliver
    SIGTERM (SIGUSR1, SIGINT) to every process of the job, and a worker killed by it would make the
    main process's next batch fail before its graceful checkpoint. The main process owns the stop
    and shuts the workers down itself."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class _WorkerDataset(IterableDataset):
    """Maps DataLoader worker ids to logical workers, rotated so resumed batches come in saved order."""

    def __init__(self, plan: _Plan, starts: list[dict[str, Any]], rotation: int) -> None:
        super().__init__()
        self.plan, self.starts, self.rotation = plan, starts, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.plan.num_workers
        return worker_batches(self.plan, worker, self.starts[worker])


def _zero_stats() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


class PromptStream:
    """Infinite, resumable batches ``{"prompts", "keys", "epoch", "stats"[, "input_ids"]}`` for one rank.

    ``shards``: brace/glob pattern, manifest.json or its directory (see :func:`resolve_shards`).
    ``tokenize`` runs inside the workers on each batch's prompts. See the module docstring for the
    order, resume and world-size-change semantics.
    """

    def __init__(self, shards: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 2, shuffle_buffer: int = 1000, resampled: bool = True,
                 tokenize: Tokenize | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"bad batch_size={batch_size} / num_workers={num_workers} / "
                             f"shuffle_buffer={shuffle_buffer}")
        paths = resolve_shards(shards)
        workers = max(1, num_workers)
        if len(paths) < world_size * workers:
            raise ValueError(f"shard pattern {shards!r} has {len(paths)} shards, fewer than world_size x "
                             f"workers = {world_size} x {workers} = {world_size * workers}; "
                             "write more, smaller shards")
        self.pattern = shards
        self.num_workers = num_workers
        self.plan = _Plan(tuple(paths), seed, rank, world_size, workers, resampled, shuffle_buffer,
                          batch_size, tokenize)
        self._batches = 0
        self._cursors = [{"epoch": 0, "offset": 0, "stats": _zero_stats()} for _ in range(workers)]
        self._stats_base = _zero_stats()  # counters carried over a layout change
        self._it: Iterator[dict[str, Any]] | None = None

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        cursor = batch.pop("_cursor")
        expected = self._batches % self.plan.num_workers
        if cursor["worker"] != expected:  # the resume design relies on strict round-robin
            raise RuntimeError(f"batch {self._batches} came from worker {cursor['worker']}, "
                               f"expected {expected}")
        self._cursors[cursor["worker"]] = {k: cursor[k] for k in ("epoch", "offset", "stats")}
        self._batches += 1
        batch["stats"] = self.stats()
        return batch

    def _start(self) -> Iterator[dict[str, Any]]:
        starts = [dict(c) for c in self._cursors]
        rotation = self._batches % self.plan.num_workers
        if self.num_workers == 0:
            return worker_batches(self.plan, 0, starts[0])
        dataset = _WorkerDataset(self.plan, starts, rotation)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                               worker_init_fn=ignore_stop_signals))

    def close(self) -> None:
        """Stop the worker processes (iteration restarts them from the current position)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None

    # -- state ---------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        names = "\n".join(os.path.basename(p) for p in self.plan.shards)  # data may move between runs
        p = self.plan
        return {"shards_sha256": hashlib.sha256(names.encode()).hexdigest(), "n_shards": len(p.shards),
                "seed": p.seed, "rank": p.rank, "world_size": p.world_size, "num_workers": p.num_workers,
                "resampled": p.resampled, "shuffle_buffer": p.shuffle_buffer}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: what the consumer has received so far."""
        return {"version": STATE_VERSION, "layout": self._layout(), "batches": self._batches,
                "workers": [{**c, "stats": dict(c["stats"])} for c in self._cursors],
                "stats_base": dict(self._stats_base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported PromptStream state version {state.get('version')!r}")
        self.close()
        if state["layout"] == self._layout():
            self._batches = int(state["batches"])
            self._cursors = [{"epoch": int(c["epoch"]), "offset": int(c["offset"]), "stats": dict(c["stats"])}
                             for c in state["workers"]]
            self._stats_base = {k: int(state["stats_base"].get(k, 0)) for k in COUNTERS}
            return
        epoch = min(int(c["epoch"]) for c in state["workers"])
        now = self._layout()
        changed = {k: (v, now.get(k)) for k, v in state["layout"].items() if now.get(k) != v}
        warnings.warn(f"prompt stream layout changed since the checkpoint (old, new): {changed}; restarting "
                      f"the new split at the start of epoch {epoch} (order not resumed exactly)", DataWarning,
                      stacklevel=2)
        base = {k: int(state["stats_base"].get(k, 0)) for k in COUNTERS}
        for c in state["workers"]:
            for k in COUNTERS:
                base[k] += int(c["stats"].get(k, 0))
        self._stats_base = base
        self._batches = 0
        self._cursors = [{"epoch": epoch, "offset": 0, "stats": _zero_stats()}
                         for _ in range(self.plan.num_workers)]

    def stats(self) -> dict[str, int]:
        """Counters of this rank (summed over workers); ``epochs`` = epochs all its workers have finished."""
        total = dict(self._stats_base)
        for c in self._cursors:
            for k in COUNTERS:
                total[k] += int(c["stats"].get(k, 0))
        total["epochs"] = min(int(c["epoch"]) for c in self._cursors)
        return total
