"""Resume from anything (issue: verified checkpoints, one writer per run): each test reproduces a
fault an outside campaign found and checks the fixed behaviour against the shared uninterrupted
fp32 run (``conftest.fp32_reference_run``: steps 2, 4, 6 checkpointed, bit-exact comparisons).

- damaged files in the newest checkpoints (truncated / deleted ZeRO shards, silent corruption of a
  rank file) are found by every rank's checksum pass before any load, and the run falls back to
  the previous intact checkpoint with a warning naming each file;
- a second job on a run directory is refused while the first holds its lock;
- a kill between the final meta.json and ``latest`` is finished on restart (marker + export);
- a torn prompt manifest, a ``latest`` naming another run or replaced by a directory, a failed
  start and a resume with other settings end with one clear message and leave the run intact;
- SIGTERM to every process of the job (DataLoader workers included) still checkpoints and exits 75.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidscale.checkpointing import files as ckpt_lib
from sidscale.distributed.preemption import EXIT_REQUEUE
from sidscale.testing import fault_injection
from tests.helpers.dist_launch import Launch, run_trainer
from tests.helpers.reference_run import assert_identical


@pytest.fixture
def overrides(tiny_toy_teacher):
    from tests.helpers.reference_run import overrides

    return overrides(tiny_toy_teacher)


def linked_copy(reference: Path, run_dir: Path) -> Path:
    """A copy of the reference run made of hard links (cheap) for tests that only read it; files to
    damage are unlinked first (``own_copy``)."""
    shutil.copytree(reference, run_dir, copy_function=os.link)
    return run_dir


def real_copy(reference: Path, run_dir: Path) -> Path:
    """A real copy for tests that train on: DeepSpeed re-saves shards in place, which would write
    through hard links into the shared reference run."""
    shutil.copytree(reference, run_dir)
    return run_dir


def own_copy(path: Path) -> bytes:
    """Replace a hard link by a private copy (never write through into the reference run)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return data


