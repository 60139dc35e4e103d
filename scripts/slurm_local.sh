#!/usr/bin/env bash
# A real single-node SLURM (with slurmdbd accounting) on a Debian/Ubuntu machine without systemd.
#
#   scripts/slurm_local.sh install   # apt-get the packages (idempotent; needs root)
#   scripts/slurm_local.sh start     # write configs, start munged, mariadbd, slurmdbd, slurmctld,
#                                    # slurmd under setsid; PIDs go to $STATE/pids (idempotent)
#   scripts/slurm_local.sh stop      # stop exactly those PIDs, in reverse order
#   scripts/slurm_local.sh status    # exit 0 when every daemon is alive and the node is usable
# `start` on a running cluster does nothing: run `stop` first to apply changed knobs.
#
# Knobs (environment):
#   SLURM_LOCAL_STATE   state dir: pid files, daemon logs, DB password  (/var/lib/slurm-local)
#   SLURM_LOCAL_GPUS    number of *fake* GPUs (GRES count only, no device) so that jobs asking for
#                       --gpus can be scheduled on a CPU-only machine; 0 disables      (2)
#   SLURM_LOCAL_MEM_PER_CPU  DefMemPerCPU in MB, so that jobs without --mem do not get the whole
#                       node's memory and block each other                                (1000)
#
# Why accounting (slurmdbd + MariaDB): the snakemake slurm executor checks job status with `sacct`
# whenever the binary exists; without slurmdbd that fails and Snakemake hangs forever. With
# accounting our profile runs unchanged on this box and on a real cluster, and failure reasons /
# requeue history are visible through `sacct` exactly as on a production cluster.
set -euo pipefail

STATE="${SLURM_LOCAL_STATE:-/var/lib/slurm-local}"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
NGPUS="${SLURM_LOCAL_GPUS:-2}"
MEM_PER_CPU="${SLURM_LOCAL_MEM_PER_CPU:-1000}"
CLUSTER=localcluster
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop is the reverse

log() { printf '[slurm_local %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, daemons as slurm/munge)"; }

# ---------------------------------------------------------------- install
packages_present() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
    done
}

cmd_install() {
    need_root
    if packages_present; then
        log "packages already installed"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    local t0=$SECONDS
    # try without `apt-get update` first: it is slow and the lists are usually fresh enough
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"/tmp/slurm_local_apt.log" 2>&1; then
        log "apt-get install failed, running apt-get update and retrying"
        apt-get update -q >>"/tmp/slurm_local_apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"/tmp/slurm_local_apt.log" 2>&1 \
            || die "apt-get install failed, see /tmp/slurm_local_apt.log"
    fi
    log "installed ${PACKAGES[*]} in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- pid helpers
pid_of() { if [[ -f "$PIDS/$1.pid" ]]; then cat "$PIDS/$1.pid"; fi; }

# alive = the recorded PID exists AND still runs the expected binary (PIDs get reused)
alive() {
    local pid
    pid=$(pid_of "$1")
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm")" == "$1" ]]
}

# spawn NAME LOGFILE CMD... : run CMD in its own session, record its PID.
# In a non-interactive shell the background child is no process-group leader, so setsid execs in
# place and $! is the daemon's own PID (setpriv also execs in place).
spawn() {
    local name=$1 logfile=$2
    shift 2
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
    echo $! >"$PIDS/$name.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${limit}s waiting for $what (logs in $LOGS)"
}

