#!/usr/bin/env bash
# Stop the local cluster that tools/slurm_local/start.sh started in DIR: cancel its jobs, then stop
# slurmd, slurmctld and munged, each by its pid file (nothing else on the machine is touched).
# Keeps DIR (logs, state).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/sidscale-slurm}}
[[ -d $DIR ]] || exit 0


# Jobs still running would outlive the daemons (their slurmstepd and ranks): cancel them first.
export SLURM_CONF=$DIR/etc/slurm.conf
if [[ -f $SLURM_CONF ]] && [[ -s $DIR/run/slurmctld.pid ]] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
    if [[ ${#jobs[@]} -gt 0 ]]; then
        scancel "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 1 100); do
            [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
            sleep 0.2
        done
    fi
fi

# slurmd first, so that it does not report to a controller that is gone; munge last.
stop_pidfile "$DIR/run/slurmd.pid"
stop_pidfile "$DIR/run/slurmctld.pid"
stop_pidfile "$DIR/munge/munged.pid"
