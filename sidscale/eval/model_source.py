"""What ``--model`` points at: an export, or a training checkpoint (exported first), and its run.

    RUN/export/                  export: unet/ (or transformer/) + sidscale.json
    RUN/checkpoints/step_X/      checkpoint: meta.json + rank_*.pt (EMA shards) + engine dirs
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sidscale.checkpointing import files as ckpt_lib
from sidscale.export import EXPORT_META, export_generator, read_export_meta, teacher_network_config


class ModelDirError(ValueError):
    pass


@dataclass
class ModelSource:
    path: Path  # what the user gave
    kind: str  # "export" | "checkpoint"
    export_dir: Path  # the export to sample from (for a checkpoint: OUT/export)
    sampling: dict  # sidscale.json contents
    step: int | None
    run_dir: Path | None  # the training run it belongs to, if any (for TensorBoard)


def run_dir_of(path: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_X and for RUN/export (when RUN looks like a run directory)."""
    path = path.resolve()
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):
        return path.parent.parent
    if path.name == "export" and ((path.parent / "checkpoints").is_dir() or (path.parent / "config.yaml").is_file()):
        return path.parent
    return None


def _is_checkpoint(path: Path) -> bool:
    return (path / ckpt_lib.META).is_file()


def describe_model(path: Path) -> tuple[str, dict, int | None]:
    """(kind, sampling meta, step) without side effects; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelDirError(f"--model {path}: not a directory; expected a sidscale export (unet/ or transformer/ + "
                            f"{EXPORT_META}) or a training checkpoint RUN/checkpoints/step_XXXXXXXX "
                            "(meta.json + rank_*.pt)")
    try:
        meta = read_export_meta(path)
        return "export", meta, meta.get("step")
    except FileNotFoundError:
        pass
    if _is_checkpoint(path):
        if not ckpt_lib.is_complete(path):
            raise ModelDirError(f"--model {path}: checkpoint is incomplete (a rank file or engine dir is missing: "
                                "interrupted save?); pick a complete one under RUN/checkpoints/")
        meta = ckpt_lib.read_meta(path)
        if "sampling" not in meta:
            raise ModelDirError(f"--model {path}: checkpoint meta.json has no 'sampling' entry (written by an older "
                                "trainer?); export it with the trainer instead")
        return "checkpoint", meta["sampling"], int(meta["step"])
    raise ModelDirError(f"--model {path}: neither a sidscale export (expected unet/ or transformer/config.json + "
                        f"{EXPORT_META}) nor a training checkpoint (expected meta.json + rank_*.pt, as in "
                        "RUN/checkpoints/step_XXXXXXXX)")


def export_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    """EMA generator of ``ckpt`` -> ``out_dir`` (an export), reused when it already holds that step."""
    meta = ckpt_lib.read_meta(ckpt)
    sampling = dict(meta["sampling"], step=int(meta["step"]), source_checkpoint=str(Path(ckpt).resolve()))
    try:
        if read_export_meta(out_dir) == json.loads(json.dumps(sampling)):
            return out_dir
    except FileNotFoundError:
        pass
    # the generator has the teacher network's architecture (the trainer exports with the teacher's config)
    return export_generator(ckpt_lib.full_ema_from_checkpoint(ckpt), teacher_network_config(sampling), out_dir,
                            sampling)


def resolve_model(path: Path, out_dir: Path, rank: int = 0, timeout_s: float = 1800.0) -> ModelSource:
    """Describe ``path``; for a checkpoint, rank 0 exports it to OUT/export and the other ranks wait."""
    path = Path(path).expanduser()
    kind, sampling, step = describe_model(path)
    export_dir = path
    if kind == "checkpoint":
        export_dir = Path(out_dir) / "export"
        if rank == 0:
            export_checkpoint(path, export_dir)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if read_export_meta(export_dir).get("step") == step:
                        break
                except FileNotFoundError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{export_dir}: rank 0 did not export checkpoint {path} within {timeout_s} s")
                time.sleep(2.0)
        sampling = read_export_meta(export_dir)
    return ModelSource(path, kind, export_dir, sampling, step, run_dir_of(path))
