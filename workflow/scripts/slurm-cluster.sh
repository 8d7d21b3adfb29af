#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the SLURM profile and the submitit
# launcher without a real cluster (tests/test_slurm.py uses it).
#   workflow/scripts/slurm-cluster.sh install  # the Debian packages, if missing (as root)
#   workflow/scripts/slurm-cluster.sh start    # install, configure, start; waits for the node
#   workflow/scripts/slurm-cluster.sh status   # sinfo and squeue
#   workflow/scripts/slurm-cluster.sh stop     # cancel its jobs and stop the daemons
# The node is this machine (hostname -s) with its real CPUs and memory, in every partition of
# SLURM_PARTITIONS (the first is the default; the SLURM profile's partition names must be among them).
# No accounting: sacct does not work here, squeue does (MinJobAge keeps finished jobs listed).
set -euo pipefail

PARTITIONS=${SLURM_PARTITIONS:-"cpu gpu"}
CONF=/etc/slurm/slurm.conf
MARK="# single-node cluster of workflow/scripts/slurm-cluster.sh"
NODE=$(hostname -s)

die() { echo "slurm-cluster: $*" >&2; exit 1; }

install() {
  local missing=()
  for cmd in slurmctld slurmd sinfo munged; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; installing them needs root"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  echo "slurm-cluster: installing slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  fi
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: not touching a real cluster's config"
  fi
  # CPUs, sockets, cores and memory as slurmd itself detects them
  local node_line
  node_line=$(slurmd -C | head -1)
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  {
    echo "$MARK"
    echo "ClusterName=local"
    echo "SlurmctldHost=$NODE"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core_Memory"
    echo "DefMemPerCPU=1000"
    echo "SchedulerType=sched/backfill"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "MinJobAge=86400"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    echo "StateSaveLocation=/var/spool/slurmctld"
    echo "SlurmdSpoolDir=/var/spool/slurmd"
    echo "SlurmctldPidFile=/run/slurmctld.pid"
    echo "SlurmdPidFile=/run/slurmd.pid"
    echo "SlurmctldLogFile=/var/log/slurm/slurmctld.log"
    echo "SlurmdLogFile=/var/log/slurm/slurmd.log"
    echo "$node_line State=UNKNOWN"
    local default=YES
    for p in $PARTITIONS; do
      echo "PartitionName=$p Nodes=$NODE Default=$default MaxTime=INFINITE State=UP"
      default=NO
    done
  } >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

running() { pgrep -x "$1" >/dev/null; }

start() {
  install
  start_munge
  write_conf
  running slurmctld || slurmctld
  running slurmd || slurmd
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mix|alloc) echo "slurm-cluster: node $NODE is $state (partitions: $PARTITIONS)"; return ;;
      down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "node $NODE did not come up (state '${state:-none}'); see /var/log/slurm/"
}

stop() {
  if running slurmctld; then
    squeue -h -o %i | xargs -r scancel
    scontrol shutdown
  fi
  for _ in $(seq 30); do
    running slurmctld || running slurmd || break
    sleep 1
  done
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  echo "slurm-cluster: stopped"
}

status() {
  running slurmctld || die "slurmctld is not running"
  sinfo
  squeue
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 install|start|stop|status" ;;
esac
