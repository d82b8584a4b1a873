"""Checkpoints: layout, the ``latest`` marker, completeness, pruning, offline EMA export.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``:
    generator/, fake/        DeepSpeed engine checkpoints (every rank writes its shards)
    rank_XXXXX.pt            per-rank client state: EMA shard, RNG states, data cursor
    meta.json                written by rank 0 after every rank finished: marks it complete, and
                             records the size and CRC-32 of every file of the checkpoint
``RUN/checkpoints/latest`` names the newest complete checkpoint and is written last, atomically;
it holds a step directory name of this run only (``step_XXXXXXXX``), never a path.
``meta.damaged.json`` replaces meta.json of a checkpoint found damaged (``set_aside_damaged``);
``meta.restored.json`` keeps that record once the files verify again (``recover_restored``);
``step_XXXXXXXX.damaged[.N]/`` is a damaged step directory moved aside before a re-save
(``prepare_save_dir``).

Verification: at save, each rank checksums the files it wrote (its ZeRO shards and its rank file;
rank 0 also the shared ones) and rank 0 records them in meta.json. At resume, each rank checks its
share of the files again before anything is loaded, the ranks agree collectively, and a damaged
checkpoint (a file missing, truncated or silently changed) is skipped for the previous complete one
with a warning naming the file; with none left, a clear error. No rank loads a damaged file while
the others wait for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import torch

from sidscale.core.io import atomic_write_text
from sidscale.errors import CheckpointError

log = logging.getLogger("sidscale.checkpoint")  # the name users and their log filters know

META = "meta.json"
DAMAGED_META = "meta.damaged.json"
# the damage record of a checkpoint whose files were restored and verified again (recover_restored)
RESTORED_META = "meta.restored.json"
# meta.json's own CRC-32 (of its other keys): a hand-edited world_size / zero_stage makes the
# checkpoint incomplete (a fallback), never a resume that fails the same way on every retry
META_CRC = "meta_crc32"
LATEST = "latest"
ENGINE_TAGS = ("generator", "fake")
STEP_NAME = re.compile(r"step_(\d{8})")
# DeepSpeed names each rank's ZeRO shards "[bf16_]zero_pp_rank_<dp rank>_mp_rank_00_..."
SHARD_OWNER = re.compile(r"zero_pp_rank_(\d+)_")
RANK_FILE = re.compile(r"rank_(\d{5})\.pt")
CHUNK = 16 << 20


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank_{rank:05d}.pt"


def _meta_crc(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != META_CRC}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def write_meta(ckpt: Path, meta: dict) -> None:
    """Write ``ckpt``'s meta.json (last, atomically: it marks the checkpoint complete) with its own CRC."""
    from sidscale.core.io import atomic_write_json

    atomic_write_json(Path(ckpt) / META, {**meta, META_CRC: _meta_crc(meta)})


def is_complete(ckpt: Path) -> bool:
    """meta.json present, readable and unedited (its CRC, when recorded), every rank file and both
    engine tags present."""
    try:
        meta = json.loads((Path(ckpt) / META).read_text())
        world = int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if META_CRC in meta and meta[META_CRC] != _meta_crc(meta):
        log.warning("%s was changed after the save (its recorded CRC differs): not trusted, the checkpoint "
                    "counts as incomplete", Path(ckpt) / META)
        return False
    if not all(rank_file(ckpt, r).is_file() and rank_file(ckpt, r).stat().st_size > 0 for r in range(world)):
        return False
    return all((Path(ckpt) / tag).is_dir() and any((Path(ckpt) / tag).iterdir()) for tag in ENGINE_TAGS)


def invalidate(ckpt: Path) -> None:
    """Make ``ckpt`` incomplete before anything in it is overwritten (rank 0, before a re-save):
    meta.json is what vouches for the files, and it is written last by the save."""
    (Path(ckpt) / META).unlink(missing_ok=True)
    (Path(ckpt) / DAMAGED_META).unlink(missing_ok=True)  # a set-aside copy: the files are being replaced


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def step_of(ckpt: Path) -> int:
    m = STEP_NAME.fullmatch(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt}: not a checkpoint step directory (expected step_XXXXXXXX)")
    return int(m.group(1))


def check_latest_marker(run_dir: Path) -> None:
    """``latest`` is absent or a regular file (a directory there would break every later save)."""
    marker = checkpoints_root(run_dir) / LATEST
    if marker.is_symlink() or (marker.exists() and not marker.is_file()):
        raise CheckpointError(f"{marker} is not a regular file (a directory or a link): it must hold the name of a "
                              "step directory of this run; remove it (the newest complete checkpoint is then used)")


def latest_marked(run_dir: Path) -> Path | None:
    """The step directory ``latest`` names, if it is a valid name of THIS run's checkpoints."""
    root = checkpoints_root(run_dir)
    marker = root / LATEST
    if not marker.is_file() or marker.is_symlink():
        return None
    try:  # a torn or garbage marker (non-UTF-8 bytes, unreadable) is just a wrong name
        name = marker.read_text(errors="replace").strip()
    except OSError:
        name = ""
    if not STEP_NAME.fullmatch(name):  # an absolute path, another run's directory, "..": not followed
        log.warning("checkpoint marker %s holds %r, not a step directory name of this run; falling back to the "
                    "newest complete checkpoint", marker, name[:200])
        return None
    return root / name


