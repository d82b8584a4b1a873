"""Prompt shards: read prompt files, filter them, write webdataset tars plus a manifest.

Layout of an output directory::

    prompts-000000.tar   one member per prompt: ``<%09d global index>.txt`` (UTF-8)
    prompts-000001.tar   ...
    manifest.json        shard list with counts, total, content hash, settings, drop counts

The manifest is written last: its presence means every shard it lists is complete. Every file is
written atomically (temp file + fsync + ``os.replace``), so a crash never leaves a half-written
shard under its final name. Shards are byte-reproducible (fixed mtime/owner), so the same input
and settings give identical files.

Prompts are whitespace-stripped before filtering; ``min_chars``/``max_chars`` count characters of
the stripped text. The content hash is sha256 over the kept prompts in order, each encoded as
UTF-8 and prefixed by its byte length as 8 little-endian bytes (unambiguous even with newlines
inside prompts).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from sidscale.core.io import atomic_write_bytes, fsync_dir

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sidscale-prompt-shards/1"
REAL_MANIFEST_FORMAT = "sidscale-real-shards/1"  # real (latent or image, caption) pairs: sidscale.data.real_shards
# What each manifest format is called in messages, and the tool that writes it.
_MANIFEST_KINDS = {MANIFEST_FORMAT: ("prompt shard", "tools/make_prompt_shards.py"),
                   REAL_MANIFEST_FORMAT: ("real-pair shard", "tools/make_real_shards.py")}
SHARD_TEMPLATE = "prompts-{:06d}.tar"
KEY_TEMPLATE = "{:09d}"
# Why each input item may be dropped; all keys always appear in the manifest (zeros included).
DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "undecodable", "malformed")


@dataclass(frozen=True)
class Dropped:
    """A source item that could not become a prompt (e.g. a JSON line without the field).

    Readers yield these instead of raising, so the writer counts them in the manifest.
    """

    reason: str


PromptItem = str | bytes | Dropped  # bytes are decoded (strict UTF-8) by the writer


def content_hash_update(h: Any, prompt: str) -> None:
    """Feed one prompt into a content hash (see module docstring for the exact encoding)."""
    data = prompt.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


# ----------------------------------------------------------------------------------------------
# Atomic file writes


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain (uncompressed) tar with the given (name, data) members, reproducible byte for byte."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # reproducible output: no wall-clock time in the shard
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Reading prompt files


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _base_suffix(path: Path) -> str:
    """The format suffix, looking through a trailing ``.gz`` (``a.jsonl.gz`` -> ``.jsonl``)."""
    return Path(path.stem).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def read_prompt_file(path: str | os.PathLike, *, field: str = "caption",
                     column: str = "caption") -> Iterator[PromptItem]:
    """Yield the prompts of one file: ``.txt`` (one per line), ``.jsonl`` (``field``), ``.csv``/``.tsv``
    (``column``), each optionally gzipped (``.gz``). Unknown suffixes are read as ``.txt``.

    Text lines are yielded as raw ``bytes`` so the writer decodes and counts undecodable ones;
    structurally broken records are yielded as ``Dropped("undecodable" | "malformed")``.
    """
    path = Path(path)
    kind = _base_suffix(path)
    if kind in (".csv", ".tsv"):
        yield from _read_table(path, column, delimiter="\t" if kind == ".tsv" else ",")
        return
    with _open_binary(path) as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if kind != ".jsonl":
                yield line
                continue
            if not line.strip():
                yield ""  # blank JSONL line: counted as empty, like a blank text line
                continue
            yield _jsonl_prompt(line, field)


def _jsonl_prompt(line: bytes, field: str) -> PromptItem:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return Dropped("undecodable")
    except json.JSONDecodeError:
        return Dropped("malformed")
    value = record.get(field) if isinstance(record, dict) else None
    return value if isinstance(value, str) else Dropped("malformed")


def _read_table(path: Path, column: str, delimiter: str) -> Iterator[PromptItem]:
    # NOTE: csv needs text; errors="surrogateescape" keeps bad bytes detectable per row instead of
    # failing the whole file at the first bad byte.
    with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape",
                                                      newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
        for row in reader:
            value = row.get(column)
            if value is None:
                yield Dropped("malformed")
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate = an undecodable byte in the source
                yield Dropped("undecodable")
                continue
            yield value


# ----------------------------------------------------------------------------------------------
# Writing shards


class _Filter:
    """Applies the manifest's filters in a fixed order and counts why items were dropped."""

    def __init__(self, dedupe: bool, min_chars: int, max_chars: int | None) -> None:
        self.dedupe, self.min_chars, self.max_chars = dedupe, min_chars, max_chars
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._seen: set[bytes] = set()  # 16-byte digests: 30M prompts cost ~1.5 GB, not ~5

    def __call__(self, item: PromptItem) -> str | None:
        reason, prompt = self._check(item)
        if reason is not None:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return prompt

    def _check(self, item: PromptItem) -> tuple[str | None, str | None]:
        if isinstance(item, Dropped):
            return item.reason, None
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                return "undecodable", None
        prompt = item.strip()
        if not prompt:
            return "empty", None
        if len(prompt) < self.min_chars:
            return "too_short", None
        if self.max_chars is not None and len(prompt) > self.max_chars:
            return "too_long", None
        if self.dedupe:
            digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).digest()
            if digest in self._seen:
                return "duplicate", None
            self._seen.add(digest)
        return None, prompt


