"""Elastic resume: continue a checkpoint written by N ranks on M ranks (preempted jobs come back
on fewer or more nodes).

What is resharded and how:
- **Weights and Adam states** of both engines: rank 0 converts the checkpoint's ZeRO shards into
  DeepSpeed's *universal* checkpoint format (``deepspeed.checkpoint.ds_to_universal``: one file
  per parameter and state, fp32 master, exp_avg, exp_avg_sq, step), under
  ``RUN/checkpoints/universal/step_XXXXXXXX_wN/``; every rank then loads it with
  ``checkpoint.load_universal`` set in its engines' ds_config, which slices each parameter into
  this world size's ZeRO partition. The original checkpoint is only read: it stays intact and
  verifiable, and the converted copy is removed once every rank has loaded it. ``converted.json``
  binds a copy to its source (the SHA-256 of its meta.json) and records the CRC of each file, so a
  copy left by a killed job is reused only when it verifies (``convert_to_universal``).
- **The generator EMA** (sharded like the fp32 masters, ``sharded_ema``): each rank reads the N rank
  files (memory-mapped: no rank materialises the full EMA) and copies the parts of the old segments
  that fall in its new segments (``ShardedEMA.load_resharded``), checking every element is covered.
- **Step, images seen**: from the checkpoint, unchanged.
- **Per-sample noise**: a pure function of (seed, step, phase, global sample index), and a step covers
  global indices 0..global_batch-1 on any world size, so it continues unchanged.
- **Prompts**: an indexed source (``indexed:toy``) is a pure function of the global index too: exact.
  A webdataset stream splits its shards by rank, so its order cannot continue on another split: the
  new ranks restart their split at the start of the earliest epoch E any old worker had not finished.
  What the old workers read from the start of E is read again: exactly ``replayed_samples`` = C - E*N
  (C: samples they consumed, N: samples per epoch; every epoch before E was read whole). Bound: the
  workers read in lockstep and the slowest is still in E, so C <= K*(E+1)*b (K workers, b the largest
  worker-epoch) and the replay is at most ``rho + E*(rho - 1)`` epochs, rho = b / (N/K) >= 1: at most
  one epoch when the shards split evenly over ranks x workers, growing with E otherwise (11 equal
  shards on 2 ranks: (12 + E)/11 epochs). With ``data.resampled: true`` shards are drawn with
  replacement anyway. Its counters carry over (summed onto rank 0) and a DataWarning says so.
- **Real pairs** (``method.adversarial``; ``RealDataState``, key ``real_data``): the same stream machinery,
  merged the same way (``merged_stream_state``), with the same epoch restart and replay bound.
- **Host RNG states**: rank r takes old rank r mod N's. The method draws no noise from them.

Same global batch (micro-batch x accumulation x ranks), ZeRO stage and precision as the checkpoint;
what cannot work is refused before any model is built (``train.check_resumable``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

from sidscale.checkpointing import files as ckpt_lib
from sidscale.core.io import atomic_write_text

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
DONE = "converted.json"
# How long the other ranks wait for rank 0's conversion (comm.broadcast_object_after_long_work). The
# conversion reads and writes every fp32 master and Adam state once per pass: ~0.3 TB per engine for
# FLUX.1-dev, hours on a slow shared filesystem.
CONVERSION_TIMEOUT_S = 8 * 3600


def universal_dir(ckpt: Path, written_by: int) -> Path:
    """Where the universal copy of ``ckpt`` (written by ``written_by`` ranks) is made. Outside the
    ``step_*`` names: pruning, ``latest`` and the resume candidates never see it."""
    return ckpt_lib.checkpoints_root(Path(ckpt).parent.parent) / UNIVERSAL / f"{Path(ckpt).name}_w{written_by}"


class UniversalConversionError(RuntimeError):
    """The universal copy could not be written (names the directory and, for a full disk, the space needed)."""


def source_identity(ckpt: Path) -> str:
    """SHA-256 of ``ckpt``'s meta.json, which records the CRC of every file of the checkpoint: a copy made
    from another checkpoint of the same step (a rollback, then training to that step again) differs."""
    return hashlib.sha256((Path(ckpt) / ckpt_lib.META).read_bytes()).hexdigest()


def prune_universal(run_dir: Path, keep: Path | None = None) -> None:
    """Rank 0: remove every universal copy (and partial ``.tmp`` one) of the run except ``keep``: copies
    of older checkpoints, of another writer count, or left by a job that continued on the original
    rank count are as large as the optimizer states and never loaded again."""
    root = ckpt_lib.checkpoints_root(run_dir) / UNIVERSAL
    if not root.is_dir():
        return
    for p in root.iterdir():
        if keep is None or p != Path(keep):
            log.info("removing the stale universal copy %s", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty


def usable_copy(out: Path, identity: str) -> str | None:
    """Why the universal copy ``out`` cannot be reused (None: it can): made from another checkpoint,
    or a file missing or changed since it was written."""
    try:
        done = json.loads((out / DONE).read_text())
    except (OSError, ValueError):
        return f"{out / DONE} is missing or unreadable"
    if done.get("source_meta_sha256") != identity:
        return "it was made from another checkpoint of that step (or by an older sidscale)"
    problems = ckpt_lib.check_recorded(out, done.get("files") or {}, sorted(done.get("files") or {}))
    return "; ".join(problems) or None


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def convert_to_universal(ckpt: Path, workers: int | None = None) -> Path:
    """Rank 0: both engines of ``ckpt`` in DeepSpeed's universal format. Written into a temporary
    directory, checksummed and bound to ``ckpt`` (the SHA-256 of its meta.json) in ``converted.json``,
    renamed when complete. A copy left by an earlier attempt is reused only when it was made from this
    very checkpoint and every file verifies; otherwise it is rebuilt. Every other copy is removed."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ckpt = Path(ckpt)
    meta = ckpt_lib.read_meta(ckpt)
    out = universal_dir(ckpt, int(meta["world_size"]))
    identity = source_identity(ckpt)
    prune_universal(ckpt.parent.parent, keep=out)
    if out.exists():
        why = usable_copy(out, identity)
        if why is None:
            log.info("reusing the universal copy %s (made from this checkpoint, verified)", out)
            return out
        log.warning("not reusing the universal copy %s: %s; converting again", out, why)
        shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # NOTE: one worker, in this process. With more, DeepSpeed's converter forks a process pool, and
    # forking a rank that holds CUDA / NCCL / OpenMP threads can deadlock the children (seen here: with
    # 2 workers, even from a fresh interpreter, the pool's children hung idle after the fork). Slower
    # for 8B+ models, never hung; pass ``workers`` only from a process that is safe to fork.
    workers = workers or 1
    t0 = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        for tag in ckpt_lib.ENGINE_TAGS:
            args = argparse.Namespace(input_folder=str(ckpt / tag), output_folder=str(tmp / tag),
                                      num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                                      keep_temp_folder=False, strict=True,
                                      # sidscale's engines record no UNIVERSAL_CHECKPOINT_INFO: no tensor or
                                      # pipeline parallelism, so the default (plain data-parallel) is right
                                      inject_missing_state=True)
            # its prints and per-pass progress bars (errors still raise; the time is logged below)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal(args)
        (tmp / "latest_universal").unlink(missing_ok=True)  # the converter's own marker: unused here
        files = {f: ckpt_lib.file_checksum(tmp / f) for f in ckpt_lib.checkpoint_files(tmp)}
        atomic_write_text(tmp / DONE, json.dumps({"source": str(ckpt), "world_size": meta["world_size"],
                                                  "source_meta_sha256": identity, "files": files,
                                                  "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
    except Exception as e:
        raise _conversion_failed(e, ckpt, tmp) from e
    os.replace(tmp, out)
    log.info("converted %s (%s ranks) to the universal format in %.1f s", ckpt, meta["world_size"],
             time.perf_counter() - t0)
    return out


def _conversion_failed(e: Exception, ckpt: Path, tmp: Path) -> UniversalConversionError:
    """Remove the partial copy (it would keep a full disk full for the retry) and say where space ran out."""
    written = _tree_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    where = tmp.parent
    # the copy holds fp32 masters and both Adam moments of both engines: about the size of their ZeRO states
    needed = sum(_tree_bytes(Path(ckpt) / tag) for tag in ckpt_lib.ENGINE_TAGS)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    # NOTE: torch.save reports a failed write (ENOSPC, EDQUOT) as a RuntimeError ("unexpected pos ..."), not an OSError
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in str(e) \
        or 0 <= free < needed
    reason = f"{type(e).__name__}: {str(e).strip()[:300]}"
    space = (f"the copy needs about {needed / 2**20:.0f} MiB in {where}, which has {free / 2**20:.0f} MiB free "
             f"(after removing the partial copy of {written / 2**20:.0f} MiB)")
    if full:
        return UniversalConversionError(f"the disk holding {where} is full ({reason}): {space}; free space there")
    return UniversalConversionError(f"writing the universal copy into {where} failed ({reason}); {space}")


def writer_count(ckpt: Path, world_size: int) -> int:
    """Rank 0: how many ranks wrote ``ckpt``. When this job has that many, no universal copy is needed
    and any left by an earlier elastic resume is removed."""
    written_by = int(ckpt_lib.read_meta(ckpt)["world_size"])
    if written_by == world_size:
        prune_universal(Path(ckpt).parent.parent)
    return written_by


def remove_universal(ckpt: Path, written_by: int) -> None:
    """Drop the converted copy once every rank has loaded it (it is as large as the optimizer states)."""
    out = universal_dir(ckpt, written_by)
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.suppress(OSError):
        out.parent.rmdir()  # only when empty


def merged_stream_state(states: list[dict], rank: int) -> dict:
    """The stream state (prompts or real pairs) rank ``rank`` of the new world loads: every old rank's worker cursors
    (so the restart epoch is the earliest any old rank had not finished; ``PromptStream``'s layout
    change path) with the old counters summed onto new rank 0 only, so the job's totals carry over."""
    if not states or not all(s for s in states):  # an indexed source keeps no state
        return {}
    zero = {k: 0 for k in states[0]["stats_base"]}
    base = dict(zero)
    workers = []
    for s in states:
        for k, v in s["stats_base"].items():
            base[k] = base.get(k, 0) + int(v)
        for c in s["workers"]:
            workers.append({**c, "stats": dict(c["stats"]) if rank == 0 else {k: 0 for k in c["stats"]}})
    return {"version": states[0]["version"], "layout": dict(states[0]["layout"], world_size=-1), "batches": 0,
            "workers": workers, "stats_base": base if rank == 0 else zero}


def replayed_samples(states: list[dict], samples_per_epoch: int) -> int:
    """How many samples an elastic restart of epoch-mode stream ``states`` (every old rank's) reads
    again: C - E*N (module docstring), C the samples the old workers consumed in their layout."""
    workers = [c for s in states for c in s["workers"]]
    restart_epoch = min(int(c["epoch"]) for c in workers)
    return sum(int(c["stats"]["samples"]) for c in workers) - restart_epoch * samples_per_epoch
