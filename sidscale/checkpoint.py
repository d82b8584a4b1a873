"""Checkpoints: layout, the ``latest`` marker, completeness, pruning, offline EMA export.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``:
    generator/, fake/        DeepSpeed engine checkpoints (every rank writes its shards)
    rank_XXXXX.pt            per-rank client state: EMA shard, RNG states, data cursor
    meta.json                written by rank 0 after every rank finished: marks it complete
``RUN/checkpoints/latest`` names the newest complete checkpoint and is written last, atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from sidscale.io_utils import atomic_write_text

log = logging.getLogger(__name__)

META = "meta.json"
LATEST = "latest"
ENGINE_TAGS = ("generator", "fake")


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank_{rank:05d}.pt"


def is_complete(ckpt: Path) -> bool:
    """meta.json present and readable, every rank file and both engine tags present."""
    try:
        meta = json.loads((Path(ckpt) / META).read_text())
        world = int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not all(rank_file(ckpt, r).is_file() and rank_file(ckpt, r).stat().st_size > 0 for r in range(world)):
        return False
    return all((Path(ckpt) / tag).is_dir() and any((Path(ckpt) / tag).iterdir()) for tag in ENGINE_TAGS)


def invalidate(ckpt: Path) -> None:
    """Make ``ckpt`` incomplete before anything in it is overwritten (rank 0, before a re-save):
    meta.json is what vouches for the files, and it is written last by the save."""
    (Path(ckpt) / META).unlink(missing_ok=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by ``latest``; if that is missing or incomplete, the newest complete
    one, with a warning (a run killed mid-save never points ``latest`` at a partial directory)."""
    root = checkpoints_root(run_dir)
    marker = root / LATEST
    if marker.is_file():
        try:  # a torn or garbage marker (non-UTF-8 bytes, unreadable) is just a wrong name
            name = marker.read_text(errors="replace").strip()
        except OSError:
            name = ""
        candidate = root / name
        if name and is_complete(candidate):
            return candidate
        log.warning("checkpoint marker %s names %r, which is missing or incomplete; falling back to the newest "
                    "complete checkpoint", marker, name)
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def mark_latest(run_dir: Path, ckpt: Path) -> None:
    atomic_write_text(checkpoints_root(run_dir) / LATEST, Path(ckpt).name + "\n")


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and partial ones older than them."""
    complete = complete_checkpoints(run_dir)
    keep = set(complete[-keep_last:])
    newest_kept = min(keep) if keep else None
    for p in sorted(checkpoints_root(run_dir).glob("step_*")):
        if p in keep:
            continue
        if p in complete or (newest_kept is not None and p < newest_kept):
            shutil.rmtree(p, ignore_errors=True)


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / META).read_text())


def full_ema_from_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """Reassemble the generator EMA from the per-rank shards, without a process group.

    Each rank file holds its shard of the EMA in the layout of the ZeRO optimizer's fp32 master
    partition, with the segments that map it onto the parameters (``sharded_ema``); ``meta.json``
    names the parameters and their shapes. Older checkpoints (per-parameter slices of the
    working weights) are read too.
    """
    from sidscale.distributed.sharded_ema import STATE_FORMAT, assemble_full

    meta = read_meta(ckpt)
    shards = [torch.load(rank_file(ckpt, r), map_location="cpu", weights_only=False)["ema"]
              for r in range(int(meta["world_size"]))]
    names, shapes = meta["ema_names"], [tuple(s) for s in meta["ema_shapes"]]
    if shards[0].get("format") == STATE_FORMAT:
        return assemble_full(names, shapes, shards, f"checkpoint {ckpt}")
    out: dict[str, torch.Tensor] = {}
    if shards[0]["zero3"]:
        for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
            flat = torch.cat([s["shards"][i] for s in shards])
            out[name] = flat[: int(torch.Size(shape).numel())].view(shape).clone()
        return out
    flat = torch.cat([t for s in shards for t in s["shards"]])
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        n = int(torch.Size(shape).numel())
        out[name] = flat[offset:offset + n].view(shape).clone()
        offset += n
    if offset != flat.numel():
        raise ValueError(f"checkpoint {ckpt}: EMA shards hold {flat.numel()} values, expected {offset}")
    return out
