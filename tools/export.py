"""Export a checkpoint's EMA generator as a diffusers folder (no process group needed).

    python tools/export.py RUN/checkpoints/step_00001000 --out exports/step_1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidscale.checkpoint import full_ema_from_checkpoint, is_complete, read_meta  # noqa: E402
from sidscale.export import export_generator  # noqa: E402


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    from diffusers import UNet2DConditionModel

    if not is_complete(ckpt):
        raise SystemExit(f"export: {ckpt} is not a complete sidscale checkpoint (needs meta.json, rank_*.pt, "
                         "generator/ and fake/)")
    meta = read_meta(ckpt)
    sampling = dict(meta["sampling"], step=meta["step"], images_seen=meta["images_seen"])
    unet_config = UNet2DConditionModel.load_config(Path(sampling["teacher_path"]) / "unet")
    return export_generator(full_ema_from_checkpoint(ckpt), unet_config, out, sampling)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    print(f"exported {export_checkpoint(args.checkpoint, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
