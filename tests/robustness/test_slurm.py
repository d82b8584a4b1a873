"""tools/slurm_local/start.sh: the one-node SLURM cluster a person starts to try slurm/distill.sh here.

The cluster comes up, and runs a job shaped as distill.sh submits itself (2 tasks on the node under
``srun``, distill.sh's resource options, ``--requeue`` with the batch log appended to) that requeues
itself once with ``scontrol requeue`` as distill.sh does after its ranks exit 75, then completes. The
trainer's own SLURM behaviour (a job run to completion, equal to the same job on the test launcher;
preemption by USR1, requeue and an identical resume; node loss; elastic resume, including a job on one
node) runs on the 2-node cluster in tests/robustness/test_slurm_multinode.py, whose slurm.conf shares
its scheduling, requeue and kill settings with this one's (tools/slurm_local/common.sh).
Skipped (with the reason) only where SLURM cannot be installed or started here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.dist_launch import REPO, free_port
from tests.helpers.slurm_jobs import job_field

pytestmark = [pytest.mark.root, pytest.mark.slow]

TOOLS = REPO / "tools" / "slurm_local"

# Attempt 1 runs its 2 tasks and requeues the job (distill.sh's path after exit 75); attempt 2 runs them
# and ends. SLURM_RESTART_COUNT is unset in a job's first attempt.
REQUEUE_ONCE = """#!/usr/bin/env bash
set -euo pipefail
attempt=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
srun bash -c 'echo "attempt '$attempt' task $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"'
if (( attempt == 1 )); then
    echo "attempt 1 requeueing"
    scontrol requeue "$SLURM_JOB_ID"  # ends this shell (SIGTERM), as it ends distill.sh's
    exit 0
fi
echo "attempt 2 done"
"""


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
    # what start.sh tells a person to export
    assert f"export SLURM_CONF={state / 'etc' / 'slurm.conf'}" in proc.stdout, proc.stdout
    slurm_env = dict(os.environ, SLURM_CONF=str(state / "etc" / "slurm.conf"))
    try:
        yield slurm_env
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=slurm_env).stdout
        if jobs.split():
            subprocess.run(["scancel", *jobs.split()], capture_output=True, env=slurm_env)
        subprocess.run(["bash", str(TOOLS / "stop.sh"), str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_one_node_cluster_runs_a_job_shaped_as_distill_sh_and_requeues_it(cluster, tmp_path):
    script = tmp_path / "requeue_once.sh"
    script.write_text(REQUEUE_ONCE)
    log = tmp_path / "job.out"
    # distill.sh's own options (its #SBATCH lines) and the ones the tests submit it with
    cmd = ["sbatch", "--parsable", "--job-name=sidscale-smoke", "--nodes=1", "--ntasks-per-node=2",
           "--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe", "--requeue", "--open-mode=append",
           f"--output={log}", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=cluster)
    assert proc.returncode == 0 and proc.stdout.strip(), f"sbatch failed: {proc.stderr}"
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while True:
        state, restarts = job_field(cluster, job, "JobState"), job_field(cluster, job, "Restarts")
        if state == "COMPLETED" and restarts == "1":
            break
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"), \
            f"job {job} ended {state}\n{log.read_text() if log.exists() else ''}"
        assert time.monotonic() < deadline, f"job {job} still {state} (restarts {restarts}) after 120 s"
        time.sleep(0.5)
    lines = log.read_text().splitlines()
    for attempt in (1, 2):
        tasks = sorted(line for line in lines if line.startswith(f"attempt {attempt} task "))
        assert tasks == [f"attempt {attempt} task {t} of 2 on localhost" for t in (0, 1)], lines
    assert "attempt 1 requeueing" in lines and "attempt 2 done" in lines, lines
