#!/bin/bash
# A real two-node Slurm cluster on this machine, to try the sbatch examples before queueing on a cluster (and for the
# test suite). Run as root on Debian/Ubuntu:
#   bash examples/local_slurm.sh start     install slurm-wlm + munge from apt if missing, start, wait until idle
#   export SLURM_CONF=/tmp/tinyllm-slurm/slurm.conf   (start prints this line; sinfo/sbatch/squeue need it)
#   bash examples/local_slurm.sh status    sinfo and squeue of the local cluster
#   bash examples/local_slurm.sh stop      cancel jobs, stop every daemon it started, delete its directory
#
# Everything lives in one directory, LOCAL_SLURM_DIR (default /tmp/tinyllm-slurm): slurm.conf, its own munge key and
# socket (the system's /etc/munge and any running munged are left alone), spool, state, logs and pid files. Nothing
# outside it is written apart from the apt packages, so `stop` leaves the machine as it was.
#
# The two nodes, n1 and n2, are two `slurmd -N` daemons on this host with their own ports (LOCAL_SLURM_PORT, +1, +2),
# CPU only (no GRES: `sbatch --gpus-per-node=0` is accepted), LOCAL_SLURM_CPUS CPUs each (default 2). Node names are
# resolved without touching /etc/hosts: every node has NodeAddr=127.0.0.1, and examples/common.sh's master_addr asks
# `scontrol show node` for the NodeAddr of the job's first node. Cgroup-free plugins (proctrack/linuxproc, task/none)
# so it also works inside containers. No accounting daemon: job results are read with `scontrol show job`, which keeps
# finished jobs for MinJobAge (1 hour here).
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/tinyllm-slurm}"
PORT="${LOCAL_SLURM_PORT:-16817}"
CPUS="${LOCAL_SLURM_CPUS:-2}"
NODES=(n1 n2)
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"
export SLURM_CONF="$CONF"

die() { echo "error: $*" >&2; exit 2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
  echo "installing slurm-wlm and munge from the distribution" >&2
  # (to stderr: stdout is only the SLURM_CONF line). The packages' own services are not used: the daemons below are
  # this script's, with their own config, key and ports.
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
}

write_config() {
  local host
  host="$(hostname -s)"
  mkdir -p "$DIR"/{munge,state,log,run} "${NODES[@]/#/$DIR/spool/}"
  chmod 0755 "$DIR" "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then   # a key of its own; /etc/munge/munge.key is not touched
    (umask 077; head -c 1024 /dev/urandom > "$DIR/munge/munge.key.tmp") && mv "$DIR/munge/munge.key.tmp" "$DIR/munge/munge.key"
  fi
  cat > "$CONF.tmp" <<EOF
# Written by examples/local_slurm.sh: two CPU nodes on this host, state in $DIR.
ClusterName=tinyllm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# no cgroups: works inside containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
PropagateResourceLimits=NONE
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# a job past its time limit gets SIGTERM, then SIGKILL KillWait seconds later; no grace minutes
KillWait=30
OverTimeLimit=0
InactiveLimit=0
MinJobAge=3600
SlurmdTimeout=120
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

pid_of() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }

running() { pid_of "$DIR/run/slurmctld.pid" >/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || die "examples/local_slurm.sh start needs root (it runs slurmd, which starts jobs as their users)"
  if running; then echo "local Slurm cluster already running (SLURM_CONF=$CONF)" >&2; return; fi
  install_packages
  write_config
  munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start (see $DIR/log/munged.log)"
  slurmctld -c -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  for node in "${NODES[@]}"; do
    slurmd -N "$node" -f "$CONF" || die "slurmd -N $node did not start (see $DIR/log/slurmd-$node.log)"
  done
  local deadline=$((SECONDS + 60)) states
  while :; do
    states="$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ')"
    [ "$states" = "n1=idle n2=idle " ] && break
    [ $SECONDS -lt $deadline ] || { stop >/dev/null 2>&1 || true; die "nodes not idle after 60 s ($states); logs in $DIR/log"; }
    sleep 1
  done
  echo "local Slurm cluster up: nodes n1 n2 idle. Use it with:" >&2
  echo "export SLURM_CONF=$CONF"
}

stop() {
  if running; then
    # cancel every job (batch shells included) and give the steps KillWait to end before the daemons go
    scancel --full --quiet --partition=local 2>/dev/null || true
    local deadline=$((SECONDS + 45))
    while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
  fi
  local pidfile pid
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
    pid="$(pid_of "$pidfile")" || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # job step daemons outlive slurmd: end the ones working in this cluster's spool
  for pid in $(pgrep -x slurmstepd || true); do
    if [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$DIR"/* ]] || tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "^$DIR"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  case "$DIR" in /|"") die "refusing to delete LOCAL_SLURM_DIR=$DIR" ;; esac
  rm -rf "$DIR"
  echo "local Slurm cluster stopped" >&2
}

status() {
  running || { echo "local Slurm cluster not running ($DIR)"; return 3; }
  echo "SLURM_CONF=$CONF"
  sinfo -N
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: bash examples/local_slurm.sh start|stop|status" ;;
esac
