"""Export the EMA generator as a self-contained diffusers pipeline directory.

    EXPORT/unet/ or EXPORT/transformer/   save_pretrained of the generator (EMA weights, fp32):
                            plain ``UNet2DConditionModel`` / ``SD3Transformer2DModel`` /
                            ``FluxTransformer2DModel.from_pretrained``
    EXPORT/text_encoder*/, tokenizer*/, vae/, scheduler/
                            the teacher's frozen parts, copied (or symlinked with ``link_frozen``)
    EXPORT/model_index.json the diffusers pipeline index (StableDiffusion[XL|3]Pipeline, FluxPipeline)
    EXPORT/sidscale.json    how to sample it: the family, K (generator_steps) and its start level
                            (t_init / sigma_init), the schedule the run trained with (VP: its full
                            alphas_cumprod), latent shape, VAE scaling / shift factor

So the directory can be copied to another machine and sampled there with
``python -m sidscale.sample --model EXPORT`` (``FewStepPipeline.from_export``). Exports written
before the frozen parts were copied name the teacher directory (``teacher_path``) instead; the
sampler still reads those from there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sidscale.core.io import atomic_write_json
from sidscale.core.schedule import VPSchedule, make_alphas_cumprod, schedule_from_meta

EXPORT_META = "sidscale.json"
log = logging.getLogger(__name__)


def network_from_state(cls: type, config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``cls.from_config(config)`` holding ``state`` (the EMA: parameters only).

    Buffers are not trained and not in the EMA; the constructor computes them (SD3's sin-cos
    ``pos_embed`` is a persistent buffer), so any key the state lacks must be a buffer. Built on
    the meta device first (no throw-away random init) when the network has no buffers to compute.
    """
    with torch.device("meta"):
        net = cls.from_config(config)
    buffers = {name for name, _ in net.named_buffers()}
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - buffers:
        raise ValueError(f"EMA state does not match the {cls.__name__} config: missing "
                         f"{sorted(set(missing) - buffers)[:5]}, unexpected {unexpected[:5]}")
    if any(t.is_meta for t in net.buffers()):
        net = cls.from_config(config)
        net.load_state_dict(state, strict=False)
    return net


def _component_entry(folder: Path) -> list[str] | None:
    """``[library, class]`` of one pipeline folder, read from its own config (model_index.json form)."""
    for name, key, library in (("scheduler_config.json", "_class_name", "diffusers"),
                               ("tokenizer_config.json", "tokenizer_class", "transformers")):
        if (folder / name).is_file():
            return [library, json.loads((folder / name).read_text()).get(key)]
    if (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        if "_class_name" in cfg:
            return ["diffusers", cfg["_class_name"]]
        if cfg.get("architectures"):
            return ["transformers", cfg["architectures"][0]]
    return None


def write_model_index(export_dir: Path, pipeline_class: str, teacher_dir: Path) -> None:
    """The teacher's ``model_index.json`` when it has one (same components), else one built from the
    folders' own configs, so ``DiffusionPipeline.from_pretrained(EXPORT)`` finds every part."""
    import diffusers

    src = Path(teacher_dir) / "model_index.json"
    if src.is_file():
        index = json.loads(src.read_text())
    else:
        index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for folder in sorted(p for p in export_dir.iterdir() if p.is_dir()):
        entry = _component_entry(folder)
        if entry is not None:
            index.setdefault(folder.name, entry)
    atomic_write_json(export_dir / "model_index.json", index)


def copy_frozen_parts(teacher_dir: Path, export_dir: Path, folders: tuple[str, ...], link: bool) -> None:
    """The teacher's text encoders, tokenizers, VAE and scheduler into the export: copied, or with
    ``link`` symlinked (absolute paths: no disk used, but the export then needs the teacher)."""
    for name in folders:
        src = Path(teacher_dir) / name
        if not src.is_dir():
            continue  # optional parts (e.g. SD3 without T5)
        if link:
            os.symlink(src.resolve(), export_dir / name, target_is_directory=True)
        else:
            shutil.copytree(src, export_dir / name, symlinks=False)


def export_generator(
    ema_state: dict[str, torch.Tensor], network_config: dict, out_dir: Path, sampling: dict,
    link_frozen: bool = False,
) -> Path:
    """Write the export atomically (build in a temp dir, then rename into place). The family, the
    teacher directory and kind come from ``sampling`` (``teacher_kind``, ``teacher_path``)."""
    from sidscale.families import family_for_kind

    family = family_for_kind(sampling["teacher_kind"])
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    net = network_from_state(family.network_class(), network_config, ema_state)
    teacher_dir = Path(sampling["teacher_path"])
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # left by an export killed before its rename
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        net.save_pretrained(tmp / family.network_folder)
        kind = sampling["teacher_kind"]
        copy_frozen_parts(teacher_dir, tmp, family.pipeline_folders(kind), link_frozen)
        pipeline_class = family.pipeline_class_name(kind)
        if pipeline_class is not None:
            write_model_index(tmp, pipeline_class, teacher_dir)
        atomic_write_json(tmp / EXPORT_META, {**sampling, "self_contained": not link_frozen,
                                              "network_folder": family.network_folder})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def teacher_network_config(sampling: dict) -> dict:
    """The generator's architecture = the teacher network's config.json (its family's folder)."""
    from sidscale.families import family_for_kind

    family = family_for_kind(sampling["teacher_kind"])
    return dict(family.network_class().load_config(Path(sampling["teacher_path"]) / family.network_folder))


def read_export_meta(export_dir: Path) -> dict:
    path = Path(export_dir) / EXPORT_META
    if path.is_file():
        meta = json.loads(path.read_text())
        if (Path(export_dir) / meta.get("network_folder", "unet") / "config.json").is_file():
            return meta
    raise FileNotFoundError(
        f"{export_dir} is not a sidscale export: expected {EXPORT_META} and unet/config.json (or "
        "transformer/config.json) (made by tools/export.py or at the end of training)"
    )


def frozen_parts_dir(export_dir: Path, meta: dict) -> Path:
    """Where an export's text encoders / tokenizers / VAE are: in the export itself, or (exports
    written before they were copied) in the teacher directory it names."""
    export_dir = Path(export_dir)
    return export_dir if (export_dir / "tokenizer").is_dir() else Path(meta["teacher_path"])


def export_schedule(meta: dict, where: str | Path = EXPORT_META) -> VPSchedule:
    """The noise schedule to sample an export (or a checkpoint's ``sampling`` entry) with.

    Exports written since the schedule fix hold the run's ``alphas_cumprod``. Older ones hold
    ``cfg.schedule``'s beta settings, which training never read: the trainer always used the
    teacher's ``scheduler/scheduler_config.json``. For those, read that file again (it is the
    schedule the run trained with) and warn when the recorded settings disagree with it.
    """
    from sidscale.families.unet_vp.loading import schedule_from_dir

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
