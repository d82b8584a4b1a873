"""The trainer config of one benchmark case: a preset (its family's random-weight teacher,
sidscale/families/presets.py) and the systems knobs being measured."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidscale.config import Config, load_config
from sidscale.families.presets import preset_nets

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked configuration of the trainer (per rank: micro_batch x accumulation samples)."""

    preset: str
    zero: int = 2
    precision: str = "bf16"
    micro_batch: int = 1
    accumulation: int = 1
    grad_checkpointing: bool = False
    teacher_dtype: str | None = None  # default: the training precision (fp32 when training in fp32)
    reduce_bucket_size: int | None = None  # elements; default: the ds_configs/zero{zero}.json value
    compile_backend: str | None = None  # train.compile with this backend; None: eager
    # teacher.partitioned=true (the frozen teacher as an optimizer-less ZeRO-3 engine; issue 17 item 3's key)
    teacher_partitioned: bool = False

    @property
    def label(self) -> str:
        ckpt = "+ckpt" if self.grad_checkpointing else ""
        rbs = f"+rbs{self.reduce_bucket_size:.0e}".replace("+0", "") if self.reduce_bucket_size else ""
        comp = f"+compile({self.compile_backend})" if self.compile_backend else ""
        tpart = "+teacher_zero3" if self.teacher_partitioned else ""
        return (f"{self.preset}/zero{self.zero}/{self.precision}/mb{self.micro_batch}x{self.accumulation}"
                f"{ckpt}{rbs}{comp}{tpart}")

    def ds_config_path(self) -> str:
        """ds_configs/zero{zero}.json, or a copy of it with this case's bucket sizes."""
        path = f"ds_configs/zero{self.zero}.json"
        if self.reduce_bucket_size is None:
            return path
        ds = json.loads((REPO / path).read_text())
        zero = ds["zero_optimization"]
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if key in zero:
                zero[key] = int(self.reduce_bucket_size)
        out = Path(tempfile.mkdtemp(prefix="sidscale-bench-ds-")) / f"zero{self.zero}.json"
        out.write_text(json.dumps(ds, indent=2))
        return str(out)

    def resolved_teacher_dtype(self) -> str:
        return self.teacher_dtype or self.precision


def case_config(case: BenchCase, world_size: int, seed: int = 0) -> Config:
    """The trainer config of ``case``: the preset kind's method settings (UNet: the toy preset's;
    SD3: the SD3 config preset's with one generator step), the case's systems knobs."""
    base, kind_overrides = preset_nets(case.preset).case_config_base(case.preset)
    ckpt = str(case.grad_checkpointing).lower()
    overrides = [
        *kind_overrides, f"teacher.path=preset:{case.preset}",
        f"teacher.dtype={case.resolved_teacher_dtype()}", f"teacher.grad_checkpointing={ckpt}",
        f"generator.grad_checkpointing={ckpt}", f"fake.grad_checkpointing={ckpt}",
        f"train.precision={case.precision}", f"train.micro_batch={case.micro_batch}",
        f"train.global_batch={case.micro_batch * case.accumulation * world_size}", f"train.seed={seed}",
        "data.shards=indexed:toy", f"deepspeed.config={case.ds_config_path()}", "eval.num_samples=0",
    ]
    if case.compile_backend:
        overrides += ["train.compile=true", f"train.compile_backend={case.compile_backend}"]
    if case.teacher_partitioned:  # only when asked: the key exists once the partitioned teacher is merged
        overrides.append("teacher.partitioned=true")
    return load_config(base, overrides)
