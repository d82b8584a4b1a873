"""Collective checkpointing: prepare the run directory, check / verify / choose the checkpoint to resume
from, elastic resharding, and the ``Checkpointer`` that saves and resumes a registry of stateful pieces
(``checkpointing/states.py``). The files themselves: ``checkpointing/files.py``.

Every decision about the filesystem is rank 0's, broadcast (``comm.decide_on_rank0``): on NFS / Lustre
with client caching the ranks may see different states of a directory, and ranks that disagree would
split around the collectives and hang.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sidscale.checkpointing import files as ckpt_lib
from sidscale.checkpointing.states import CounterState, EngineState, RankState
from sidscale.config import Config, ConfigError
from sidscale.core.io import atomic_torch_save
from sidscale.distributed import comm
from sidscale.distributed.ds_config import build_ds_config, zero_stage
from sidscale.distributed.engines import apply_configured_lr
from sidscale.errors import CheckpointSaveError, RunDirError
from sidscale.run_lock import RunLock
from sidscale.testing import fault_injection

log = logging.getLogger("sidscale.train")


def prepare_run_dir(run_dir: Path, resume: bool, lock: RunLock | None = None) -> bool:
    """Create/check the run directory and take its lock (rank 0). Returns True when there is a run
    to resume. Writes nothing else: ``config.yaml`` is written once the run has started, so a start
    that fails (missing teacher, bad checkpoint) leaves the directory as it found it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir}: not writable ({e.strerror})") from e
    if lock is not None:
        lock.acquire()
    try:
        ckpt_lib.check_latest_marker(run_dir)
        ckpt_lib.recover_restored(run_dir)  # restored files make a set-aside checkpoint usable again
        has_checkpoint = ckpt_lib.find_resume_checkpoint(run_dir) is not None
        ckpt_lib.refuse_start_over(run_dir, has_checkpoint)
    except ckpt_lib.CheckpointError as e:
        raise RunDirError(str(e)) from None
    if not resume and (has_checkpoint or (run_dir / "config.yaml").exists()):
        raise RunDirError(f"--run-dir {run_dir} already holds a run and resume=false: refusing to overwrite it; "
                          "choose a new --run-dir or drop --set resume=false to continue it")
    return has_checkpoint


def check_resumable(run_dir: Path, cfg: Config, world_size: int) -> None:
    """Stage, precision and global batch of the newest checkpoint against this run (rank 0, before any
    model is built): one clear message instead of an error deep inside DeepSpeed's loader. Another
    number of ranks is resumed elastically (``checkpointing.elastic``); that the global batch divides
    into this world's ranks was checked by ``validate``."""
    ckpt = ckpt_lib.find_resume_checkpoint(run_dir)
    meta = ckpt_lib.read_meta(ckpt)
    stage = zero_stage(build_ds_config(cfg, world_size))
    saved = meta.get("config", {})
    problems = []
    written_by = int(meta["world_size"])
    saved_batch = saved.get("train", {}).get("global_batch")
    if written_by != world_size and saved_batch is not None and saved_batch != cfg.train.global_batch:
        problems.append(f"it was written by {written_by} ranks with train.global_batch={saved_batch}; resuming on "
                        f"{world_size} ranks keeps the global batch (set train.global_batch={saved_batch}; "
                        "micro_batch x accumulation adapts to the ranks)")
    if "zero_stage" in meta and int(meta["zero_stage"]) != stage:
        problems.append(f"it was written with ZeRO stage {meta['zero_stage']}, deepspeed.config "
                        f"{cfg.deepspeed.config} is stage {stage}")
    precision = saved.get("train", {}).get("precision")
    if precision is not None and precision != cfg.train.precision:
        problems.append(f"it was trained with train.precision={precision}, this job asks for {cfg.train.precision}")
    if problems:
        raise ConfigError(f"cannot resume from {ckpt}: " + "; ".join(problems) + ". Use the run's own settings "
                          f"({run_dir / 'config.yaml'}) or start a new --run-dir")


