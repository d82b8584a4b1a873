"""Resumable batches streamed from webdataset tar shards: the trainer's prompts (``PromptStream``) and,
through the same machinery (``ShardStream`` with another ``SampleFormat``), the real (latent or image,
caption) pairs of the adversarial method (``sidscale.data.real_pairs``).

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

    Batches are formed inside the worker (and tokenised / decoded there: skipped samples never reach the
    tokenizer; a format's per-sample decode runs after the shuffle buffer, so the buffer holds the shard
    bytes, not decoded tensors, and a fast-skip decodes nothing), and the DataLoader hands them out
    round-robin: batch ``i`` of this rank comes from logical worker ``i % W``. Workers never run dry
    (both modes are infinite), so this stays exact.

Resume: a cursor per worker, counted at the consumer
    Every batch carries its worker's cursor ``(epoch, offset)`` = the position just after its last
    sample (offset counts the samples the worker produced in that epoch) plus the worker's counters.
    The main process keeps the cursor of the *last batch it received* from each worker; batches a
    worker prefetched but the trainer never took are not counted. ``state_dict()`` = those cursors +
    the number of batches received ``n``. ``load_state_dict`` restarts each worker at the start of
    its saved epoch and fast-skips ``offset`` samples (read and checked, not decoded, not tokenised, not batched;
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

Bad data is skipped, counted and warned about (``DataWarning`` naming the shard), never fatal
(``sidscale.data.shard_reading``; a format's decode adds its own reasons). The counters reach the trainer in
``batch["stats"]`` and ``stats()``. Only a worker that finds no valid sample in ``MAX_EMPTY_PASSES``
consecutive epochs raises (a hang would be the only alternative).
"""


from __future__ import annotations

import hashlib
import os
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sidscale.data.shard_reading import (
    COUNTERS,
    DataWarning,
    _Counters,
    read_shard,
    resolve_shards,
    seeded_rng,
    shuffled,
    worker_shards,
)
from sidscale.data.shards import MANIFEST_FORMAT

__all__ = ["COUNTERS", "DataWarning", "PromptStream", "ShardStream", "SampleFormat", "first_prompt", "read_shard",
           "resolve_shards", "_Counters"]

STATE_VERSION = 1
MAX_EMPTY_PASSES = 10

Tokenize = Callable[[list[str]], torch.Tensor]


class SampleFormat(Protocol):
    """What a stream reads and how its batches look; picklable (it travels to spawn-started workers)."""

    noun: str  # what a sample is called in messages ("prompt")
    counters: tuple[str, ...]  # the worker counters (``COUNTERS`` plus the format's own skip reasons)
    manifest_format: str  # the manifest.json format a ``shards`` manifest must have

    # one shard's ``(key, payload)`` of the samples that pass the cheap checks (before the shuffle buffer)
    def read(self, path: str, counters: _Counters) -> Iterator[tuple[str, Any]]: ...

    # a payload out of the shuffle buffer -> the sample, or None (skipped; ``decode`` counts why)
    def decode(self, payload: Any, counters: _Counters) -> Any | None: ...

    # the batch fields of ``samples`` (``keys``, ``epoch`` and the cursor are added by the stream)
    def collate(self, samples: list[Any]) -> dict[str, Any]: ...

    def layout(self) -> dict[str, Any]: ...  # what of the format makes a saved cursor meaningless when changed


@dataclass(frozen=True)
class PromptFormat:
    """Prompts (``.txt``), tokenised per batch inside the worker when ``tokenize`` is given."""

    tokenize: Tokenize | None = None
    noun: str = "prompt"
    counters: tuple[str, ...] = COUNTERS
    manifest_format: str = MANIFEST_FORMAT

    def read(self, path: str, counters: _Counters) -> Iterator[tuple[str, str]]:
        return read_shard(path, counters)

    def decode(self, payload: str, counters: _Counters) -> str:
        return payload

    def collate(self, samples: list[str]) -> dict[str, Any]:
        batch: dict[str, Any] = {"prompts": samples}
        if self.tokenize is not None:
            ids = self.tokenize(samples)
            if not isinstance(ids, torch.Tensor) or ids.shape[0] != len(samples):
                raise TypeError(f"tokenize must return a tensor [B, L] with B={len(samples)}, got {type(ids)}")
            batch["input_ids"] = ids.long()
        return batch

    def layout(self) -> dict[str, Any]:
        return {}


