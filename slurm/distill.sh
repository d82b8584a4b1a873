#!/usr/bin/env bash
# SiD-LSG distillation as a SLURM batch job: one rank per GPU on one or more nodes, stops
# cleanly before the time limit or on preemption, requeues itself and resumes from the last
# checkpoint with no user action.
#
#   sbatch [--nodes N] [sbatch options] slurm/distill.sh CONFIG [--set key=value ...]
#   e.g. sbatch --nodes 4 slurm/distill.sh sdxl --set teacher.path=/models/sdxl \
#            --set data.shards='/data/laion/prompts-{000000..000999}.tar'
#
# Knobs: the #SBATCH lines below are defaults; the same options on the sbatch command line win.
#   --nodes=N                 nodes (default 1); ranks = nodes x ntasks-per-node
#   --ntasks-per-node=G       ranks per node, one per GPU: keep it equal to --gpus-per-node
#   --gpus-per-node=G         GPUs per node (default 8)
#   --cpus-per-task=C         CPU cores per rank (data workers, OMP threads)
#   --time=HH:MM:SS           limit of ONE allocation; the job requeues itself, so short is fine
#   --partition=P --account=A site specific (add them here or on the command line)
#   --signal=B:USR1@GRACE     GRACE seconds before the time limit the ranks are told to finish
#                             the current step and checkpoint; must exceed one step + one save
# Environment (sbatch exports the submitting shell's environment):
#   RUN_DIR         run directory; default ${SIDSCALE_RUNS:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID},
#                   the same for every requeue of the job (a new job continues a run with RUN_DIR=...)
#   SIDSCALE_HOME   checkout to run (default: the directory sbatch was called from)
#   PYTHON          interpreter (default: SIDSCALE_HOME/.venv/bin/python if present, else python3)
#   SIDSCALE_CPU=1  CPU ranks (DS_ACCELERATOR=cpu, gloo): the local test cluster, e.g.
#                   SIDSCALE_CPU=1 sbatch --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 ...
#   SIDSCALE_MASTER_PORT  rendezvous port (default 20000 + job id % 20000; a MASTER_PORT exported
#                   from the submitting shell is ignored: sbatch copies the whole environment)
#   NCCL_* / TORCH_NCCL_* / OMP_NUM_THREADS   see "Environment of the ranks" below; all overridable
#   GLOO_SOCKET_IFNAME  interface gloo binds to; default: chosen per node, the one that reaches MASTER_ADDR
#                   (MASTER_ADDR itself is always the first node's NodeAddr; see "Rendezvous" below)
#   SIDSCALE_RANK_EXIT_WAIT  seconds the other ranks get after the first one exits (default 120)
#
# Logs: this script's output in slurm-<job name>-<job id>.out (submit directory); one log per
# rank in RUN_DIR/logs/rank<N>.log, appended to by every requeued attempt, each attempt's part
# starting with a line naming the rank's node, rendezvous address and gloo interface.
#
# Preemption: Slurm sends USR1 to this shell GRACE seconds before the time limit (or send it
# yourself: scancel --signal=USR1 --batch JOBID). The shell forwards it to the srun step, srun to
# every rank; the ranks agree on a step, finish it, save a checkpoint and exit 75; this script
# then calls `scontrol requeue`, and the requeued job resumes from RUN_DIR/checkpoints/latest.
# SIGTERM (plain scancel, the hard time limit, preemption) also makes the ranks checkpoint if
# they can within KillWait, but this script does not requeue then: a cancelled job stays cancelled.
# Another number of nodes is fine: resubmitting the run (same RUN_DIR, e.g. sbatch --nodes 2 after
# --nodes 4) resumes the checkpoint on the new rank count (train.py reshards it; docs/checkpoints.md, elastic resume).
#
#SBATCH --job-name=sidscale
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

readonly EXIT_REQUEUE=75  # sidscale/distributed/preemption.py: stopped on request, run me again

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: sbatch [sbatch options] slurm/distill.sh CONFIG [--set key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "distill.sh: not inside a SLURM job; submit it with sbatch (or run sidscale/train.py directly)" >&2
    exit 2
fi

# sbatch runs a copy of this script from the spool directory, so the checkout is found from
# the submit directory, not from $0.
REPO=${SIDSCALE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $REPO/sidscale/train.py ]]; then
    echo "distill.sh: $REPO/sidscale/train.py not found; sbatch from the sidscale checkout or set SIDSCALE_HOME" >&2
    exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