def choose_resume_checkpoint(run_dir: Path, rank: int, world_size: int) -> Path:
    """The newest checkpoint whose files every rank finds intact (a collective).

    Each rank re-checksums its share of the files (``files.verify_share``); the ranks agree on the
    result before anything is loaded, so a damaged file makes every rank skip to the previous
    complete checkpoint together (warning naming the file) instead of one rank failing in the load
    while the others wait in its collectives."""
    candidates = comm.decide_on_rank0(ckpt_lib.resume_candidates, run_dir)
    reports = []
    for ckpt in candidates:
        problems = [p for share in comm.all_gather_object(ckpt_lib.verify_share(ckpt, rank, world_size))
                    for p in share]
        if not problems:
            return ckpt
        reports.append(f"{ckpt.name}: " + "; ".join(problems))
        if rank == 0:
            log.warning("checkpoint %s is damaged, skipping it: %s", ckpt, "; ".join(problems))
            print(f"sidscale: warning: checkpoint {ckpt} is damaged ({'; '.join(problems)}); trying the previous "
                  f"complete checkpoint (its meta.json is kept as {ckpt_lib.DAMAGED_META})", file=sys.stderr,
                  flush=True)
            ckpt_lib.set_aside_damaged(ckpt, problems)
        comm.barrier()  # nobody looks at the next candidate before rank 0 has set this one aside
    raise ConfigError(f"--run-dir {run_dir}: no usable checkpoint to resume from: " + " | ".join(reports)
                      + ". Restore the files, or start a new --run-dir")


def checkpoint_complete(run_dir: Path, step: int) -> bool:
    """Whether step ``step`` has a complete checkpoint, as rank 0 sees it, on every rank (a collective)."""
    return comm.decide_on_rank0(ckpt_lib.is_complete, ckpt_lib.step_dir(run_dir, step))


def repair_latest(run_dir: Path, step: int) -> None:
    """Rank 0, at the end of a run whose last step has a complete checkpoint: a kill between that
    checkpoint's meta.json and ``latest`` left the marker one checkpoint behind."""
    final = ckpt_lib.step_dir(run_dir, step)
    if ckpt_lib.latest_marked(run_dir) != final:
        ckpt_lib.mark_latest(run_dir, final)


def prepare_elastic_resume(path: Path, world_size: int) -> tuple[int, Path | None]:
    """(ranks that wrote ``path``, its universal copy or None when it is this job's world size).
    A collective: rank 0 converts (``checkpointing.elastic``) while the others wait (up to
    ``elastic.CONVERSION_TIMEOUT_S``); a failed conversion is one error on every rank, never a hang."""
    from sidscale.checkpointing import elastic

    written_by = comm.decide_on_rank0(elastic.writer_count, path, world_size)  # prunes stale universal copies
    if written_by == world_size:
        return written_by, None

    def convert() -> tuple[Path | None, str | None]:
        print(f"sidscale: elastic resume: {path} was written by {written_by} ranks, this job has {world_size}; "
              "converting its ZeRO states to DeepSpeed's universal format (the checkpoint stays as it is)",
              flush=True)
        try:
            return elastic.convert_to_universal(path), None
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            log.exception("universal conversion of %s failed", path)
            return None, (f"converting {path} (written by {written_by} ranks) for {world_size} ranks failed: "
                          f"{type(e).__name__}: {e}")

    # NOTE: the conversion of an 8B+ model's optimizer states can take longer than dist.timeout_s; the
    # other ranks wait on a gloo group of its own, so no NCCL collective is pending meanwhile.
    out, error = comm.broadcast_object_after_long_work(convert, elastic.CONVERSION_TIMEOUT_S,
                                                       what="converting the checkpoint for elastic resume")
    if error:
        raise ConfigError(error + ". Resume it with the number of ranks that wrote it")
    return written_by, out


