"""Atomic file writes: write to a temp file in the same directory, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a torn write, even if the process is killed or the disk fills mid-write.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch


def fsync_dir(path: Path) -> None:
    """Flush a directory entry: os.replace is only durable once the directory itself is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True, sync_dir: bool = True) -> None:
    """Temp file in the same directory, then os.replace: readers see the old or the new file.

    ``durable=False`` skips the fsyncs (files that are cheap to regenerate and checked for
    completeness on read, e.g. evaluation PNGs); ``sync_dir=False`` leaves the directory fsync to
    the caller (one fsync after writing many files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should be readable by the team
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable and sync_dir:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