# The run directory depends only on the job (name, id), which a requeue keeps: the requeued
# attempt finds its checkpoints and resumes.
RUN_DIR=${RUN_DIR:-${SIDSCALE_RUNS:-runs}/${SLURM_JOB_NAME:-sidscale}-${SLURM_JOB_ID}}
mkdir -p "$RUN_DIR/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

# ---- Rendezvous: rank 0 listens on the first node of the allocation, at the address Slurm itself
# reaches that node by (its NodeAddr: the node name unless slurm.conf says otherwise), so the other
# nodes need no name resolution of their own. Always set here: sbatch exports the submitting
# shell's environment, and a MASTER_ADDR from there would point at the login node.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_NODE_ADDR=$(scontrol show node -o "${NODES[0]}" 2>/dev/null | sed -n 's/.*[[:space:]]NodeAddr=\([^[:space:]]*\).*/\1/p')
export MASTER_ADDR=${MASTER_NODE_ADDR:-${NODES[0]}}
export MASTER_PORT=${SIDSCALE_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
# train.py takes RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS
# only when RANK is unset; stale values exported from the submitting shell would win.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE

# ---- Environment of the ranks (each one overridable from the submitting shell).
# A rank that hits an NCCL error or a collective timeout (config key dist.timeout_s, default 600 s)
# exits instead of leaving the others blocked until the time limit. 3 = SkipCleanUp: end the
# process without ncclCommAbort, which can itself hang (torch's default; sidscale/distributed/
# runtime.py sets the same). Old and new (torch >= 2.2) names.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-3}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# ZeRO-3 gathers and frees parameters of many sizes every step; expandable segments let the caching
# allocator grow blocks in place instead of fragmenting the card (the memory plan budgets 90 %).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Interconnect selection is site specific: set e.g. NCCL_SOCKET_IFNAME=ib0 or NCCL_IB_HCA=mlx5
# in the submitting shell when NCCL picks the wrong interface (NCCL's own choice skips lo and
# docker*, prefers ib*). gloo (the CPU ranks, and the CPU-side groups of GPU runs) binds to the
# address its node's hostname resolves to unless GLOO_SOCKET_IFNAME names an interface: each rank
# sets it, on its own node, to the interface that reaches MASTER_ADDR (RANK_PRELUDE below),
# unless the submitting shell set it.
# gloo also carries the waits for rank 0's one-off work (export, toy evaluation, completing a
# checkpoint, the elastic conversion): a wrong interface fails at start-up, where its group is made.
# One OMP thread pool per rank, sized to the cores that rank was given (torch's default is all
# cores of the node, which G ranks then oversubscribe G times).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch allocation.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# Nothing is fetched from a model hub at run time; logs are written as they happen.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export PYTHONUNBUFFERED=1
if [[ ${SIDSCALE_CPU:-0} == 1 ]]; then
    export DS_ACCELERATOR=cpu
fi

# ---- Signals: record, and forward to the srun step (srun forwards USR1/TERM to every rank).
SRUN_PID=""
GOT_USR1=0
GOT_TERM=0
REQUEUEING=0
# shellcheck disable=SC2317  # called from the traps below
forward() {
    [[ $REQUEUEING == 1 ]] && return 0  # our own `scontrol requeue` terminates this shell
    if [[ $1 == USR1 ]]; then GOT_USR1=1; else GOT_TERM=1; fi
    echo "distill.sh: $(date '+%F %T') got SIG$1; the ranks finish the step, checkpoint and stop"
    if [[ -n $SRUN_PID ]]; then kill -s "$1" "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

requeue() {
    REQUEUEING=1
    echo "distill.sh: $(date '+%F %T') requeueing job $SLURM_JOB_ID; the next attempt resumes from $RUN_DIR/checkpoints/latest"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "distill.sh: scontrol requeue failed; continue the run with: RUN_DIR=$RUN_DIR sbatch slurm/distill.sh $CONFIG ..." >&2
        exit "$EXIT_REQUEUE"
    fi
    exit 0
}

echo "distill.sh: job $SLURM_JOB_ID attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on ${#NODES[@]} node(s)" \
     "($SLURM_JOB_NODELIST), $SLURM_NTASKS ranks, rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-<auto>} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-<auto>}"
echo "distill.sh: run dir $RUN_DIR; rank logs $RUN_DIR/logs/rank<N>.log"
if [[ $GOT_USR1 == 1 ]]; then requeue; fi  # told to stop before the ranks even started
if [[ $GOT_TERM == 1 ]]; then exit 143; fi

# One task per rank started by srun, not one torchrun per node: the ranks' own exit code (75:
# stopped on request) reaches this script unchanged (torchrun turns any non-zero exit of a
# worker into 1), srun delivers the forwarded signal straight to every rank, and there is no
# second rendezvous to configure. A rank that raises prints its traceback and exits 1 at once,
# without waiting for the others (sidscale/train.py main); the others' collectives then fail
# (NCCL: its watchdog, at the latest after dist.timeout_s) and they exit 1 too. --wait bounds
# that: once one rank exits, the others get SIDSCALE_RANK_EXIT_WAIT seconds, then are killed, so
# a dead rank cannot hold the allocation until the time limit. --kill-on-bad-exit is not used
# because srun counts 75 as a bad exit: it would kill ranks still tearing down after a clean
# exit 75 and replace 75 by their signal status (no requeue). Any exit other than 0 and 75
# ends the job below without a requeue.
#
# RANK_PRELUDE runs on each rank's own node before it becomes the trainer (exec: same pid, so
# srun's signals and the exit code are the trainer's): GLOO_SOCKET_IFNAME = the interface the
# route to MASTER_ADDR leaves by (on the master node, the interface holding that address; never lo,
# which the other nodes cannot reach), and one line naming the node in the rank's log. A SIGUSR1 /
# SIGTERM arriving meanwhile would kill the rank (bash's default action): it is recorded and handed
# to the trainer in SIDSCALE_STARTUP_SIGNALS (sidscale/startup_signals.py), which stops after its first step.
# shellcheck disable=SC2016  # expanded by the rank's shell
RANK_PRELUDE='
startup_signals=""
trap "startup_signals+=\" USR1\"" USR1
trap "startup_signals+=\" TERM\"" TERM
if [[ -z ${GLOO_SOCKET_IFNAME:-} ]] && command -v ip >/dev/null && command -v getent >/dev/null; then
    addr=$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk "NR == 1 {print \$1}")
    dev=""
    if [[ -n $addr ]]; then
        dev=$(ip -o route get "$addr" 2>/dev/null | sed -n "s/.* dev \([^ ]*\).*/\1/p")
        if [[ $dev == lo ]]; then dev=$(ip -o addr show to "$addr" 2>/dev/null | awk "NR == 1 {print \$2}"); fi
    fi
    if [[ -n $dev && $dev != lo ]]; then export GLOO_SOCKET_IFNAME=$dev; fi
fi
echo "distill.sh: rank $SLURM_PROCID (local $SLURM_LOCALID) on node $(hostname) [$SLURMD_NODENAME]," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT ($(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk "NR == 1 {print \$1}"))," \
     "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-}"