def prepare_out_dir(out: Path, overwrite: bool, shard_glob: str = "prompts-*.tar") -> set[Path]:
    """Create ``out``; refuse a non-empty one unless ``overwrite``. Returns old shards to remove."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if not p.name.startswith(".")]
    if existing and not overwrite:
        raise FileExistsError(
            f"output directory {out} is not empty ({len(existing)} entries, e.g. {existing[0].name}); "
            "pass overwrite=True / --overwrite to replace its shards"
        )
    # NOTE: remove the old manifest first: from here until the new one lands, the directory has
    # no manifest, so nobody reads a mix of old and new shards through it.
    if (out / MANIFEST_NAME).exists():
        (out / MANIFEST_NAME).unlink()
        fsync_dir(out)
    return set(out.glob(shard_glob))


def write_prompt_shards(prompts: Iterable[PromptItem], out_dir: str | os.PathLike, shard_size: int = 10000,
                        dedupe: bool = False, min_chars: int = 1, max_chars: int | None = None,
                        overwrite: bool = False, progress: bool = False,
                        sources: list[str] | None = None) -> dict[str, Any]:
    """Filter ``prompts`` and write them as webdataset tar shards plus ``manifest.json``; return the manifest.

    ``prompts`` may mix ``str``, raw ``bytes`` (decoded as strict UTF-8) and :class:`Dropped` items
    (see :func:`read_prompt_file`). Filters run in this order: undecodable/malformed, empty,
    too_short (< ``min_chars``), too_long (> ``max_chars``), duplicate (exact match after strip,
    first occurrence kept). Streams: only one shard of prompts is held in memory.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_chars is not None and max_chars < min_chars:
        raise ValueError(f"max_chars ({max_chars}) < min_chars ({min_chars})")
    out = Path(out_dir)
    stale = prepare_out_dir(out, overwrite)
    keep = _Filter(dedupe, min_chars, max_chars)
    content = hashlib.sha256()
    shards: list[dict[str, Any]] = []
    pending: list[tuple[str, bytes]] = []
    total = seen = 0

    def flush() -> None:
        name = SHARD_TEMPLATE.format(len(shards))
        data = tar_bytes(pending)
        atomic_write_bytes(out / name, data, sync_dir=False)
        shards.append({"path": name, "count": len(pending), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        stale.discard(out / name)
        pending.clear()

    for item in tqdm(prompts, desc="prompts", unit=" prompts", disable=not progress, mininterval=0.5):
        seen += 1
        prompt = keep(item)
        if prompt is None:
            continue
        content_hash_update(content, prompt)
        pending.append((KEY_TEMPLATE.format(total) + ".txt", prompt.encode("utf-8")))
        total += 1
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not shards:
        raise ValueError(f"no prompts left to write after filtering ({seen} read, dropped: {keep.dropped})")
    manifest = {
        "format": MANIFEST_FORMAT,
        "total": total,
        "seen": seen,
        "content_sha256": content.hexdigest(),
        "shards": shards,
        "dropped": keep.dropped,
        "settings": {"shard_size": shard_size, "dedupe": dedupe, "min_chars": min_chars,
                     "max_chars": max_chars, "strip": True},
        "sources": sources or [],
    }
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    for old in stale:  # shards of an earlier, larger run that the new manifest does not list
        old.unlink()
    fsync_dir(out)
    return manifest


def load_manifest(path: str | os.PathLike, manifest_format: str = MANIFEST_FORMAT) -> dict[str, Any]:
    """Read a manifest (a ``manifest.json`` path or its directory) and check its format tag."""
    noun, tool = _MANIFEST_KINDS[manifest_format]
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{noun} manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        from sidscale.config import ConfigError

        # NOTE: a ConfigError: every rank finds the same, and main() prints it once (rank 0).
        raise ConfigError(f"{noun} manifest {path} is not valid JSON ({e}): truncated or corrupt; "
                          f"rewrite it with {tool} (the shards it lists are unchanged)") from None
    problem = None
    if not isinstance(manifest, dict):
        problem = f"holds a JSON {type(manifest).__name__}, not an object"
    elif manifest.get("format") != manifest_format:
        problem = f"format={manifest.get('format')!r}, expected {manifest_format!r}"
    elif not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
        problem = "its 'shards' list is missing or empty"
    elif not all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in manifest["shards"]):
        problem = "an entry of its 'shards' list has no 'path'"
    if problem is not None:
        from sidscale.config import ConfigError

        # the same on every rank: one message (main() prints a ConfigError once), no traceback per rank
        raise ConfigError(f"{path} is not a usable {noun} manifest ({problem}); write it with {tool}")
    return manifest
