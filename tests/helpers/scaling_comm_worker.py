"""One rank of the 2-rank communication count (tests/unit/test_scaling.py launches it under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/scaling_comm_worker.py OUT_DIR [CASES [WARMUP]]

For each case (argv[2], comma-separated; default all) the real ``Trainer`` (tiny preset, bf16, micro-batch 2 x
accumulation 2, random weights) runs ``WARMUP`` iterations (argv[3], default 1), then ``STEPS`` iterations with
DeepSpeed's comms logger on (``deepspeed.comm.configure``): every collective DeepSpeed's ZeRO code issues is
recorded with its message size. Writes ``rank{R}.json`` into argv[1]: per case, {op: {message bytes: count}}.

Cases: ZeRO-2 (ds_configs/zero2.json as shipped); ZeRO-3 with ``stage3_param_persistence_threshold``,
``stage3_max_reuse_distance`` and ``stage3_prefetch_bucket_size`` at 0 (the regime the scaling model is exact
for), the same with gradient checkpointing, and ZeRO-3 as shipped (the model is an upper bound there).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

STEPS = 1
EXACT_ZERO3 = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
               "stage3_prefetch_bucket_size": 0}
CASES = {  # name: (zero stage, zero_optimization overrides, gradient checkpointing)
    "zero2": (2, {}, False),
    "zero3": (3, EXACT_ZERO3, False),
    "zero3_ckpt": (3, EXACT_ZERO3, True),
    "zero3_shipped": (3, {}, False),
}


def ds_config_file(zero: int, overrides: dict) -> str:
    repo = Path(__file__).resolve().parents[2]
    ds = json.loads((repo / "ds_configs" / f"zero{zero}.json").read_text())
    ds["zero_optimization"].update(overrides)
    fd, path = tempfile.mkstemp(suffix=f"-zero{zero}.json")
    with os.fdopen(fd, "w") as f:
        json.dump(ds, f)
    return path


def main(out_dir: Path, cases: list[str], warmup: int) -> None:
    import deepspeed.comm as dscomm
    from deepspeed.comm.comm import comms_logger

    from sidscale.bench import bench
    from sidscale.bench.cases import BenchCase
    from sidscale.distributed.runtime import init_distributed, shutdown_distributed

    info = init_distributed()
    result: dict = {"world_size": info.world_size}
    for name in cases:
        zero, overrides, ckpt = CASES[name]
        path = ds_config_file(zero, overrides)

        class Case(BenchCase):
            def ds_config_path(self, _path: str = path) -> str:  # the case's own zero_optimization block
                return _path

        runner = bench.trainer_runner(Case("tiny", zero, "bf16", micro_batch=2, accumulation=2,
                                           grad_checkpointing=ckpt), info)
        for _ in range(warmup):  # DeepSpeed's first step allocates and traces (same bytes in the exact regime)
            runner.step()
        comms_logger.comms_dict.clear()
        dscomm.configure(enabled=True, prof_all=True, verbose=False, debug=False)
        for _ in range(STEPS):
            runner.step()
        dscomm.configure(enabled=False)
        result[name] = {op: {str(size): rec[0] for size, rec in sizes.items()}
                        for op, sizes in comms_logger.comms_dict.items()}
        comms_logger.comms_dict.clear()
        runner.close()
    result["steps"], result["warmup"] = STEPS, warmup
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES),
         int(sys.argv[3]) if len(sys.argv) > 3 else 1)
