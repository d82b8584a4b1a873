"""An exception on one rank ends the whole job quickly, with that rank's traceback, and no requeue.

Ranks are started directly (one process per rank with RANK/WORLD_SIZE, as srun starts them): no
launcher tears the survivors down, so the trainer itself must not leave them waiting. Before the
fix, the failing rank waited in the barrier of main()'s tear-down while its peer waited in a
training collective: the job hung until the process-group timeout (10 minutes).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sidscale.distributed.preemption import EXIT_REQUEUE
from sidscale.testing import fault_injection
from tests.helpers.dist_launch import Launch

BOUND_S = 60  # from the first rank's exit to the last one's
OVERRIDES = [
    "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "teacher.dtype=fp32",
    "teacher.resolution=8", "data.shards=toy", "data.num_workers=1", "eval.num_samples=0",
    "train.export_at_end=false", "train.log_every=1", "train.max_steps=4", "train.ckpt_every=100",
]


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank_quickly(tmp_path: Path, tiny_toy_teacher: Path) -> None:
    launch = Launch(tmp_path / "run", [*OVERRIDES, f"teacher.path={tiny_toy_teacher}"], tmp_path / "logs",
                    direct_ranks=True, fault=fault_injection.Fault(point="mid_step", step=2, rank=1, action="raise"))
    procs = launch.procs

    def output() -> str:
        return "\n".join(f"--- rank {r} ---\n{(launch.log_dir / f'rank{r}.out').read_text(errors='replace')[-4000:]}"
                         for r in range(2))

    try:
        deadline = time.monotonic() + 240  # start-up on a busy 2-core machine, then two steps
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, f"no rank exited within 240 s:\n{output()}"
            time.sleep(0.2)
        first_exit = time.monotonic()
        while any(p.poll() is None for p in procs) and time.monotonic() < first_exit + BOUND_S:
            time.sleep(0.2)
        waited = time.monotonic() - first_exit
        codes = [p.poll() for p in procs]
    finally:
        launch.kill()  # every process of each rank's session (DataLoader workers included)
    print(output())
    assert None not in codes, f"rank {codes.index(None)} still running {BOUND_S} s after the first exit:\n{output()}"
    print(f"exit codes {codes}; last exit {waited:.1f} s after the first")
    # non-zero, not the requeue code (75), and each rank's own exit, not a kill by a signal
    assert all(c > 0 and c != EXIT_REQUEUE for c in codes), f"exit codes {codes}:\n{output()}"
    rank1 = (launch.log_dir / "rank1.out").read_text(errors="replace")
    assert "[rank 1] Traceback (most recent call last):" in rank1, output()
    assert ("[rank 1] sidscale.testing.fault_injection.InjectedFault: injected fault (point=mid_step,step=2"
            in rank1), output()
    assert "sidscale: rank 1 failed (InjectedFault" in rank1
