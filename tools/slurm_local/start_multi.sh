#!/usr/bin/env bash
# Start a multi-node SLURM cluster on this one machine: every node is a network namespace with its
# own hostname (UTS namespace), its own address on a bridge, and its own slurmd; one slurmctld and
# one munged serve them all. For tests/robustness/test_slurm_multinode.py and for trying multi-node jobs
# (rendezvous across hosts, node loss) without a cluster:
#
#   tools/slurm_local/start_multi.sh [DIR]     # DIR: default ${SLURM_LOCAL_DIR:-/tmp/sidscale-mslurm}
#   export SLURM_CONF=DIR/etc/slurm.conf       # printed at the end; every client command needs it
#   SIDSCALE_CPU=1 sbatch --nodes 2 --ntasks-per-node 2 --gpus-per-node 0 --cpus-per-task 1 slurm/distill.sh toy
#   tools/slurm_local/stop_multi.sh [DIR]      # also run on any failure of this script
#
# Layout (all knobs are environment variables):
#   SLURM_LOCAL_NODES=2        nodes node1..nodeN
#   SLURM_LOCAL_NET=10.231.0   /24 prefix: bridge .1 (slurmctld), node K at .(10+K)
#   SLURM_LOCAL_TAG=sidmn      prefix of the bridge (TAGbr), namespaces (TAG-nodeK), veths (TAGvK)
#   SLURM_LOCAL_CPUS=4         CPUs each node declares (jobs may oversubscribe the real cores)
#   SLURMCTLD_PORT=6817 SLURMD_PORT=6818   slurmd ports do not collide: one per namespace
#   SLURM_LOCAL_START_TIMEOUT=120          seconds the nodes get to register (slow shared machines)
# Inside node K, /etc/netns/TAG-nodeK/hosts is mounted over /etc/hosts (as `ip netns exec` does): the
# node names resolve to their bridge addresses there, as a cluster's DNS would (nothing is written to
# the machine's own /etc/hosts). Each node's interface is called snet0. Needs root.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/sidscale-mslurm}}
NODES=${SLURM_LOCAL_NODES:-2}
NET=${SLURM_LOCAL_NET:-10.231.0}
TAG=${SLURM_LOCAL_TAG:-sidmn}
NODE_CPUS=${SLURM_LOCAL_CPUS:-4}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
TIMEOUT=${SLURM_LOCAL_START_TIMEOUT:-120}
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "slurm_local/start_multi.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, a bridge, slurmd)"
for tool in ip unshare nsenter munged slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null || die "$tool not found; run tools/slurm_local/install.sh (and apt-get install iproute2 util-linux)"
done
[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "SLURM_LOCAL_NODES=$NODES: expected 1..99"
(( ${#TAG} <= 10 )) || die "SLURM_LOCAL_TAG=$TAG: at most 10 characters (interface names are limited to 15)"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
[[ -e $DIR/run/slurmctld.pid ]] && die "$DIR holds a running (or unclean) cluster; run stop_multi.sh $DIR first"
BR=${TAG}br
ip link show "$BR" >/dev/null 2>&1 && die "bridge $BR exists already (another cluster with SLURM_LOCAL_TAG=$TAG?)"
for k in $(seq 1 "$NODES"); do
    [[ -e /run/netns/$TAG-node$k ]] && die "network namespace $TAG-node$k exists already (another cluster with SLURM_LOCAL_TAG=$TAG?)"
done

# Any failure from here on tears down what was built (daemons, namespaces, bridge).
teardown() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "slurm_local/start_multi.sh: failed (exit $rc); tearing down. Logs: $DIR/log/" >&2
        SLURM_LOCAL_NODES=$NODES SLURM_LOCAL_TAG=$TAG bash "$HERE/stop_multi.sh" "$DIR" >&2 || true
    fi
}
trap teardown EXIT

mkdir -p "$DIR/etc" "$DIR/run" "$DIR/log" "$DIR/state" "$DIR/spool" "$DIR/munge"
# Written for stop_multi.sh, so that a person's `stop_multi.sh DIR` finds the same names.
printf 'NODES=%s\nTAG=%s\n' "$NODES" "$TAG" > "$DIR/etc/layout"

# ---- Network: a bridge in this namespace, one namespace per node with a veth into the bridge.
ip link add "$BR" type bridge
ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up
HOSTS="127.0.0.1 localhost
$NET.1 ${TAG}-ctl"
for k in $(seq 1 "$NODES"); do HOSTS+=$'\n'"$NET.$((10 + k)) node$k"; done
for k in $(seq 1 "$NODES"); do
    ns=$TAG-node$k
    ip netns add "$ns"
    ip link add "${TAG}v$k" type veth peer name "${TAG}p$k"
    ip link set "${TAG}v$k" master "$BR" up
    ip link set "${TAG}p$k" netns "$ns"
    ip -n "$ns" link set "${TAG}p$k" name snet0
    ip -n "$ns" addr add "$NET.$((10 + k))/24" dev snet0
    ip -n "$ns" link set snet0 up
    ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns"
    echo "$HOSTS" > "/etc/netns/$ns/hosts"
done

# ---- munge: a private daemon; its socket is a file, so the namespaces reach it too. munged refuses
# to run as root and checks that its socket directory belongs to its user.
chown munge:munge "$DIR/munge"
chmod 0755 "$DIR/munge"
rm -f "$DIR/munge/munge.socket"
runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"

NODELIST=node[1-$NODES]
[[ $NODES == 1 ]] && NODELIST=node1
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / NODES - 512 ))
cat > "$CONF" <<CONF
# Written by tools/slurm_local/start_multi.sh: $NODES nodes, each a network namespace on bridge $BR.
ClusterName=sidscale-multi
# "localhost" passes slurmctld's own host check; the address is the bridge's, reachable from every node.
SlurmctldHost=localhost($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# The nodes declare SLURM_LOCAL_CPUS CPUs whatever the machine has (they all share its cores).
SlurmdParameters=config_overrides
$(slurm_conf_common)
CONF
for k in $(seq 1 "$NODES"); do
    echo "NodeName=node$k NodeHostname=node$k NodeAddr=$NET.$((10 + k)) CPUs=$NODE_CPUS RealMemory=$MEM_MB State=UNKNOWN" >> "$CONF"
done
echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$CONF"

slurmctld -f "$CONF"
for k in $(seq 1 "$NODES"); do
    # The node's network namespace, a UTS namespace for its hostname, and a mount namespace in which
    # its hosts file covers /etc/hosts; slurmd and every job step it starts inherit all three. Not
    # `ip netns exec`: that remounts /sys, which hides the cgroup mounts slurmd needs.
    mkdir -p "$DIR/spool/slurmd-node$k"
    nsenter --net="/run/netns/$TAG-node$k" -- unshare --uts --mount --propagation private -- \
        sh -c "mount --bind '/etc/netns/$TAG-node$k/hosts' /etc/hosts && hostname node$k && exec slurmd -f '$CONF' -N node$k"
done

# Ready when every node is idle.
deadline=$(( SECONDS + TIMEOUT ))
while :; do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
    idle=$(grep -c ' idle' <<<"$states" || true)
    if [[ $idle == "$NODES" ]]; then
        echo "slurm_local: $NODES-node cluster up in $DIR (bridge $BR, nodes $NET.11..$NET.$((10 + NODES)))"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    while read -r node state; do
        case $state in drain*|down*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;; esac
    done <<<"$states"
    (( SECONDS < deadline )) || die "the nodes did not come up within $TIMEOUT s: $(tr '\n' ' ' <<<"$states"); see $DIR/log/"
    sleep 0.5
done
