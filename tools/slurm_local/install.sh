#!/usr/bin/env bash
# Install SLURM (slurm-wlm: slurmctld + slurmd + client tools), munge, and the namespace tools of the
# multi-node variant (iproute2: ip; util-linux: unshare, nsenter), for the local test clusters of
# tests/robustness/test_slurm.py and tests/robustness/test_slurm_multinode.py. Needs root (apt-get). Does nothing when all
# are present.
set -euo pipefail

if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null \
        && command -v unshare >/dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "slurm_local/install.sh: installing slurm-wlm and munge needs root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 util-linux >/dev/null
