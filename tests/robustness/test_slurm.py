"""slurm/distill.sh on a real one-node SLURM cluster on this machine (tools/slurm_local/), 2 CPU ranks.

A job runs to completion under ``sbatch --wait``; the same job preempted with USR1 checkpoints,
requeues itself, resumes from ``latest`` and ends with weights identical to the uninterrupted job.
Skipped (with the reason) only where SLURM cannot be installed or started here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from sidscale.checkpointing.files import find_resume_checkpoint, full_ema_from_checkpoint, read_meta
from tests.helpers.dist_launch import REPO, free_port

pytestmark = [pytest.mark.root, pytest.mark.slow]

TOOLS = REPO / "tools" / "slurm_local"
MAX_STEPS = 5
OVERRIDES = [
    "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "teacher.dtype=fp32",
    "teacher.resolution=8", "data.shards=toy", "data.num_workers=1", "eval.num_samples=0",
    "train.export_at_end=false", "train.seed=3", "generator.lr=1e-2", "fake.lr=1e-2",
    "train.ema_halflife_kimg=0.01", f"train.max_steps={MAX_STEPS}", "train.ckpt_every=2", "train.keep_last=5",
]


@pytest.fixture(scope="module")
def cluster():
    """Install (if missing) and start a private cluster; stop it at the end of the module."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get install, slurmd)")
    proc = subprocess.run(["bash", str(TOOLS / "install.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot install slurm-wlm/munge: {proc.stderr.strip()[-500:]}")
    # Not under pytest's tmp dir: that is root-only (0700) and munged runs as user munge.
    state = Path(tempfile.mkdtemp(prefix="sidscale-slurm-"))
    state.chmod(0o755)
    # Own ports, so a cluster somebody already runs on the default ones is left alone.
    env = dict(os.environ, SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(TOOLS / "start.sh"), str(state)], capture_output=True, text=True,
                          timeout=120, env=env)
    if proc.returncode != 0:
        subprocess.run(["bash", str(TOOLS / "stop.sh"), str(state)], capture_output=True, timeout=120)
        logs = " | ".join(p.read_text()[-300:] for p in sorted((state / "log").glob("*.log")))
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"cannot start the local SLURM cluster: {proc.stderr.strip()[-500:]} {logs}")
    slurm_env = {"SLURM_CONF": str(state / "etc" / "slurm.conf")}
    try:
        yield slurm_env
    finally:
        env = dict(os.environ, **slurm_env)
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout
        if jobs.split():
            subprocess.run(["scancel", *jobs.split()], capture_output=True, env=env)
        subprocess.run(["bash", str(TOOLS / "stop.sh"), str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def teacher_dir(tiny_toy_teacher):
    return tiny_toy_teacher


def sbatch(cluster: dict, run_dir: Path, teacher: Path, wait: bool) -> subprocess.Popen:
    """Submit slurm/distill.sh toy as a 2-rank CPU job; RUN_DIR pinned so the test knows where it is.
    --oversubscribe: both jobs of this module share the node's cores, so that their start-ups, the
    requeue delay and sbatch's polling overlap instead of adding up."""
    sets = [a for o in OVERRIDES + [f"teacher.path={teacher}"] for a in ("--set", o)]
    cmd = ["sbatch", "--parsable", "--job-name=sidscale-test", "--nodes=1", "--ntasks-per-node=2",
           "--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe", f"--output={run_dir}.out",
           *(["--wait"] if wait else []), str(REPO / "slurm" / "distill.sh"), "toy", *sets]
    env = dict(os.environ, **cluster, SIDSCALE_CPU="1", RUN_DIR=str(run_dir), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def job_field(cluster: dict, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         env=dict(os.environ, **cluster)).stdout
    m = re.search(rf"\b{field}=(\S*)", out)
    return m.group(1) if m else ""


def weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = find_resume_checkpoint(run_dir)
    flat = {f"{tag}.{k}": v for tag in ("generator", "fake")
            for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}
    flat.update({f"ema.{k}": v for k, v in full_ema_from_checkpoint(ckpt).items()})
    return read_meta(ckpt)["step"], flat


def job_report(run_dir: Path) -> str:
    parts = [Path(f"{run_dir}.out")] + sorted((run_dir / "logs").glob("rank*.log"))
    return "\n".join(f"== {p}\n{p.read_text()[-2500:]}" for p in parts if p.is_file())


class Straight:
    """The uninterrupted job under ``sbatch --wait``, submitted when the module starts."""

    def __init__(self, cluster: dict, run_dir: Path, teacher: Path):
        self.run_dir, self.t0 = run_dir, time.monotonic()
        self.proc = sbatch(cluster, run_dir, teacher, wait=True)
        self.seconds: float | None = None
        self.stderr = ""

    def wait(self) -> int:
        if self.seconds is None:
            _, self.stderr = self.proc.communicate(timeout=420)
            self.seconds = time.monotonic() - self.t0
        return self.proc.returncode


@pytest.fixture(scope="module")
def straight(cluster, teacher_dir, tmp_path_factory):
    s = Straight(cluster, tmp_path_factory.mktemp("slurm_runs") / "straight", teacher_dir)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


# NOTE: this test runs first (file order) so that the uninterrupted job runs while it waits.
def test_preempted_job_requeues_and_resumes_identically(cluster, teacher_dir, straight, tmp_path):
    run_dir = tmp_path / "preempted"
    t0 = time.monotonic()
    out, err = sbatch(cluster, run_dir, teacher_dir, wait=False).communicate(timeout=60)
    assert out.strip(), err
    job = out.strip().split(";")[0]

    # Preempt once the first checkpoint (step 2) is complete, i.e. mid-run.
    deadline = time.monotonic() + 300
    while find_resume_checkpoint(run_dir) is None:
        assert time.monotonic() < deadline, f"no checkpoint after 300 s\n{job_report(run_dir)}"
        assert job_field(cluster, job, "JobState") in ("PENDING", "RUNNING"), job_report(run_dir)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=dict(os.environ, **cluster))
    t_signal = time.monotonic()

    deadline = time.monotonic() + 300
    while True:
        state, restarts = job_field(cluster, job, "JobState"), job_field(cluster, job, "Restarts")
        if state == "COMPLETED" and restarts != "0":
            break
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), \
            f"job {job} ended {state}\n{job_report(run_dir)}"
        assert time.monotonic() < deadline, f"job {job} still {state} after 300 s\n{job_report(run_dir)}"
        time.sleep(1)
    print(f"preempted job: signal after {t_signal - t0:.0f} s, done after {time.monotonic() - t0:.0f} s")

    assert restarts == "1", job_report(run_dir)
    batch_log = Path(f"{run_dir}.out").read_text()
    for line in ("got SIGUSR1", "requeueing job", "attempt 2", "training finished"):
        assert line in batch_log, batch_log
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    stopped = re.search(r"stopped by signal at step (\d+); checkpoint saved", rank0)
    resumed = re.search(r"resumed from \S+step_(\d+) \(step (\d+)\)", rank0)
    assert stopped and resumed, job_report(run_dir)
    # nothing lost: the second attempt starts exactly where the first one stopped
    assert 2 <= int(stopped.group(1)) == int(resumed.group(1)) < MAX_STEPS

    assert straight.wait() == 0, job_report(straight.run_dir)
    ref_step, ref = weights(straight.run_dir)
    step, got = weights(run_dir)
    assert step == ref_step == MAX_STEPS
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after preemption and requeue"


def test_sbatch_runs_to_completion(straight):
    code, run_dir = straight.wait(), straight.run_dir
    assert code == 0, f"sbatch --wait: exit {code}\n{straight.stderr}\n{job_report(run_dir)}"
    step, _ = weights(run_dir)
    assert step == MAX_STEPS
    # one log per rank, and the batch log names the run directory derived for the job
    assert sorted(p.name for p in (run_dir / "logs").glob("*.log")) == ["rank0.log", "rank1.log"]
    assert f"run dir {run_dir}" in Path(f"{run_dir}.out").read_text()
    print(f"uninterrupted sbatch --wait job: {straight.seconds:.0f} s")