def resumed_step(out: str) -> int:
    m = re.search(r"resumed from \S+ \(step (\d+)\)", out)
    assert m, f"no resume in the output:\n{out[-2000:]}"
    return int(m.group(1))


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_to_an_intact_one(overrides, fp32_reference_run, tmp_path):
    run = real_copy(fp32_reference_run, tmp_path / "run")
    s6, s4 = ckpt_lib.step_dir(run, 6), ckpt_lib.step_dir(run, 4)
    truncated = next((s6 / "fake").glob("*zero_pp_rank_1_*"))
    deleted = next((s6 / "generator").glob("*zero_pp_rank_0_*"))
    corrupted = ckpt_lib.rank_file(s4, 0)
    data = own_copy(truncated)
    truncated.write_bytes(data[: len(data) // 2])
    deleted.unlink()
    data = bytearray(own_copy(corrupted))
    at = random.Random(0).randrange(len(data) // 4, len(data) - 64)
    data[at:at + 64] = bytes(random.Random(1).randrange(256) for _ in range(64))  # same size, new bytes
    corrupted.write_bytes(bytes(data))
    assert ckpt_lib.is_complete(s4)

    proc = run_trainer(run, overrides)
    for f in (truncated, deleted, corrupted):
        assert str(f) in proc.stderr, f"no warning names {f}:\n{proc.stderr[-3000:]}"
    assert "truncated" in proc.stderr and "missing" in proc.stderr and "corrupted" in proc.stderr
    assert resumed_step(proc.stdout) == 2
    assert_identical(run, fp32_reference_run)
    # the damaged checkpoints were set aside (meta.json renamed, files kept), then saved again
    assert (s6 / ckpt_lib.DAMAGED_META).is_file() is False and ckpt_lib.is_complete(s6)


def test_checksums_cover_every_file_and_detect_damage(fp32_reference_run, tmp_path):
    """In-process: meta.json lists every file of the checkpoint, each rank's share is its own shards."""
    ckpt = ckpt_lib.step_dir(fp32_reference_run, 6)
    recorded = ckpt_lib.read_meta(ckpt)["files"]
    assert sorted(recorded) == ckpt_lib.checkpoint_files(ckpt)
    shares = [ckpt_lib.files_to_check(sorted(recorded), r, 2) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(recorded) and not set(shares[0]) & set(shares[1])
    assert all("rank_1" in f or "rank_00001" in f for f in shares[1])
    assert ckpt_lib.verify_share(ckpt, 0, 2) == [] and ckpt_lib.verify_share(ckpt, 1, 2) == []
    copy = linked_copy(fp32_reference_run, tmp_path / "run")
    victim = ckpt_lib.rank_file(ckpt_lib.step_dir(copy, 6), 1)
    data = bytearray(own_copy(victim))
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert ckpt_lib.verify_share(ckpt_lib.step_dir(copy, 6), 0, 2) == []  # not rank 0's file
    assert "corrupted" in ckpt_lib.verify_share(ckpt_lib.step_dir(copy, 6), 1, 2)[0]


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tiny_toy_teacher, tmp_path):
    from tests.helpers.inprocess import run_main

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from sidscale.run_lock import RunLock; "
        f"RunLock(Path({str(run)!r})).acquire(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, SLURM_JOB_ID="4242"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_main(run, [f"teacher.path={tiny_toy_teacher}", "teacher.resolution=8", "train.max_steps=1"])
        assert proc.returncode == 2
        assert f"pid {holder.pid}" in proc.stderr and "slurm_job_id 4242" in proc.stderr, proc.stderr[-2000:]
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    from sidscale.run_lock import RunLock

    RunLock(run).acquire().release()  # the OS released the dead holder's lock: a requeue may start


@pytest.mark.slow
def test_kill_before_the_final_latest_is_finished_on_restart(overrides, fp32_reference_run, tmp_path):
    """meta.json of the final step written, ``latest`` still on step 4 (SIGKILL between the two):
    the restart resumes from step 6, moves ``latest`` there and exports from it."""
    run = real_copy(fp32_reference_run, tmp_path / "run")
    marker = ckpt_lib.checkpoints_root(run) / ckpt_lib.LATEST
    marker.unlink()
    marker.write_text("step_00000004\n")
    proc = run_trainer(run, overrides + ["train.export_at_end=true"])
    assert resumed_step(proc.stdout) == 6
    assert marker.read_text().strip() == "step_00000006"
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(run / "export" / "unet").state_dict()
    ema = ckpt_lib.full_ema_from_checkpoint(ckpt_lib.step_dir(run, 6))
    assert all(exported[k].equal(v) for k, v in ema.items())


def test_latest_names_only_this_runs_step_dirs(fp32_reference_run, tmp_path, caplog):
    run = linked_copy(fp32_reference_run, tmp_path / "run")
    other = linked_copy(fp32_reference_run, tmp_path / "other")
    marker = ckpt_lib.checkpoints_root(run) / ckpt_lib.LATEST
    marker.unlink()
    marker.write_text(str(ckpt_lib.step_dir(other, 4)) + "\n")  # another run's absolute path
    assert ckpt_lib.find_resume_checkpoint(run) == ckpt_lib.step_dir(run, 6)
    assert "not a step directory name of this run" in caplog.text
    with pytest.raises(ValueError, match="not a checkpoint of run"):
        ckpt_lib.mark_latest(run, ckpt_lib.step_dir(other, 6))
    ckpt_lib.mark_latest(run, ckpt_lib.step_dir(run, 6))
    with pytest.raises(ValueError, match="newer than step_00000004"):
        ckpt_lib.mark_latest(run, ckpt_lib.step_dir(run, 4))
    marker.unlink()
    marker.mkdir()
    with pytest.raises(ckpt_lib.CheckpointError, match="not a regular file"):
        ckpt_lib.check_latest_marker(run)


def test_failed_starts_leave_the_run_dir_as_they_found_it(tiny_toy_teacher, fp32_reference_run, tmp_path):
    """A start that fails writes no config.yaml (the corrected retry with resume=false is accepted);
    a resume with another ZeRO stage / precision, or on another rank count with another global batch,
    is refused before any model is built."""
    from tests.helpers.inprocess import run_main

    run = tmp_path / "fresh"
    proc = run_main(run, ["teacher.kind=sd", f"teacher.path={tmp_path / 'no-such-teacher'}", "train.max_steps=1"])
    assert proc.returncode == 2 and "no-such-teacher" in proc.stderr
    assert not (run / "config.yaml").exists()

    resumed = linked_copy(fp32_reference_run, tmp_path / "resumed")
    before = sorted(p.relative_to(resumed) for p in resumed.rglob("*"))
    t0 = time.monotonic()
    proc = run_main(resumed, [f"teacher.path={tiny_toy_teacher}", "deepspeed.config=ds_configs/zero3.json",
                              "train.precision=bf16", "train.global_batch=16"])
    assert proc.returncode == 2
    msg = proc.stderr
    assert "written by 2 ranks with train.global_batch=8" in msg and "ZeRO stage 2" in msg, msg
    assert "precision=fp32" in msg, msg
    assert time.monotonic() - t0 < 30  # refused before the models were built
    assert sorted(p.relative_to(resumed) for p in resumed.rglob("*")) == before


def test_a_torn_prompt_manifest_is_one_clear_error(tiny_toy_teacher, tmp_path):
    from sidscale.data.shards import write_prompt_shards
    from tests.helpers.inprocess import run_main

    shards = tmp_path / "shards"
    write_prompt_shards(["a red circle", "a blue square"] * 4, shards, shard_size=4)
    manifest = shards / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    proc = run_main(tmp_path / "run", [f"teacher.path={tiny_toy_teacher}", "teacher.resolution=8",
                                       f"data.shards={manifest}", "train.max_steps=1"])
    assert proc.returncode == 2
    assert proc.stderr.count(f"prompt shard manifest {manifest} is not valid JSON") == 1, proc.stderr[-2000:]
    assert "JSONDecodeError" not in proc.stderr


@pytest.mark.slow
def test_sigterm_to_every_process_still_checkpoints_and_exits_75(overrides, fp32_reference_run, tmp_path):
    """scancel / the time limit signal every process of the job step: each rank's whole process
    group (its DataLoader worker included) gets SIGTERM after step 3. Workers ignore it, the ranks
    stop after that step, save it and exit 75; the restart continues exactly."""
    run = tmp_path / "run"
    launch = Launch(run, overrides, tmp_path / "logs", forked_ranks=True,
                    fault=fault_injection.Fault(point="after_step", step=3, action="sigterm_group"))
    try:
        codes = launch.wait(timeout=300)
    except BaseException:
        launch.kill()
        raise
    out = launch.output()
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], f"exit codes {codes}:\n{out[-4000:]}"
    assert "stopped by signal at step 3; checkpoint saved" in out and "failed" not in out.lower()
    proc = run_trainer(run, overrides)
    assert resumed_step(proc.stdout) == 3
    assert_identical(run, fp32_reference_run)
