"""Real-pair shards: webdataset tars of (latent or image, caption) plus a manifest, for ``data.real_shards``.

Layout of an output directory::

    real-000000.tar   per sample ``<%09d index>.latent.npy`` (or ``.png`` / ``.jpg`` / ...) + ``<index>.txt``
    real-000001.tar   ...
    manifest.json     format ``sidscale-real-shards/1``, the kind, shard list with counts and sha256,
                      drop counts, the settings that made the data (teacher kind, VAE scale/shift, seed)

Written like the prompt shards (``sidscale.data.shards``): every file atomically, the manifest last (its
presence means every shard it lists is complete), byte-reproducible tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidscale.core.io import atomic_write_bytes, fsync_dir
from sidscale.data.shards import MANIFEST_NAME, REAL_MANIFEST_FORMAT, prepare_out_dir, tar_bytes

REAL_SHARD_TEMPLATE = "real-{:06d}.tar"
KEY_TEMPLATE = "{:09d}"
TOY_REAL_COUNT = 4096  # toy real pairs written for ``data.real_shards: toy`` (24 prompts x 170 or 171)


def npy_bytes(x: torch.Tensor | np.ndarray) -> bytes:
    """An ``.npy`` file of ``x`` (kept in its dtype: fp16 or fp32)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_real_shards(samples: Iterable[tuple[str, str, bytes]], out_dir: str | os.PathLike, *, kind: str,
                      shard_size: int = 1000, overwrite: bool = False, settings: dict[str, Any] | None = None,
                      dropped: dict[str, int] | None = None, sources: list[str] | None = None) -> dict[str, Any]:
    """Write ``samples`` = ``(caption, extension, data)`` (extension ``latent.npy`` or an image's) as tar
    shards plus ``manifest.json``; return the manifest. ``kind``: "latent" | "image" (recorded)."""
    if kind not in ("latent", "image"):
        raise ValueError(f"kind must be 'latent' or 'image', got {kind!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    stale = prepare_out_dir(out, overwrite, shard_glob="real-*.tar")
    shards: list[dict[str, Any]] = []
    pending: list[tuple[str, bytes]] = []
    total = 0

    def flush() -> None:
        name = REAL_SHARD_TEMPLATE.format(len(shards))
        data = tar_bytes(pending)
        atomic_write_bytes(out / name, data, sync_dir=False)
        shards.append({"path": name, "count": len(pending) // 2, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        stale.discard(out / name)
        pending.clear()

    for caption, ext, data in samples:
        key = KEY_TEMPLATE.format(total)
        pending += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode("utf-8"))]
        total += 1
        if len(pending) == 2 * shard_size:
            flush()
    if pending:
        flush()
    if not shards:
        raise ValueError(f"no samples to write (dropped: {dropped or {}})")
    manifest = {"format": REAL_MANIFEST_FORMAT, "kind": kind, "total": total, "shards": shards,
                "dropped": dict(dropped or {}), "settings": {"shard_size": shard_size, **(settings or {})},
                "sources": sources or []}
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    for old in stale:  # shards of an earlier, larger run that the new manifest does not list
        old.unlink()
    fsync_dir(out)
    return manifest


def toy_real_samples(mixture: Any, count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``count`` exact samples of the toy mixture and their prompts: prompt ``i`` is ``prompts[i % P]`` (every
    prompt equally often), the images ``mixture.sample(prompts, Generator().manual_seed(seed))``."""
    prompts = [mixture.prompts[i % len(mixture.prompts)] for i in range(count)]
    return prompts, mixture.sample(prompts, torch.Generator().manual_seed(seed))


def write_toy_real_shards(mixture: Any, out_dir: str | os.PathLike, *, count: int = TOY_REAL_COUNT, seed: int = 0,
                          teacher_kind: str = "toy", shard_size: int = 256, overwrite: bool = False) -> dict[str, Any]:
    """The toy mixture's exact samples (pixel space: the toy's latent is the image) + prompts as fp32 latent
    shards (``toy_real_samples``)."""
    prompts, x = toy_real_samples(mixture, count, seed)
    samples = ((p, "latent.npy", npy_bytes(x[i])) for i, p in enumerate(prompts))
    return write_real_shards(samples, out_dir, kind="latent", shard_size=shard_size, overwrite=overwrite,
                             settings={"teacher_kind": teacher_kind, "toy_mixture": mixture.to_dict(),
                                       "count": count, "seed": seed, "latent_shape": list(mixture.shape)},
                             sources=["toy mixture"])
