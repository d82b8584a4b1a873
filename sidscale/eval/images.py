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
import torch
from PIL import Image

from sidscale.core.io import atomic_write_bytes

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


def center_offsets(w: int, h: int, s: int) -> tuple[int, int]:
    """(left, top) of a centred s x s crop, rounded as torchvision's ``center_crop`` rounds them:
    ``int(round((w - s) / 2))``, Python's round half to even. GigaGAN's and DMD2's evaluation code
    crops with torchvision, so e.g. a 640x425 COCO image (215 px to remove) starts at x = 108, where
    rounding down would give 107."""
    return int(round((w - s) / 2.0)), int(round((h - s) / 2.0))


def center_crop_square(img: Image.Image) -> Image.Image:
    """The largest centred square, offsets rounded half to even as torchvision's ``center_crop``."""
    w, h = img.size
    s = min(w, h)
    left, top = center_offsets(w, h, s)
    return img.crop((left, top, left + s, top + s))


def crop_lanczos(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then PIL Lanczos to ``size`` (GigaGAN / DMD2 ``resize_and_center_crop``)."""
    img = center_crop_square(img.convert("RGB"))
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.LANCZOS)
    return img


def protocol_resize(img_np: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8: centre crop to a square, PIL Lanczos to ``size``
    (256 for SiD-LSG / GigaGAN, 512 for DMD2's SDXL protocol).

    This is the protocol's step before clean-fid; clean-fid's own "clean" preprocessing (PIL bicubic
    on float channels to 299, no quantisation) then runs on the result. Module-level (not a lambda;
    other sizes through ``functools.partial``) so DataLoader workers can pickle it."""
    img = Image.fromarray(np.asarray(img_np, dtype=np.uint8)).convert("RGB")
    return np.asarray(crop_lanczos(img, size), dtype=np.uint8)


def byte_round_trip(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> torchvision ``to_tensor`` (x / 255 in float32) -> x * 255 -> ``.byte()`` (truncation),
    as SiD-DiT's ``resize_images_in_tensor`` does after its Lanczos resize. For uint8 input every
    value survives this in float32 (checked in the tests), but it is kept to be the reference's steps."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(torch.float32).div(255)  # a writable copy
    return (x * 255).to(torch.uint8).numpy()


def sid_dit_fid_resize(img_np: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """SiD-DiT's in-training FID input: centre crop (a no-op on the square generated images), PIL
    Lanczos to 256, the byte round trip; returned as float32 so clean-fid's loader passes the integer
    values through unchanged to the TF-Inception network, which resizes to 299 inside (clean-fid's
    "legacy_tensorflow" mode, the path of the StyleGAN / EDM metric code SiD-DiT builds on)."""
    return byte_round_trip(protocol_resize(img_np, size)).astype(np.float32)


def gigagan_float_round_trip(img: Image.Image) -> Image.Image:
    """GigaGAN's evaluation dataset returns ``Normalize(0.5, 0.5)(ToTensor()(img))`` and its CLIP score
    turns that back into a PIL image with ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``. In float32
    the truncation takes 63 of the 256 values one step down (e.g. 1 -> 0): this reproduces it."""
    u = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))
    x = (u.to(torch.float32).div(255) - 0.5) / 0.5
    return Image.fromarray(((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).numpy(), mode="RGB")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursive), sorted; hidden temp files excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))
