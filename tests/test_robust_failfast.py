"""An exception on one rank ends the whole job quickly, with that rank's traceback, and no requeue.

Ranks are started directly (one process per rank with RANK/WORLD_SIZE, as srun starts them): no
launcher tears the survivors down, so the trainer itself must not leave them waiting. Before the
fix, the failing rank waited in the barrier of main()'s tear-down while its peer waited in a
training collective: the job hung until the process-group timeout (10 minutes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidscale.distributed.preemption import EXIT_REQUEUE
from tests.dist_launch import REPO, free_port

BOUND_S = 60  # from the first rank's exit to the last one's
OVERRIDES = [
    "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "teacher.dtype=fp32",
    "teacher.resolution=8", "data.shards=toy", "data.num_workers=1", "eval.num_samples=0",
    "train.export_at_end=false", "train.log_every=1", "train.max_steps=4", "train.ckpt_every=100",
]


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank_quickly(tmp_path: Path, tiny_toy_teacher: Path) -> None:
    teacher = tiny_toy_teacher
    cmd = [sys.executable, str(REPO / "sidscale" / "train.py"), "--config", "toy", "--run-dir", str(tmp_path / "run")]
    cmd += [a for o in [*OVERRIDES, f"teacher.path={teacher}"] for a in ("--set", o)]
    port = str(free_port())
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, SIDSCALE_FAULT="point=mid_step,step=2,rank=1,action=raise")
    logs = [tmp_path / f"rank{r}.out" for r in range(2)]
    procs = []
    for r in range(2):
        with logs[r].open("w") as out:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                          env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), start_new_session=True))

    def output() -> str:
        return "\n".join(f"--- rank {r} ---\n{p.read_text(errors='replace')[-4000:]}" for r, p in enumerate(logs))

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
        for p in procs:  # the whole session of each rank (DataLoader workers included)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    print(output())
    assert None not in codes, f"rank {codes.index(None)} still running {BOUND_S} s after the first exit:\n{output()}"
    print(f"exit codes {codes}; last exit {waited:.1f} s after the first")
    # non-zero, not the requeue code (75), and each rank's own exit, not a kill by a signal
    assert all(c > 0 and c != EXIT_REQUEUE for c in codes), f"exit codes {codes}:\n{output()}"
    rank1 = logs[1].read_text(errors="replace")
    assert "[rank 1] Traceback (most recent call last):" in rank1, output()
    assert "[rank 1] sidscale.fault_injection.InjectedFault: injected fault (point=mid_step,step=2" in rank1, output()
    assert "sidscale: rank 1 failed (InjectedFault" in rank1
