#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (for tests/robustness/test_slurm.py and for trying
# slurm/distill.sh without a real cluster):
#
#   tools/slurm_local/start.sh [DIR]        # DIR: default ${SLURM_LOCAL_DIR:-/tmp/sidscale-slurm}
#   export SLURM_CONF=DIR/etc/slurm.conf    # printed at the end; every client command needs it
#   tools/slurm_local/stop.sh [DIR]
#
# Everything (config, state, spool, logs, pid files, munge socket) lives under DIR, so the
# cluster never touches /etc/slurm and several clusters can coexist when they use different
# ports (SLURMCTLD_PORT, SLURMD_PORT; defaults 6817, 6818). Idempotent: daemons already running
# from DIR are kept, with the config they were started with. Needs root (slurmd runs jobs as
# any user) and tools/slurm_local/install.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/sidscale-slurm}}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm_local/start.sh: needs root (slurmd must be able to start jobs as any user)" >&2
    exit 1
fi
for tool in munged slurmctld slurmd scontrol; do
    command -v "$tool" >/dev/null || { echo "slurm_local/start.sh: $tool not found; run tools/slurm_local/install.sh" >&2; exit 1; }
done

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
mkdir -p "$DIR/etc" "$DIR/run" "$DIR/log" "$DIR/state" "$DIR/spool" "$DIR/munge"

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: a private daemon with its own socket and pid file in DIR. munged refuses to run as
# root and checks that its socket directory belongs to its user.
chown munge:munge "$DIR/munge"
chmod 0755 "$DIR/munge"
if ! alive "$DIR/munge/munged.pid"; then
    rm -f "$DIR/munge/munge.socket"
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
fi

# The node's size comes from this machine; RealMemory must not exceed what slurmd measures,
# or the node is drained ("Low RealMemory"), hence the margin. nproc honours OMP_NUM_THREADS (often 1
# on HPC shells, and in the test workers): a node declared with 1 CPU never starts a 2-task job.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512 ))

# A running cluster keeps the config it was started with (rewriting it, e.g. with other ports,
# would cut the clients off from the running daemons).
if alive "$DIR/run/slurmctld.pid" || alive "$DIR/run/slurmd.pid"; then
    [[ -f $CONF ]] || { echo "slurm_local/start.sh: daemons running but $CONF is missing; run stop.sh" >&2; exit 1; }
else
cat > "$CONF.tmp" <<CONF
# Written by tools/slurm_local/start.sh: a one-node cluster on localhost (see docs/environment.md).
ClusterName=sidscale-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s);
# a short one keeps the preempt-requeue-resume test quick.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$(slurm_conf_common)
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# OverSubscribe=YES: jobs submitted with --oversubscribe may share cores (the tests run two
# small jobs at once on a 2-core machine); other jobs get whole cores as usual.
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
mv "$CONF.tmp" "$CONF"
fi

if ! alive "$DIR/run/slurmctld.pid"; then
    slurmctld -f "$CONF"
fi
if ! alive "$DIR/run/slurmd.pid"; then
    # -N decouples the node name from this machine's hostname.
    slurmd -f "$CONF" -N localhost
fi

# Ready when the controller answers and the node accepts jobs.
for _ in $(seq 1 60); do
    state=$(sinfo -h -N -n localhost -o %t 2>/dev/null || true)
    case $state in
        idle*|mix*|alloc*) echo "slurm_local: cluster up in $DIR (node state $state)"
                           echo "export SLURM_CONF=$CONF"
                           exit 0 ;;
        drain*|down*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
echo "slurm_local/start.sh: the cluster did not come up; see $DIR/log/" >&2
exit 1
