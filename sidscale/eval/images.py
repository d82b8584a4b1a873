"""Image files of an evaluation: naming, atomic PNG writes, completeness, and the protocol's 256 step.

Generated images are ``DIR/{i:06d}.png`` (image i = prompt i, seed i), saved at the model's native
resolution (512 for SD1.5 / SD2.1-base, the protocol's "saved 512x512"; a toy export saves its
own size: nothing is resized before saving, since the FID preprocessing resizes both sides anyway).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from sidscale.io_utils import atomic_write_bytes

FID_SIZE = 256  # the protocol's centre-crop + Lanczos size, applied to generated AND reference images
PNG_TRAILER = b"IEND\xaeB`\x82"  # the IEND chunk (type + CRC) that ends every complete PNG


def image_path(out_dir: Path, i: int) -> Path:
    return Path(out_dir) / f"{i:06d}.png"


def is_complete_png(path: Path) -> bool:
    """The file exists and ends with the IEND chunk.

    Writes are temp + rename, so a killed process never leaves a partial file under the final
    name; checking the trailer also catches a truncated file left by a node crash (we skip
    fsync per image: 30k fsyncs on a network file system cost more than regenerating a few)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_TRAILER):
                return False
            f.seek(-len(PNG_TRAILER), os.SEEK_END)
            return f.read() == PNG_TRAILER
    except OSError:
        return False


def save_png_atomic(path: Path, pixels: np.ndarray) -> None:
    """[H, W, 3] uint8 -> PNG at ``path`` via a temp file in the same directory + rename."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8 pixels, got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    # Not fsynced: a PNG cut short by a crash fails is_complete_png and is regenerated.
    atomic_write_bytes(Path(path), buf.getvalue(), durable=False)


def missing_images(out_dir: Path, indices: range | list[int]) -> list[int]:
    return [i for i in indices if not is_complete_png(image_path(out_dir, i))]


def center_crop_square(img: Image.Image) -> Image.Image:
    """The largest centred square (offsets rounded down, as PIL/torchvision centre crops do)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def protocol_resize(img_np: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [256, 256, 3] uint8: centre crop to a square, PIL Lanczos to 256.

    This is the protocol's step before clean-fid; clean-fid's own "clean" preprocessing (PIL bicubic
    on float channels to 299, no quantisation) then runs on the 256 image. Module-level (not a
    lambda) so DataLoader workers can pickle it."""
    img = Image.fromarray(np.asarray(img_np, dtype=np.uint8)).convert("RGB")
    img = center_crop_square(img)
    if img.size != (FID_SIZE, FID_SIZE):
        img = img.resize((FID_SIZE, FID_SIZE), resample=Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursive), sorted; hidden temp files excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))
