"""Export the EMA generator as a diffusers folder that plain ``UNet2DConditionModel`` loads.

    EXPORT/unet/            save_pretrained of the one-step generator (EMA weights, fp32)
    EXPORT/sidscale.json    how to sample it: t_init, the schedule, latent shape, scaling
                            factor, and where the teacher's text encoder / tokenizer / VAE live
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from sidscale.io_utils import atomic_write_json

EXPORT_META = "sidscale.json"


def export_generator(
    ema_state: dict[str, torch.Tensor], unet_config: dict, out_dir: Path, sampling: dict
) -> Path:
    """Write the export atomically (build in a temp dir, then rename into place)."""
    from diffusers import UNet2DConditionModel

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_config(unet_config)
    missing, unexpected = unet.load_state_dict(ema_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"EMA state does not match the UNet config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        unet.save_pretrained(tmp / "unet")
        atomic_write_json(tmp / EXPORT_META, sampling)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_export_meta(export_dir: Path) -> dict:
    path = Path(export_dir) / EXPORT_META
    if not path.is_file() or not (Path(export_dir) / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"{export_dir} is not a sidscale export: expected {EXPORT_META} and unet/config.json "
            "(made by tools/export.py or at the end of training)"
        )
    return json.loads(path.read_text())