export SIDSCALE_STARTUP_SIGNALS=${startup_signals# }
exec "$@"'
srun --wait="${SIDSCALE_RANK_EXIT_WAIT:-120}" --kill-on-bad-exit=0 \
     --output="$RUN_DIR/logs/rank%t.log" --open-mode=append \
     bash -c "$RANK_PRELUDE" distill-rank \
     "$PYTHON" "$REPO/sidscale/train.py" --config "$CONFIG" --run-dir "$RUN_DIR" "$@" &
SRUN_PID=$!
# A signal arriving between the two lines above was recorded but not forwarded yet.
if [[ $GOT_USR1 == 1 ]]; then kill -s USR1 "$SRUN_PID" 2>/dev/null || true; fi

# `wait` returns early (128 + signal) whenever a trapped signal arrives; wait again until srun
# is gone. The last `wait` reports srun's status, or 127 if an earlier one already did.
rc=0
while :; do
    wait "$SRUN_PID" && rc=0 || rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
wait "$SRUN_PID" 2>/dev/null && last=0 || last=$?
if [[ $last != 127 ]]; then rc=$last; fi
SRUN_PID=""

case $rc in
    0)
        echo "distill.sh: $(date '+%F %T') training finished; run dir $RUN_DIR"
        exit 0 ;;
    "$EXIT_REQUEUE")
        # SIGTERM means Slurm is ending the job: a user's scancel (it must stay cancelled), a
        # preemption (Slurm requeues the job itself if so configured) or the hard time limit
        # (everything is killed within KillWait; the USR1 grace exists to avoid that case).
        if [[ $GOT_TERM == 1 ]]; then
            echo "distill.sh: stopped by SIGTERM; checkpoint saved, not requeueing." \
                 "Continue with: RUN_DIR=$RUN_DIR sbatch slurm/distill.sh $CONFIG ..."
            exit "$EXIT_REQUEUE"
        fi
        requeue ;;
    *)
        echo "distill.sh: $(date '+%F %T') the ranks failed (exit $rc); see $RUN_DIR/logs/rank*.log" >&2
        exit "$rc" ;;
esac
