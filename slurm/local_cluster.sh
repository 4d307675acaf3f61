#!/usr/bin/env bash
# A throwaway two-node SLURM cluster on this machine, CPU only, for testing slurm/*.sbatch.
#
#   slurm/local_cluster.sh up      # install (first time), configure, start, wait for idle
#   slurm/local_cluster.sh env     # print the export line clients need (SLURM_CONF)
#   slurm/local_cluster.sh status  # sinfo + squeue
#   slurm/local_cluster.sh down    # cancel jobs, stop the daemons (keeps the state folder)
#   slurm/local_cluster.sh purge   # down, then delete the state folder
#
# Everything (config, munge key and socket, spool, state, logs, PID files) lives under
# LOTUS_SLURM_DIR (default /tmp/lotus-slurm); nothing under /etc is touched, so it cannot
# collide with a real SLURM on the host. Clients find the cluster through SLURM_CONF.
# "up" is idempotent: daemons that already run are left alone. Needs root (apt-get, and
# munged/slurmd run as root here).
set -euo pipefail

STATE_DIR=${LOTUS_SLURM_DIR:-/tmp/lotus-slurm}
CONF=$STATE_DIR/slurm.conf
MUNGE_SOCKET=$STATE_DIR/munge/munge.socket
# Private ports, away from SLURM's defaults (6817/6818) in case a real one runs here.
CTLD_PORT=${LOTUS_SLURM_CTLD_PORT:-16817}
NODE_PORT_BASE=${LOTUS_SLURM_NODE_PORT:-16818}
NODES=(lotus1 lotus2)
export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]} (Debian's slurm-wlm pieces)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    mkdir -p "$STATE_DIR"/{munge,state,log,run,spool}
    # munged checks ownership and modes: its socket folder must not be group/other
    # writable and the key must be private.
    chmod 755 "$STATE_DIR/munge"
    if [[ ! -s $STATE_DIR/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >"$STATE_DIR/munge/munge.key"
    fi
    chmod 400 "$STATE_DIR/munge/munge.key"
    local node
    for node in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool/$node"; done

    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    {
        cat <<EOF
# Written by slurm/local_cluster.sh; rewritten on every "up".
ClusterName=lotus-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
# cred_expire: a requeued job may start again 10 s after it ended, not 120 s.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
# pgid tracking kills a job's whole process group when it ends; linuxproc can leave
# orphans behind, and cgroups may not be available in a container.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Both emulated nodes claim all of this host's cores; trust slurm.conf over the hardware.
SlurmdParameters=config_overrides
# Start jobs within a second or two instead of the default scheduling cadence.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
MailProg=/bin/true
# No PMIx here; torchrun does the rank wiring, not MPI.
MpiDefault=none
EOF
        local i=0
        for node in "${NODES[@]}"; do
            echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1" \
                "Port=$((NODE_PORT_BASE + i)) CPUs=$cpus RealMemory=2000 State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES" \
            "MaxTime=INFINITE State=UP OverSubscribe=YES"
    } >"$CONF"
}

# alive NAME: the daemon whose PID file is run/NAME.pid is running. Its command line
# must name our state folder, so a PID reused by another program is never ours to kill.
alive() {
    local pidfile=$STATE_DIR/run/$1.pid pid
    [[ -s $pidfile ]] || return 1
    pid=$(cat "$pidfile")
    [[ -r /proc/$pid/cmdline && $(tr '\0' ' ' <"/proc/$pid/cmdline") == *"$STATE_DIR"* ]]
}

# start NAME CMD...: run a daemon in the foreground of its own session, so it outlives
# this script and its terminal; we write the PID file ourselves from $!.
start() {
    local name=$1
    shift
    if alive "$name"; then
        return
    fi
    setsid "$@" >>"$STATE_DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/run/$name.pid"
}

wait_for() {
    local what=$1 tries=$2
    shift 2
    local i
    for ((i = 0; i < tries; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "timed out waiting for $what; logs are in $STATE_DIR/log"
    return 1
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%t' | sort -u)
    [[ $states == idle ]]
}

no_active_jobs() {
    [[ -z $(squeue -h -t running,completing -o %i) ]]
}

up() {
    install_packages
    write_config
    start munged munged --foreground --force --socket="$MUNGE_SOCKET" \
        --key-file="$STATE_DIR/munge/munge.key" --pid-file="$STATE_DIR/munge/munged.pid" \
        --seed-file="$STATE_DIR/munge/munge.seed" --log-file="$STATE_DIR/log/munged.log"
    wait_for "munged" 40 munge --socket="$MUNGE_SOCKET" -n
    # -c: start from a clean controller state; this is a throwaway test cluster.
    start slurmctld slurmctld -D -c -f "$CONF"
    wait_for "slurmctld" 40 scontrol ping
    local node
    for node in "${NODES[@]}"; do
        start "slurmd-$node" slurmd -D -N "$node" -f "$CONF"
    done
    wait_for "idle nodes (sinfo)" 60 nodes_idle
    log "up: ${NODES[*]} idle; export SLURM_CONF=$CONF"
}

stop() {
    local name=$1 pid i
    alive "$name" || { rm -f "$STATE_DIR/run/$name.pid"; return 0; }
    pid=$(cat "$STATE_DIR/run/$name.pid")
    kill "$pid"
    for ((i = 0; i < 40; i++)); do
        alive "$name" || break
        sleep 0.25
    done
    if alive "$name"; then kill -KILL "$pid"; fi
    rm -f "$STATE_DIR/run/$name.pid"
}

down() {
    [[ -d $STATE_DIR ]] || return 0
    if alive slurmctld; then
        # Cancel jobs through SLURM so slurmd cleans up their processes.
        scancel --quiet --partition=debug || true
        wait_for "jobs to end" 60 no_active_jobs || true
    fi
    local node
    for node in "${NODES[@]}"; do stop "slurmd-$node"; done
    stop slurmctld
    stop munged
    log "down"
}

case ${1:-up} in
    up) up ;;
    down) down ;;
    purge) down; rm -rf "$STATE_DIR"; log "removed $STATE_DIR" ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 [up|down|purge|env|status]" >&2; exit 2 ;;
esac