# ---------------------------------------------------------------- config
write_configs() {
    local node cpus gres_line=""
    # slurmd -C prints the node's real hardware line: CPUs, sockets, cores, threads, RealMemory
    node=$(slurmd -C | head -1)
    [[ "$node" == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
    node=$(sed -E 's/^NodeName=[^ ]+/NodeName=localhost NodeAddr=127.0.0.1/' <<<"$node")
    cpus=$(grep -oE 'CPUs=[0-9]+' <<<"$node" | cut -d= -f2)
    if ((NGPUS > 0)); then
        gres_line="GresTypes=gpu"
        node="$node Gres=gpu:$NGPUS"
        # gres/gpu drops GPUs without a device file (count-only GRES registers as 0 and the node
        # goes INVAL), so give each fake GPU a character device node aliasing /dev/null (1:3)
        local i
        mkdir -p "$STATE/dev"
        for ((i = 0; i < NGPUS; i++)); do
            [[ -c "$STATE/dev/fakegpu$i" ]] || mknod -m 666 "$STATE/dev/fakegpu$i" c 1 3
        done
        echo "Name=gpu File=$STATE/dev/fakegpu[0-$((NGPUS - 1))]" >/etc/slurm/gres.conf
    else
        rm -f /etc/slurm/gres.conf
    fi
    cat >/etc/slurm/slurm.conf <<EOF
# written by scripts/slurm_local.sh - single node test cluster, do not edit by hand
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may only restart once its old credential has expired (default 120 s); 10 s keeps
# preemption tests short
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# scheduling passes every 5 s instead of 60/30 s: a requeued job (pending until its BeginTime)
# starts promptly instead of waiting for the next pass
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MinJobAge=300
KillWait=5
$gres_line
$node State=UNKNOWN
# both partitions on the one node, so profiles naming a cpu and a gpu partition run unchanged
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE DefMemPerCPU=$MEM_PER_CPU State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE DefMemPerCPU=$MEM_PER_CPU State=UP
EOF
    local pass
    if [[ ! -s "$STATE/dbpass" ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/dbpass")
    fi
    pass=$(cat "$STATE/dbpass")
    (umask 077 && cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$pass
EOF
    )
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf
    log "slurm.conf: $node (${cpus} CPUs, $NGPUS fake GPUs)"
}

# ---------------------------------------------------------------- start / stop / status
node_ready() {
    local st
    st=$(sinfo -h -N -p cpu -o %t 2>/dev/null | head -1)
    [[ "$st" =~ ^(idle|mix|mixed|alloc|allocated)$ ]]   # a trailing * means "not responding"
}

# wait until slurmd has registered; resume a node left DOWN/DRAIN by an earlier unclean stop
wait_node() {
    local st i
    for ((i = 0; i < 150; i++)); do
        node_ready && return 0
        st=$(sinfo -h -N -p cpu -o %t 2>/dev/null | head -1)
        if [[ "$st" =~ ^(down|drain|drng|drained|draining)$ ]]; then
            scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    die "node localhost not usable after 30 s (state '$st', see $LOGS/slurmctld.log and" \
        "'scontrol show node localhost')"
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' first"
    mkdir -p "$PIDS" "$LOGS"
    local d all=1
    for d in "${DAEMONS[@]}"; do alive "$d" || all=0; done
    if ((all)) && node_ready; then
        log "already running"
        return 0
    fi
    # a half-started cluster (e.g. one daemon crashed): restart cleanly
    cmd_stop >/dev/null 2>&1 || true
    local t0=$SECONDS
    mkdir -p /run/munge /run/mysqld /run/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
    chown munge:munge /run/munge
    chown mysql:mysql /run/mysqld
    chown slurm:slurm /run/slurm /var/lib/slurm/slurmctld "$LOGS"
    chmod 1777 "$LOGS"   # slurmctld/slurmdbd log as user slurm, slurmd as root
    write_configs

    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key \
        && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key; }
    spawn munged "$LOGS/munged.out" setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground
    wait_for 10 munged munge -n

    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >"$LOGS/mariadb-install.out" 2>&1
    spawn mariadbd "$LOGS/mariadbd.out" mariadbd --user=mysql --skip-networking \
        --socket=/run/mysqld/mysqld.sock
    wait_for 30 mariadbd mariadb -e "SELECT 1"
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(cat "$STATE/dbpass")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

    spawn slurmdbd "$LOGS/slurmdbd.out" slurmdbd -D
    wait_for 30 slurmdbd sacctmgr -n list cluster
    spawn slurmctld "$LOGS/slurmctld.out" slurmctld -D
    wait_for 30 slurmctld scontrol ping
    # slurmctld registers the cluster itself; make sure (sacct would show nothing otherwise)
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    spawn slurmd "$LOGS/slurmd.out" slurmd -D -N localhost
    wait_node
    log "started in $((SECONDS - t0)) s: $(sinfo -h -o '%P %a %D %t' | tr '\n' ';')"
}

stop_one() {
    local name=$1 pid i
    pid=$(pid_of "$name")
    [[ -n "$pid" ]] || return 0
    if alive "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            alive "$name" || break
            sleep 0.2
        done
        if alive "$name"; then
            log "$name ($pid) ignored SIGTERM for 10 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDS/$name.pid"
}

cmd_stop() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done
    log "stopped"
}

cmd_status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d running pid=$(pid_of "$d")"
        else
            echo "$d not running"
            rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo || rc=3
        node_ready || rc=3
    fi
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
