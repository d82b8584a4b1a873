"""Turn images + captions into real-pair shards (webdataset tars + manifest.json) for ``data.real_shards``.

    # images as they are (the trainer decodes, resizes and VAE-encodes them each time they are drawn)
    python tools/make_real_shards.py photos/ --out data/real
    # encoded once with a teacher's VAE (seeded latent_dist.sample()): latents + captions
    python tools/make_real_shards.py captions.jsonl --out data/real_sd3 \
        --teacher /models/sd3-medium --kind sd3 --resolution 512 --device cuda

Inputs: a folder of images (``.png`` / ``.jpg`` / ``.jpeg`` / ``.webp``, searched recursively) with the
caption of ``a/b.jpg`` in ``a/b.txt``; or a ``.jsonl`` (``--image-field``, ``--caption-field``) or ``.tsv``
(``--image-column``, ``--caption-column``) naming image paths (relative to the file's folder) and captions.
Images that cannot be read or decoded, and missing or empty captions, are dropped and counted in the manifest.

With ``--teacher DIR --kind K``: each image becomes RGB, its shorter side resized to ``--resolution``
(bicubic), center-cropped, scaled to [-1, 1] (as the trainer does with image shards), then encoded as
``(VAE.encode(x).latent_dist.sample() - shift_factor) * scaling_factor`` with ``DIR/vae`` and its config's
factors (SD1.5/SDXL: no shift; SD3/FLUX: their shift; FLUX's latents unpacked, as sidscale keeps them),
one ``torch.Generator(--device)`` seeded with ``--seed`` drawing for the images in input order; the toy
kinds (pixel space) store the preprocessed pixels. Train with ``data.real_shards=data/real/manifest.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from sidscale.config.schema import TOY_KINDS  # noqa: E402
from sidscale.data.real_pairs import IMAGE_EXTS, decode_image  # noqa: E402
from sidscale.data.real_shards import npy_bytes, write_real_shards  # noqa: E402
from sidscale.families.shared.diffusers_dir import DTYPES, load_vae, vae_downsampling  # noqa: E402

LATENT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a folder of images with KEY.txt captions, or a .jsonl / .tsv")
    p.add_argument("--out", required=True, type=Path, help="output dir (empty unless --overwrite)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--image-field", default="image", help="JSONL field holding the image path")
    p.add_argument("--caption-field", default="caption", help="JSONL field holding the caption")
    p.add_argument("--image-column", default="image", help="TSV column holding the image path")
    p.add_argument("--caption-column", default="caption", help="TSV column holding the caption")
    p.add_argument("--teacher", type=Path, default=None, help="teacher directory: write VAE latents, not images")
    p.add_argument("--kind", default=None, help="teacher.kind of --teacher (sd, sdxl, sd3, flux, toy, toy_flow)")
    p.add_argument("--resolution", type=int, default=None, help="teacher.resolution (with --teacher)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE's latent_dist.sample()")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE encode")
    p.add_argument("--device", default="cpu", help="where the VAE runs (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the VAE's dtype")
    p.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="fp16", help="dtype of the stored latents")
    p.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty --out")
    return p.parse_args(argv)


def read_pairs(source: Path, args: argparse.Namespace, dropped: Counter) -> Iterator[tuple[str, str, bytes]]:
    """``(caption, image extension, image bytes)`` of ``source`` in order; what cannot be used is counted."""
    for caption, image in _listed(source, args, dropped):
        ext = image.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            dropped["unsupported_image_type"] += 1
            continue
        if caption is None or not caption.strip():
            dropped["missing_caption" if caption is None else "empty_caption"] += 1
            continue
        try:
            data = image.read_bytes()
        except OSError:
            dropped["missing_image"] += 1
            continue
        if decode_image(data, 8)[0] is not None:
            dropped["undecodable_image"] += 1
            continue
        yield caption.strip(), ext, data


def _listed(source: Path, args: argparse.Namespace, dropped: Counter) -> Iterator[tuple[str | None, Path]]:
    if source.is_dir():
        for image in sorted(p for p in source.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
            txt = image.with_suffix(".txt")
            yield (txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None), image
        return
    base = source.parent
    if source.suffix.lower() == ".jsonl":
        for line in source.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, caption = rec[args.image_field], rec.get(args.caption_field)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                dropped["malformed"] += 1
                continue
            yield caption if isinstance(caption, str) else None, base / str(image)
        return
    if source.suffix.lower() == ".tsv":
        with open(source, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            for col in (args.image_column, args.caption_column):
                if reader.fieldnames is None or col not in reader.fieldnames:
                    raise ValueError(f"{source}: no column {col!r} (columns: {reader.fieldnames})")
            for row in reader:
                if not row.get(args.image_column):
                    dropped["malformed"] += 1
                    continue
                yield row.get(args.caption_column), base / row[args.image_column]
        return
    raise ValueError(f"{source}: expected a folder of images, a .jsonl or a .tsv")


def teacher_vae(teacher: Path, kind: str, device: str, dtype: str) -> tuple[torch.nn.Module | None, float, float]:
    """(VAE or None for the toy kinds, scaling_factor, shift_factor) of a teacher directory."""
    if kind in TOY_KINDS:
        return None, 1.0, 0.0
    vae = load_vae(teacher, DTYPES[dtype], device)
    return vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


def latent_shape(vae: torch.nn.Module | None, resolution: int) -> list[int]:
    if vae is None:
        return [3, resolution, resolution]
    down = vae_downsampling(vae)
    return [int(vae.config.latent_channels), resolution // down, resolution // down]


def encoded(pairs: Iterator[tuple[str, str, bytes]], vae: torch.nn.Module | None, scaling: float, shift: float,
            args: argparse.Namespace) -> Iterator[tuple[str, str, bytes]]:
    """``(caption, "latent.npy", npy bytes)``, encoded ``--batch-size`` images at a time with one seeded generator."""
    from sidscale.families.shared.vae_encode import encode_images

    generator = torch.Generator(args.device).manual_seed(args.seed)
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> Iterator[tuple[str, str, bytes]]:
        pixels = torch.stack([x for _, x in batch]).to(args.device)
        z = encode_images(vae, pixels, generator, scaling, shift).to(LATENT_DTYPES[args.latent_dtype]).cpu()
        yield from ((caption, "latent.npy", npy_bytes(z[i])) for i, (caption, _) in enumerate(batch))
        batch.clear()

    for caption, _ext, data in pairs:
        batch.append((caption, decode_image(data, args.resolution)[1]))
        if len(batch) == args.batch_size:
            yield from flush()
    if batch:
        yield from flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.source.exists():
        print(f"error: input not found: {args.source}", file=sys.stderr)
        return 2
    if args.teacher is not None and (args.kind is None or args.resolution is None):
        print("error: --teacher needs --kind and --resolution", file=sys.stderr)
        return 2
    from sidscale.families import TEACHER_KINDS

    if args.teacher is not None and args.kind not in TEACHER_KINDS:
        print(f"error: --kind {args.kind!r}: expected one of {', '.join(TEACHER_KINDS)}", file=sys.stderr)
        return 2
    dropped: Counter = Counter()
    pairs = read_pairs(args.source, args, dropped)
    settings: dict = {}
    try:
        if args.teacher is None:
            kind, samples = "image", pairs
        else:
            vae, scaling, shift = teacher_vae(args.teacher, args.kind, args.device, args.dtype)
            kind, samples = "latent", encoded(pairs, vae, scaling, shift, args)
            settings = {"teacher": str(args.teacher), "teacher_kind": args.kind, "resolution": args.resolution,
                        "latent_shape": latent_shape(vae, args.resolution), "scaling_factor": scaling,
                        "shift_factor": shift, "seed": args.seed,
                        "latent_dtype": args.latent_dtype, "vae_dtype": args.dtype if vae is not None else None}
        manifest = write_real_shards(samples, args.out, kind=kind, shard_size=args.shard_size,
                                     overwrite=args.overwrite, settings=settings, dropped=dropped,
                                     sources=[str(args.source)])
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"kind": manifest["kind"], "total": manifest["total"], "dropped": manifest["dropped"],
                      "shards": len(manifest["shards"]), "manifest": str(args.out / "manifest.json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
