# Pieces shared by start.sh / start_multi.sh and stop.sh / stop_multi.sh (sourced, not run).

stop_pidfile() {  # stop_pidfile PIDFILE: TERM, wait up to 10 s, then KILL; the pid file is removed
    local pidfile=$1 pid
    [[ -s $pidfile ]] || { rm -f "$pidfile"; return 0; }
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

slurm_conf_common() {  # the slurm.conf lines both local clusters share (no accounting database, quick requeue)
    cat <<'CONF'
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Look at pending jobs (e.g. a requeued one whose begin time has passed) every 2 s, not 60 s.
SchedulerParameters=sched_interval=2
# Keep finished jobs visible to scontrol for 5 minutes (no accounting database here).
MinJobAge=300
# SIGTERM -> SIGKILL delay on cancel / time limit: the trainer needs it to finish a save.
KillWait=30
CONF
}
