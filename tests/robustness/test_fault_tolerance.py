"""Fault injection on the 2-rank CPU trainer: whatever happens, a restart loses nothing beyond the
last complete checkpoint and ends bit-identical (fp32) to one uninterrupted run.

(a) SIGKILL of the whole launch after a step; (b) SIGKILL in the middle of a checkpoint save;
(c) a corrupt ``latest`` marker; (d) the disk filling up during a save; (e) SIGUSR1 (SLURM's
"time is nearly up") to one rank.

Every fault happens at a point the test chooses (``sidscale.testing.fault_injection``: the trainer stops
there and waits to be killed, or signals itself), never at a time that races the trainer, so each
test checks one exact expected outcome. All are compared with the one shared uninterrupted run
(``conftest.fp32_reference_run``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from sidscale.checkpointing.files import (
    LATEST,
    checkpoints_root,
    find_resume_checkpoint,
    full_ema_from_checkpoint,
    is_complete,
    read_meta,
    step_dir,
)
from sidscale.distributed.preemption import EXIT_REQUEUE
from sidscale.testing import fault_injection
from tests.helpers.dist_launch import Launch, run_trainer
from tests.helpers.reference_run import assert_identical


@pytest.fixture
def overrides(tiny_toy_teacher):
    from tests.helpers.reference_run import overrides

    return overrides(tiny_toy_teacher)


@pytest.fixture
def reference(fp32_reference_run):
    return fp32_reference_run


def latest_step(run_dir: Path) -> int | None:
    ckpt = find_resume_checkpoint(run_dir)
    return None if ckpt is None else read_meta(ckpt)["step"]


def resumed_step(proc: subprocess.CompletedProcess) -> int:
    m = re.search(r"resumed from \S+ \(step (\d+)\)", proc.stdout)
    assert m, f"no resume in the output:\n{proc.stdout[-2000:]}"
    return int(m.group(1))


@pytest.mark.slow
def test_sigkill_after_a_step_then_restart_is_exact(overrides, reference, tmp_path):
    """Both ranks finish step 3 (the checkpoint of step 2 is complete), then the whole launch is
    SIGKILLed: the restart resumes at step 2, loses nothing more, and ends identical."""
    run_dir = tmp_path / "run"
    launch = Launch(run_dir, overrides, tmp_path / "logs", forked_ranks=True,
                    fault=fault_injection.Fault(point="after_step", step=3, action="hang"))
    try:
        launch.wait_until(lambda: launch.ranks_at_fault() == 2, what="both ranks after step 3")
    finally:
        launch.kill()
    assert latest_step(run_dir) == 2
    proc = run_trainer(run_dir, overrides)
    assert resumed_step(proc) == 2  # nothing lost beyond the last checkpoint
    assert_identical(run_dir, reference)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_one(overrides, reference, tmp_path):
    """Killed inside the save of step 4: every rank has written its engine shards and rank file,
    rank 0 has not yet written meta.json. The partial directory is never marked ``latest``; and even
    where ``latest`` names it (a marker from another writer, a torn copy), the trainer falls back to
    the newest complete checkpoint with a warning."""
    run_dir = tmp_path / "run"
    partial = step_dir(run_dir, 4)
    launch = Launch(run_dir, overrides, tmp_path / "logs", forked_ranks=True,
                    fault=fault_injection.Fault(point="in_save", step=4, action="hang"))
    try:
        launch.wait_until(lambda: launch.ranks_at_fault() == 2, what="both ranks inside the save of step 4")
    finally:
        launch.kill()
    assert partial.is_dir() and any((partial / "generator").iterdir()) and not is_complete(partial)
    marker = checkpoints_root(run_dir) / LATEST
    assert marker.read_text().strip() == "step_00000002"
    marker.write_text("step_00000004\n")
    proc = run_trainer(run_dir, overrides)
    assert "falling back to the newest complete checkpoint" in proc.stderr
    assert resumed_step(proc) == 2
    assert_identical(run_dir, reference)


def corrupt_latest(run_dir: Path, how: str) -> None:
    marker = checkpoints_root(run_dir) / LATEST
    marker.unlink()  # never write through a hard link into the reference run
    if how == "truncated":
        marker.write_text("step_000")
    elif how == "empty":
        marker.write_bytes(b"")
    elif how == "garbage":
        marker.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(64)))
    elif how == "missing_rank_shard":  # names step 6, which lost a rank's shard
        marker.write_text("step_00000006\n")
        (step_dir(run_dir, 6) / "rank_00001.pt").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("how, expected_step", [
    ("truncated", 6), ("empty", 6), ("garbage", 6), ("missing_rank_shard", 4),
])
def test_corrupt_latest_falls_back_with_a_warning(reference, tmp_path, caplog, how, expected_step):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, copy_function=os.link)  # hard links: cheap, read-only use
    corrupt_latest(run_dir, how)
    with caplog.at_level(logging.WARNING, logger="sidscale.checkpoint"):
        ckpt = find_resume_checkpoint(run_dir)
    assert ckpt == step_dir(run_dir, expected_step)
    assert "falling back to the newest complete checkpoint" in caplog.text


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs that holds the run and one checkpoint (~29 MB) but not a second one."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=44m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
@pytest.mark.root
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(overrides, reference, small_disk, tmp_path):
    run_dir = small_disk / "run"
    proc = run_trainer(run_dir, overrides, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"expected exit 1, got {proc.returncode}:\n{out[-4000:]}"
    m = re.search(r"saving checkpoint (\S+) failed on rank \d: (.*?); the previous complete checkpoint "
                  r"\((\S+)\) is intact and remains the resume point", proc.stderr)
    assert m, f"no clear disk-full message:\n{out[-4000:]}"
    print(m.group(0))
    assert m.group(1) == str(step_dir(run_dir, 4)) and m.group(3) == str(step_dir(run_dir, 2))
    # the previous checkpoint is untouched and loads
    assert (checkpoints_root(run_dir) / LATEST).read_text().strip() == "step_00000002"
    ckpt = find_resume_checkpoint(run_dir)
    assert ckpt == step_dir(run_dir, 2) and not is_complete(step_dir(run_dir, 4))
    for tag in ("generator", "fake"):
        assert get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    assert full_ema_from_checkpoint(ckpt)
    # moved to a bigger disk, the run continues from step 2 as if nothing happened
    big = tmp_path / "big"
    shutil.copytree(run_dir, big, symlinks=True)
    proc = run_trainer(big, overrides)
    assert resumed_step(proc) == 2
    assert_identical(big, reference)


@pytest.mark.slow
def test_sigusr1_to_one_rank_checkpoints_exits_75_and_restart_is_exact(overrides, reference, tmp_path):
    """Only rank 1 gets SIGUSR1, right after step 3 (SLURM may signal ranks at different times):
    both ranks must stop after that same step, save it and exit 75; the restart continues exactly."""
    run_dir = tmp_path / "run"
    launch = Launch(run_dir, overrides, tmp_path / "logs", forked_ranks=True,
                    fault=fault_injection.Fault(point="after_step", step=3, rank=1, action="signal"))
    try:
        codes = launch.wait(timeout=300)
    except BaseException:
        launch.kill()
        raise
    out = launch.output()
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], f"exit codes {codes}:\n{out[-4000:]}"
    assert "received signal SIGUSR1" in out
    m = re.search(r"stopped by signal at step (\d+); checkpoint saved", out)
    assert m and int(m.group(1)) == 3, out[-4000:]
    ckpt = find_resume_checkpoint(run_dir)
    assert ckpt == step_dir(run_dir, 3) and is_complete(ckpt) and read_meta(ckpt)["step"] == 3
    proc = run_trainer(run_dir, overrides)
    assert resumed_step(proc) == 3
    assert_identical(run_dir, reference)