def resume_candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints to resume from, best first: the newer of ``latest`` and the newest
    complete one (a kill between a final ``meta.json`` and ``latest`` leaves the newer one
    complete), then every older complete one (the fallbacks when a file turns out damaged)."""
    complete = complete_checkpoints(run_dir)
    marked = latest_marked(run_dir)
    if marked is not None and not is_complete(marked):
        log.warning("checkpoint marker names %s, which is missing or incomplete; falling back to the newest "
                    "complete checkpoint", marked)
    elif marked is not None and complete and complete[-1] != marked:
        log.warning("checkpoint marker names %s but %s is complete and newer (killed before the marker was "
                    "updated?); resuming from the newer one", marked.name, complete[-1].name)
    return complete[::-1]


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The best resume candidate (no verification of the file contents: ``choose_resume_checkpoint``)."""
    candidates = resume_candidates(run_dir)
    return candidates[0] if candidates else None


def mark_latest(run_dir: Path, ckpt: Path) -> None:
    """Point ``latest`` at ``ckpt``, a step directory of this run at or after the current one."""
    root = checkpoints_root(run_dir)
    if Path(ckpt).parent.resolve() != root.resolve():
        raise ValueError(f"mark_latest: {ckpt} is not a checkpoint of run {run_dir}")
    step = step_of(ckpt)
    current = latest_marked(run_dir)
    if current is not None and is_complete(current) and step_of(current) > step:
        raise ValueError(f"mark_latest: {root / LATEST} names {current.name}, newer than {Path(ckpt).name}")
    check_latest_marker(run_dir)
    atomic_write_text(root / LATEST, Path(ckpt).name + "\n")


def past_checkpoints(run_dir: Path) -> list[Path]:
    """Step directories that were complete checkpoints once: meta.json (maybe edited, maybe with
    missing files) or a set-aside ``meta.damaged.json``. A run holding any of them is never started
    over silently (``train.prepare_run_dir``)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if STEP_NAME.fullmatch(p.name) and p.is_dir()
                  and ((p / META).exists() or (p / DAMAGED_META).exists()))


def refuse_start_over(run_dir: Path, has_checkpoint: bool) -> None:
    """A run directory whose checkpoints are all damaged or incomplete is never trained over from
    step 0 (that would overwrite the files a user can still restore)."""
    past = past_checkpoints(run_dir)
    if not has_checkpoint and past:
        raise CheckpointError(
            f"--run-dir {run_dir} holds checkpoints but none is usable ({', '.join(p.name for p in past)}: damaged "
            f"or incomplete; see their {DAMAGED_META}). Restore their files (the next start verifies them again "
            f"and resumes), or move {checkpoints_root(run_dir)} away to start over from step 0")


def recover_restored(run_dir: Path) -> list[Path]:
    """Rank 0, at start: a set-aside checkpoint (``meta.damaged.json``) newer than every complete
    one whose recorded files all verify again (the user restored the good bytes) is complete again:
    its meta.json comes back and the damage record is kept as ``meta.restored.json``. Files are
    stat'ed first; only candidates with every recorded size right are checksummed. Returns them."""
    complete = complete_checkpoints(run_dir)
    newest = complete[-1].name if complete else ""
    recovered = []
    for ckpt in past_checkpoints(run_dir):
        if ckpt.name <= newest or (ckpt / META).exists():
            continue
        try:
            meta = json.loads((ckpt / DAMAGED_META).read_text())
        except (OSError, ValueError):
            continue
        record = meta.pop("damaged", None)
        recorded = meta.get("files")
        if not recorded or not all((ckpt / f).is_file() and (ckpt / f).stat().st_size == c["size"]
                                   for f, c in recorded.items()):
            continue
        if check_recorded(ckpt, recorded, sorted(recorded)):
            continue
        atomic_write_text(ckpt / RESTORED_META, json.dumps({"damaged": record}, indent=1) + "\n")
        atomic_write_text(ckpt / META, json.dumps(meta, indent=1) + "\n")
        (ckpt / DAMAGED_META).unlink()
        log.warning("checkpoint %s was set aside as damaged; its files verify again (restored?): it is a resume "
                    "candidate again (the old damage record is %s)", ckpt, ckpt / RESTORED_META)
        recovered.append(ckpt)
    return recovered


