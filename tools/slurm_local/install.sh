#!/usr/bin/env bash
# Install a single-node SLURM (slurm-wlm: slurmctld + slurmd + client tools) and munge, for the
# local test cluster of tests/test_slurm.py. Needs root (apt-get). Does nothing when both are present.
set -euo pipefail

if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "slurm_local/install.sh: installing slurm-wlm and munge needs root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
