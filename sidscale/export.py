"""Export the EMA generator as a diffusers folder that plain ``UNet2DConditionModel`` loads.

    EXPORT/unet/            save_pretrained of the one-step generator (EMA weights, fp32)
    EXPORT/sidscale.json    how to sample it: t_init, the schedule the run trained with (its full
                            alphas_cumprod), latent shape, scaling factor, and where the teacher's
                            text encoder / tokenizer / VAE live
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from sidscale.io_utils import atomic_write_json
from sidscale.schedule import VPSchedule, make_alphas_cumprod, schedule_from_meta

EXPORT_META = "sidscale.json"
log = logging.getLogger(__name__)


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


def export_schedule(meta: dict, where: str | Path = EXPORT_META) -> VPSchedule:
    """The noise schedule to sample an export (or a checkpoint's ``sampling`` entry) with.

    Exports written since the schedule fix hold the run's ``alphas_cumprod``. Older ones hold
    ``cfg.schedule``'s beta settings, which training never read: the trainer always used the
    teacher's ``scheduler/scheduler_config.json``. For those, read that file again (it is the
    schedule the run trained with) and warn when the recorded settings disagree with it.
    """
    from sidscale.models.teacher import schedule_from_dir

    schedule = meta.get("schedule")
    prediction_type = meta.get("prediction_type", "epsilon")
    if isinstance(schedule, dict) and "alphas_cumprod" in schedule:
        return schedule_from_meta(schedule, prediction_type, str(where))
    teacher = Path(meta.get("teacher_path", ""))
    config = teacher / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{where}: an export written before sidscale recorded the training schedule (no "
            f"schedule.alphas_cumprod); its schedule is the teacher's {config}, which is missing. Restore the "
            "teacher at teacher_path, or re-export the checkpoint with this version (tools/export.py)")
    trained = schedule_from_dir(teacher, prediction_type)
    if isinstance(schedule, dict):
        try:
            recorded = make_alphas_cumprod(schedule["num_train_timesteps"], schedule["beta_start"],
                                           schedule["beta_end"], schedule["beta_schedule"])
        except (KeyError, ValueError):
            recorded = None
        if recorded is None or not torch.equal(recorded, trained.alphas_cumprod):
            log.warning("%s: the recorded schedule settings %s are not what training used; sampling with the "
                        "teacher's %s, as training did", where, schedule, config)
    return trained