def first_sample(paths: Sequence[str], fmt: SampleFormat) -> tuple[Any | None, dict[str, int]]:
    """The first good sample of ``paths`` in order (None: every shard is bad) and the counts of what was
    skipped before it, without warnings (reads only up to that sample)."""
    counters = _Counters({}, fmt.counters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for path in paths:
            for _key, payload in fmt.read(path, counters):
                sample = fmt.decode(payload, counters)
                if sample is not None:
                    return sample, counters.values
    return None, counters.values


def first_prompt(paths: Sequence[str]) -> str | None:
    """The first readable prompt of ``paths`` in order (None: every shard is bad), without warnings."""
    return first_sample(paths, PromptFormat())[0]


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
    fmt: SampleFormat


def worker_batches(plan: _Plan, worker: int, start: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Infinite batches of logical ``worker``, starting at cursor ``start`` = {epoch, offset, stats}."""
    fmt = plan.fmt
    counters = _Counters(start.get("stats", {}), fmt.counters)
    epoch, skip = int(start["epoch"]), int(start["offset"])
    counters.active = skip == 0
    pending: list[tuple[str, Any, int]] = []
    empty_passes = 0
    while True:
        shards = worker_shards(list(plan.shards), seed=plan.seed, epoch=epoch, rank=plan.rank,
                               world_size=plan.world_size, worker=worker, num_workers=plan.num_workers,
                               resampled=plan.resampled)
        items = (s for path in shards for s in fmt.read(path, counters))
        rng = seeded_rng("buffer", plan.seed, epoch, plan.rank, worker)
        offset = good = 0
        for key, payload in shuffled(items, plan.shuffle_buffer, rng):
            offset += 1
            if offset <= skip:  # fast-forward to the saved cursor: no decoding, batching or tokenising
                counters.active = offset == skip
                good += 1  # (was decoded before the checkpoint; only "none at all" matters below)
                continue
            sample = fmt.decode(payload, counters)
            if sample is None:
                continue
            good += 1
            pending.append((key, sample, epoch))
            if len(pending) == plan.batch_size:
                yield _make_batch(plan, pending, counters, worker, epoch, offset)
                pending = []
        counters.active, skip = True, 0  # (the epoch may be shorter than the cursor if data changed)
        empty_passes = 0 if good else empty_passes + 1
        if empty_passes >= MAX_EMPTY_PASSES:
            raise RuntimeError(f"rank {plan.rank} worker {worker}: no valid {fmt.noun} in {empty_passes} "
                               f"consecutive epochs; last shards read: {shards}")
        epoch += 1


def _make_batch(plan: _Plan, samples: list[tuple[str, Any, int]], counters: _Counters, worker: int,
                epoch: int, offset: int) -> dict[str, Any]:
    counters.add("samples", len(samples))
    batch = plan.fmt.collate([s[1] for s in samples])
    batch.update(keys=[s[0] for s in samples], epoch=[s[2] for s in samples])
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


class ShardStream:
    """Infinite, resumable batches ``{<fmt.collate fields>, "keys", "epoch", "stats"}`` of ``fmt`` for one
    rank. ``shards``: brace/glob pattern, manifest.json or its directory (see :func:`resolve_shards`). See
    the module docstring for the order, resume and world-size-change semantics."""

    def __init__(self, shards: str, *, fmt: SampleFormat, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 2, shuffle_buffer: int = 1000, resampled: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"bad batch_size={batch_size} / num_workers={num_workers} / "
                             f"shuffle_buffer={shuffle_buffer}")
        paths = resolve_shards(shards, fmt.manifest_format)
        workers = max(1, num_workers)
        if len(paths) < world_size * workers:
            raise ValueError(f"shard pattern {shards!r} has {len(paths)} shards, fewer than world_size x "
                             f"workers = {world_size} x {workers} = {world_size * workers}; "
                             "write more, smaller shards")
        self.pattern = shards
        self.num_workers = num_workers
        self.plan = _Plan(tuple(paths), seed, rank, world_size, workers, resampled, shuffle_buffer, batch_size, fmt)
        self._batches = 0
        self._cursors = [{"epoch": 0, "offset": 0, "stats": self._zero_stats()} for _ in range(workers)]
        self._stats_base = self._zero_stats()  # counters carried over a layout change
        self._it: Iterator[dict[str, Any]] | None = None

    def _zero_stats(self) -> dict[str, int]:
        return dict.fromkeys(self.plan.fmt.counters, 0)

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> ShardStream:
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
                "resampled": p.resampled, "shuffle_buffer": p.shuffle_buffer, **p.fmt.layout()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: what the consumer has received so far."""
        return {"version": STATE_VERSION, "layout": self._layout(), "batches": self._batches,
                "workers": [{**c, "stats": dict(c["stats"])} for c in self._cursors],
                "stats_base": dict(self._stats_base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported {type(self).__name__} state version {state.get('version')!r}")
        self.close()
        names = self.plan.fmt.counters
        if state["layout"] == self._layout():
            self._batches = int(state["batches"])
            self._cursors = [{"epoch": int(c["epoch"]), "offset": int(c["offset"]), "stats": dict(c["stats"])}
                             for c in state["workers"]]
            self._stats_base = {k: int(state["stats_base"].get(k, 0)) for k in names}
            return
        epoch = min(int(c["epoch"]) for c in state["workers"])
        now = self._layout()
        changed = {k: (v, now.get(k)) for k, v in state["layout"].items() if now.get(k) != v}
        warnings.warn(f"{self.plan.fmt.noun} stream layout changed since the checkpoint (old, new): {changed}; "
                      f"restarting the new split at the start of epoch {epoch} (order not resumed exactly)",
                      DataWarning, stacklevel=2)
        base = {k: int(state["stats_base"].get(k, 0)) for k in names}
        for c in state["workers"]:
            for k in names:
                base[k] += int(c["stats"].get(k, 0))
        self._stats_base = base
        self._batches = 0
        self._cursors = [{"epoch": epoch, "offset": 0, "stats": self._zero_stats()}
                         for _ in range(self.plan.num_workers)]

    def stats(self) -> dict[str, int]:
        """Counters of this rank (summed over workers); ``epochs`` = epochs all its workers have finished."""
        total = dict(self._stats_base)
        for c in self._cursors:
            for k in self.plan.fmt.counters:
                total[k] += int(c["stats"].get(k, 0))
        total["epochs"] = min(int(c["epoch"]) for c in self._cursors)
        return total


class PromptStream(ShardStream):
    """Infinite, resumable batches ``{"prompts", "keys", "epoch", "stats"[, "input_ids"]}`` for one rank.

    ``shards``: brace/glob pattern, manifest.json or its directory (see :func:`resolve_shards`).
    ``tokenize`` runs inside the workers on each batch's prompts. See the module docstring for the
    order, resume and world-size-change semantics.
    """

    def __init__(self, shards: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 2, shuffle_buffer: int = 1000, resampled: bool = True,
                 tokenize: Tokenize | None = None) -> None:
        super().__init__(shards, fmt=PromptFormat(tokenize), rank=rank, world_size=world_size,
                         batch_size=batch_size, seed=seed, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer, resampled=resampled)


class StreamSource:
    """A source whose position is its ``ShardStream``'s (``self.stream``): its counters, cursor and close are the
    stream's (the prompt source and the real-pair source)."""

    stream: Any

    def stats(self) -> dict[str, int]:
        return self.stream.stats()

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()
