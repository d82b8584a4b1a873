"""Real (latent or image, caption) pairs for the data-aided adversarial method (``method.adversarial``).

A ``RealPairSource`` streams ``data.real_shards`` through the prompt stream's machinery
(``sidscale.data.stream.ShardStream``): the same order (a pure function of seed, rank, worker, epoch),
per-worker cursors counted at the consumer, exact resume, elastic restart, corrupt-tar handling.

Sample formats (webdataset members sharing a key):
- ``KEY.latent.npy`` (fp16 or fp32, exactly ``latent_shape`` = the teacher's latent, finite) + ``KEY.txt``:
  the latents are used as they are (``tools/make_real_shards.py --teacher`` encodes them once);
- ``KEY.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` + ``KEY.txt``: decoded with PIL, RGB (alpha dropped),
  the shorter side resized to ``image_size`` (bicubic; untouched when already that size), center-cropped
  to ``image_size`` x ``image_size``, scaled to [-1, 1]: float32 [3, H, W], for the trainer to encode with
  ``Teacher.encode_images`` (toy teachers: the pixels are the latent).
A sample holding both is a latent sample. A shard set is one kind: the first good sample in shard order
decides (checked before the run starts); a sample of the other kind is skipped and counted.

Skipped and counted, never fatal (``stats()``): each reason of the prompt stream (corrupt or truncated
tar, missing / undecodable / empty caption) and ``missing_data`` (no latent or image member),
``wrong_kind``, ``bad_latent`` (not a loadable .npy), ``latent_dtype``, ``latent_shape``, ``nonfinite``,
``bad_image`` (PIL cannot decode it). The cheap checks (caption, member present, kind) run before the
shuffle buffer; decoding runs after it, so the buffer holds the encoded bytes and a resume fast-skips
without decoding.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from sidscale.data.shard_reading import COUNTERS, _Counters, read_shard
from sidscale.data.shards import REAL_MANIFEST_FORMAT
from sidscale.data.stream import ShardStream, StreamSource, first_sample
from sidscale.errors import ConfigError

KINDS = ("latent", "image")
LATENT_EXT = "latent.npy"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
LATENT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
REAL_COUNTERS = (*COUNTERS, "skipped_missing_data", "skipped_wrong_kind", "skipped_bad_latent",
                 "skipped_latent_dtype", "skipped_latent_shape", "skipped_nonfinite", "skipped_bad_image")


class RealBatch(NamedTuple):
    x: torch.Tensor  # [B, *latent_shape] (kind "latent") or [B, 3, S, S] in [-1, 1] (kind "image"), fp32, CPU
    kind: str  # "latent" | "image"
    captions: list[str]


def decode_latent(data: bytes, shape: Sequence[int]) -> tuple[str | None, torch.Tensor | None]:
    """(skip reason, None) or (None, the latent as fp32 [C, H, W])."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # not an .npy at all, a truncated one, a pickled object array
        return "bad_latent", None
    if arr.dtype.newbyteorder("=") not in LATENT_DTYPES:
        return "latent_dtype", None
    if tuple(arr.shape) != tuple(shape):
        return "latent_shape", None
    x = torch.from_numpy(arr.astype(np.float32))
    if not bool(torch.isfinite(x).all()):
        return "nonfinite", None
    return None, x


def decode_image(data: bytes, size: int) -> tuple[str | None, torch.Tensor | None]:
    """(skip reason, None) or (None, fp32 [3, size, size] in [-1, 1]): RGB, shorter side resized to ``size``
    (bicubic), center crop (SiD-DiT's real-image preprocessing; no flip)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")  # (decodes the whole image: a truncated file fails here)
    except Exception:
        return "bad_image", None
    w, h = rgb.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        rgb = rgb.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    arr = np.asarray(rgb, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return None, torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


@dataclass(frozen=True)
class RealPairFormat:
    """The ``SampleFormat`` of real pairs; ``kind`` None accepts both kinds (to find the first good sample)."""

    kind: str | None
    latent_shape: tuple[int, int, int]
    image_size: int
    noun: str = "real pair"
    counters: tuple[str, ...] = REAL_COUNTERS
    manifest_format: str = REAL_MANIFEST_FORMAT

    def select(self, files: dict[str, bytes]) -> tuple[str | None, Any]:
        if LATENT_EXT in files:
            kind, data = "latent", files[LATENT_EXT]
        else:
            ext = next((e for e in IMAGE_EXTS if e in files), None)
            if ext is None:
                return "missing_data", None
            kind, data = "image", files[ext]
        if self.kind is not None and kind != self.kind:
            return "wrong_kind", None
        return None, (kind, data)

    def read(self, path: str, counters: _Counters) -> Iterator[tuple[str, Any]]:
        return read_shard(path, counters, self.select)

    def decode(self, payload: tuple[str, tuple[str, bytes]], counters: _Counters) -> tuple | None:
        caption, (kind, data) = payload
        if kind == "latent":
            reason, x = decode_latent(data, self.latent_shape)
        else:
            reason, x = decode_image(data, self.image_size)
        if reason is not None:
            counters.add(f"skipped_{reason}")
            return None
        return x, caption, kind

    def collate(self, samples: list[tuple]) -> dict[str, Any]:
        return {"x": torch.stack([s[0] for s in samples]), "captions": [s[1] for s in samples]}

    def layout(self) -> dict[str, Any]:
        return {"kind": self.kind}


class RealPairSource(StreamSource):
    """Sequential ``RealBatch``es of this rank from ``shards`` (a brace/glob pattern of tars, a manifest.json
    of ``tools/make_real_shards.py`` or its directory). Problems that would fail every rank (no shard, no
    good sample in any shard) are a ``ConfigError`` naming ``data.real_shards``, before the run starts."""

    def __init__(self, shards: str, *, rank: int, world_size: int, batch_size: int, seed: int, num_workers: int,
                 shuffle_buffer: int, resampled: bool, latent_shape: tuple[int, int, int], image_size: int) -> None:
        from sidscale.data.shard_reading import resolve_shards

        shape = tuple(int(n) for n in latent_shape)
        try:
            paths = resolve_shards(shards, REAL_MANIFEST_FORMAT)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.real_shards={shards!r}: {e}") from None
        first, skipped = first_sample(paths, RealPairFormat(None, shape, image_size))
        if first is None:
            counts = ", ".join(f"{k}={v}" for k, v in skipped.items() if v and k.startswith("skipped_"))
            raise ConfigError(f"data.real_shards={shards!r}: none of its {len(paths)} shards holds a usable "
                              f"(latent {list(shape)} or image, caption) pair ({counts or 'no samples'}; first "
                              f"shard: {paths[0]}); write them with tools/make_real_shards.py")
        self.kind: str = first[2]
        try:
            self.stream = ShardStream(shards, fmt=RealPairFormat(self.kind, shape, image_size), rank=rank,
                                      world_size=world_size, batch_size=batch_size, seed=seed,
                                      num_workers=num_workers, shuffle_buffer=shuffle_buffer, resampled=resampled)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.real_shards={shards!r}: {e}") from None

    def batch(self, step: int, phase: int, indices: Sequence[int]) -> RealBatch:
        """The next micro-batch (sample i pairs with the step's sample ``indices[i]``; the order is the
        stream's, so ``step`` and ``phase`` only check the caller's batch size)."""
        b = next(self.stream)
        if len(b["captions"]) != len(indices):
            raise RuntimeError(f"real-pair stream gave {len(b['captions'])} samples, expected {len(indices)}")
        return RealBatch(b["x"], self.kind, b["captions"])