class Checkpointer:
    """Saves and resumes every registered piece of a run, on every rank together.

    ``engines``: tag -> ``EngineState`` (DeepSpeed engines, each in its directory ``<tag>/``);
    ``states``: the rest, each owning keys of the per-rank file (``RankState``), saved and loaded in
    this order. ``run_meta``: meta.json keys of the run as a whole (world size, ZeRO stage, config)."""

    def __init__(self, run_dir: Path, rank: int, world: int, is_main: bool, engines: Mapping[str, EngineState],
                 states: Mapping[str, RankState], run_meta: Callable[[], dict], keep_last: int,
                 step: Callable[[], int]) -> None:
        self.run_dir, self.rank, self.world, self.is_main = Path(run_dir), rank, world, is_main
        self.engines, self.states, self.run_meta = dict(engines), dict(states), run_meta
        self.keep_last, self.step = keep_last, step

    def save(self) -> Path:
        """Save on every rank; on an I/O error (disk full, quota) stop with a clear message. The
        failed directory is never marked ``latest``, so the previous checkpoint stays the resume point."""
        path = ckpt_lib.step_dir(self.run_dir, self.step())
        try:
            return self._save(path)
        except (OSError, RuntimeError) as e:
            # NOTE: torch.save (DeepSpeed's engine shards) reports a failed write (ENOSPC, EDQUOT, EIO)
            # as a RuntimeError from its zip writer ("unexpected pos ..."), not as an OSError.
            reason = getattr(e, "strerror", None) or str(e).strip()
            with contextlib.suppress(OSError):
                reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on the checkpoint disk)"
            previous = ckpt_lib.find_resume_checkpoint(self.run_dir)
            raise CheckpointSaveError(
                f"saving checkpoint {path} failed on rank {self.rank}: {reason}; the previous complete "
                f"checkpoint ({previous or 'none'}) is intact and remains the resume point") from e

    def _client_state(self) -> dict:
        out: dict[str, Any] = {}
        for piece in self.states.values():
            out.update(piece.save())
        return out

    def _save(self, path: Path) -> Path:
        step = self.step()
        # A re-save into an existing step directory (a resumed run saving the step it resumed
        # from, a stop right after a periodic save) overwrites files that an old meta.json vouches
        # for: remove it first, on rank 0 before any rank writes, so a re-save that dies half-way
        # leaves an incomplete directory, never a complete-looking mix of old and new shards.
        if self.is_main:
            ckpt_lib.prepare_save_dir(path)  # invalidated, or moved aside when damaged
        comm.barrier()
        # the engines' own client state: the step counters (what DeepSpeed's loader hands back)
        client: dict[str, Any] = {}
        for piece in self.states.values():
            if isinstance(piece, CounterState):
                client.update(piece.save())
        # Every rank saves its engine shards, then its own client state, atomically.
        for tag, entry in self.engines.items():
            entry.engine.save_checkpoint(str(path), tag=tag, client_state=client, save_latest=False)
        atomic_torch_save(ckpt_lib.rank_file(path, self.rank), self._client_state())
        fault_injection.maybe_fail("in_save", step, self.rank)
        comm.barrier()
        # Every rank checksums the files it wrote, while they are still in the page cache: meta.json
        # records them, and a resume verifies them before loading (module docstring of files.py).
        files: dict[str, dict] = {}
        for share in comm.all_gather_object(ckpt_lib.own_checksums(path, self.rank, self.world)):
            files.update(share)

        def finish() -> None:  # rank 0; pruning old checkpoints can take minutes on a parallel filesystem
            meta: dict[str, Any] = {}
            for piece in self.states.values():
                meta.update(piece.meta())
            ckpt_lib.write_meta(path, {**meta, **self.run_meta(), "files": files})
            ckpt_lib.mark_latest(self.run_dir, path)
            fault_injection.maybe_fail("prune", step, self.rank)
            ckpt_lib.prune_checkpoints(self.run_dir, self.keep_last)

        comm.broadcast_object_after_long_work(finish, what=f"completing checkpoint {path.name} and pruning old ones")
        return path

    def resume(self, path: Path, universal: Path | None = None) -> None:
        """Load checkpoint ``path``; ``universal``: its universal copy when it was written by another
        number of ranks (``prepare_elastic_resume``; the engines were built with ``load_universal``)."""
        meta = ckpt_lib.read_meta(path)
        written_by = int(meta["world_size"])
        if (written_by != self.world) != (universal is not None):
            raise RuntimeError(f"checkpoint {path} was written by {written_by} ranks, this run has {self.world}: "
                               "load it through prepare_elastic_resume")
        for tag, entry in self.engines.items():
            load_path, _ = entry.engine.load_checkpoint(str(universal or path), tag=tag)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {(universal or path) / tag}")
            apply_configured_lr(entry.engine, entry.lr, entry.lr_key, self.is_main)
        if universal is None:
            state = torch.load(ckpt_lib.rank_file(path, self.rank), map_location="cpu", weights_only=False)
            for piece in self.states.values():
                piece.load(state, path)
            return
        # memory-mapped: each rank copies only the overlap of the old shards with its own partition
        states = [torch.load(ckpt_lib.rank_file(path, r), map_location="cpu", weights_only=False, mmap=True)
                  for r in range(written_by)]
        for piece in self.states.values():
            piece.load_resharded(states, meta, path, self.rank, self.is_main)
