#!/usr/bin/env bash
# Stop the local cluster that tools/slurm_local/start.sh started in DIR: slurmd, slurmctld,
# munged, each by its pid file (nothing else on the machine is touched). Keeps DIR (logs).
set -euo pipefail

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/sidscale-slurm}}
[[ -d $DIR ]] || exit 0

stop() {  # stop PIDFILE: TERM, wait up to 10 s, then KILL
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# slurmd first, so that it does not report to a controller that is gone; munge last.
stop "$DIR/run/slurmd.pid"
stop "$DIR/run/slurmctld.pid"
stop "$DIR/munge/munged.pid"
