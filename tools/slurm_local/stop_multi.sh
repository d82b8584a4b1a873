#!/usr/bin/env bash
# Stop the cluster that tools/slurm_local/start_multi.sh started in DIR and remove its network:
# cancel its jobs, stop each slurmd (pid file), kill what is left in its node namespaces (job steps),
# stop slurmctld and munged, delete the namespaces, veths, bridge and /etc/netns entries. Touches
# nothing else on the machine. Keeps DIR (logs, state). Safe to run twice, or after a failed start.
set -uo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/sidscale-mslurm}}
NODES=${SLURM_LOCAL_NODES:-2}
TAG=${SLURM_LOCAL_TAG:-sidmn}
# The layout the cluster was started with wins over the environment.
if [[ -f $DIR/etc/layout ]]; then
    # shellcheck disable=SC1091
    source "$DIR/etc/layout"
fi


if [[ -d $DIR ]]; then
    export SLURM_CONF=$DIR/etc/slurm.conf
    if [[ -f $SLURM_CONF && -s $DIR/run/slurmctld.pid ]] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        mapfile -t jobs < <(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ ${#jobs[@]} -gt 0 ]]; then
            timeout 10 scancel "${jobs[@]}" 2>/dev/null || true
            for _ in $(seq 1 50); do
                [[ -z $(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    for k in $(seq 1 "$NODES"); do stop_pidfile "$DIR/run/slurmd-node$k.pid"; done
fi
# Whatever still runs inside a node (a job step of a cancelled job, a rank) goes with its node.
for k in $(seq 1 "$NODES"); do
    ns=$TAG-node$k
    [[ -e /run/netns/$ns ]] || continue
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    [[ ${#pids[@]} -gt 0 ]] && kill -KILL "${pids[@]}" 2>/dev/null
done
if [[ -d $DIR ]]; then
    stop_pidfile "$DIR/run/slurmctld.pid"
    stop_pidfile "$DIR/munge/munged.pid"
fi
for k in $(seq 1 "$NODES"); do
    ns=$TAG-node$k
    [[ -e /run/netns/$ns ]] && ip netns del "$ns"
    ip link del "${TAG}v$k" 2>/dev/null  # gone with the namespace, unless that failed half-way
    rm -rf "/etc/netns/$ns"
done
rmdir /etc/netns 2>/dev/null
ip link del "${TAG}br" 2>/dev/null
exit 0