def prepare_save_dir(ckpt: Path) -> Path | None:
    """Rank 0, before any rank writes step directory ``ckpt``: a complete one is invalidated
    (``invalidate``); one that was a checkpoint once but is damaged or incomplete (a file replaced by
    a directory makes every re-save fail) is moved aside to ``step_XXXXXXXX.damaged[.N]`` (pruned like
    the checkpoints before it) and returned; a partial save that never completed is removed."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        return None
    if is_complete(ckpt):
        invalidate(ckpt)
        return None
    if not ((ckpt / META).exists() or (ckpt / DAMAGED_META).exists()):
        shutil.rmtree(ckpt)
        return None
    aside, n = ckpt.with_name(ckpt.name + ".damaged"), 0
    while aside.exists():
        n += 1
        aside = ckpt.with_name(f"{ckpt.name}.damaged.{n}")
    os.replace(ckpt, aside)
    log.warning("checkpoint directory %s was damaged or incomplete: moved aside to %s before saving that step "
                "again", ckpt, aside)
    return aside


def set_aside_damaged(ckpt: Path, problems: list[str]) -> None:
    """Make a damaged checkpoint incomplete without deleting anything: ``meta.json`` becomes
    ``meta.damaged.json`` (plus the problems found), so no later resume or ``latest`` trusts it and
    its files stay for inspection until a re-save of that step or pruning replaces them."""
    ckpt = Path(ckpt)
    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError):
        meta = {}
    atomic_write_text(ckpt / DAMAGED_META, json.dumps({**meta, "damaged": problems}, indent=1) + "\n")
    (ckpt / META).unlink(missing_ok=True)


# --------------------------------------------------------------------------------- verification
def _chunk_crc(path: Path, offset: int) -> tuple[int, str]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(CHUNK)
    return len(data), f"{zlib.crc32(data):08x}"


def file_checksum(path: Path, threads: int | None = None) -> dict:
    """``{"size", "chunk", "crc32": [one per 16 MiB chunk]}`` of a file. Chunks are hashed on a
    thread pool (zlib releases the GIL), so the pass scales with the cores of the node. Measured on
    this 2-core CPU for a 512 MiB file: 0.41x the time of its ``torch.save`` (into the page cache,
    the cheapest save there is) on one thread, 0.18x on two. CRC-32 catches any truncation and a
    random change with probability 1 - 2^-32."""
    from concurrent.futures import ThreadPoolExecutor

    size = Path(path).stat().st_size
    offsets = range(0, max(size, 1), CHUNK)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(lambda o: _chunk_crc(path, o), offsets))
    return {"size": sum(n for n, _ in parts), "chunk": CHUNK, "crc32": [c for _, c in parts]}


def file_owner(relpath: str) -> int | None:
    """The rank that wrote (and reads) a checkpoint file; None for shared files (rank 0 checks them)."""
    name = Path(relpath).name
    for pattern in (SHARD_OWNER, RANK_FILE):
        m = pattern.search(name) if pattern is SHARD_OWNER else pattern.fullmatch(name)
        if m:
            return int(m.group(1))
    return None


def checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint except meta.json, as paths relative to it."""
    ckpt = Path(ckpt)
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                  if p.is_file() and p.name not in (META, DAMAGED_META, RESTORED_META))


def files_to_check(files: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share: the files whose writer maps to it (owner % world), shared files on rank 0."""
    return [f for f in files if ((file_owner(f) or 0) % world_size) == rank]


def own_checksums(ckpt: Path, rank: int, world_size: int) -> dict[str, dict]:
    """Checksums of this rank's share of the files just written (called on every rank after a save)."""
    return {f: file_checksum(Path(ckpt) / f) for f in files_to_check(checkpoint_files(ckpt), rank, world_size)}


def verify_share(ckpt: Path, rank: int, world_size: int) -> list[str]:
    """Problems with this rank's share of ``ckpt``'s recorded files (empty: all good, or nothing
    recorded: a checkpoint written before checksums existed)."""
    try:
        recorded = read_meta(ckpt).get("files")
    except (OSError, ValueError) as e:
        return [f"{Path(ckpt) / META}: unreadable ({e})"]
    if not recorded:
        return []
    return check_recorded(ckpt, recorded, files_to_check(sorted(recorded), rank, world_size))


def check_recorded(root: Path, recorded: dict[str, dict], files: list[str]) -> list[str]:
    """Problems of ``files`` (paths relative to ``root``) against their ``recorded`` checksums."""
    problems = []
    for rel in files:
        path = Path(root) / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        want = recorded[rel]
        got = file_checksum(path)
        if got["size"] != want["size"]:
            problems.append(f"{path}: {got['size']} bytes, {want['size']} recorded (truncated?)")
        elif got["crc32"] != want["crc32"]:
            bad = next(i for i, (a, b) in enumerate(zip(got["crc32"], want["crc32"], strict=True)) if a != b)
            problems.append(f"{path}: checksum of bytes {bad * CHUNK}..{(bad + 1) * CHUNK} differs from the "
                            "recorded one (corrupted)")
    return problems


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
    # every reader verifies what it reads (an export of a flipped rank file had wrong weights, exit 0)
    recorded = meta.get("files") or {}
    problems = check_recorded(ckpt, recorded, [f for f in sorted(recorded) if RANK_FILE.fullmatch(f)])
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: " + "; ".join(problems) + ". Restore the files, or "
                              "use another checkpoint of the run")
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
