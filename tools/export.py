"""Export a checkpoint's EMA generator as a self-contained diffusers pipeline folder (no process
group needed): the student network plus copies of the teacher's text encoders, tokenizers, VAE and
scheduler, model_index.json and sidscale.json (K steps, schedule).

    python tools/export.py RUN/checkpoints/step_00001000 --out exports/step_1000
    python tools/export.py RUN/checkpoints/step_00001000 --out exports/step_1000 --link   # symlink frozen parts
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidscale.checkpointing.files import CheckpointError, full_ema_from_checkpoint, is_complete, read_meta  # noqa: E402
from sidscale.export import export_generator, teacher_network_config  # noqa: E402


def export_checkpoint(ckpt: Path, out: Path, link_frozen: bool = False) -> Path:
    if not is_complete(ckpt):
        raise SystemExit(f"export: {ckpt} is not a complete sidscale checkpoint (needs meta.json, rank_*.pt, "
                         "generator/ and fake/)")
    meta = read_meta(ckpt)
    sampling = dict(meta["sampling"], step=meta["step"], images_seen=meta["images_seen"])
    return export_generator(full_ema_from_checkpoint(ckpt), teacher_network_config(sampling), out, sampling,
                            link_frozen=link_frozen)


def main(argv: list[str] | None = None) -> int:
    from sidscale.terminal import quiet_third_party

    quiet_third_party()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--link", action="store_true",
                   help="symlink the teacher's text encoders / VAE instead of copying them")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.link)
    except CheckpointError as e:  # the rank files fail their recorded checksums
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
