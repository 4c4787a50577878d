#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests that submit real jobs with sbatch/srun.
#
#   launch/slurm-local-cluster.sh start    install slurm-wlm + munge if missing, write slurm.conf,
#                                          start munged, slurmctld, slurmd; wait for the node to be idle
#   launch/slurm-local-cluster.sh stop     stop the three daemons
#   launch/slurm-local-cluster.sh status   daemons, sinfo, squeue (exit 1 when something is down)
#   launch/slurm-local-cluster.sh restart  stop + start (needed to apply changed settings: start is a
#                                          no-op while the cluster is up)
#
# Needs root (apt-get, daemons). No systemd: the daemons are started directly and daemonize
# themselves; logs go to $SLURM_LOCAL_LOG_DIR (default /var/log/slurm-local), munged's to
# /var/log/munge. The config is written to /etc/slurm/slurm.conf, the path the Debian client tools
# read by default, so sbatch/srun/squeue need no SLURM_CONF. `start` returns once a one-task probe
# job (`srun true`) has run, i.e. munge, slurmctld, slurmd and step launch all work.
#
# Environment: SLURM_LOCAL_CLUSTER_NAME (clt-local), SLURM_LOCAL_CPUS (declare this many CPUs
# instead of the real count, e.g. 4 tasks on a 2-CPU box), SLURM_LOCAL_CRED_EXPIRE (10 s),
# SLURM_LOCAL_LOG_DIR, SLURM_LOCAL_WAIT_S (60).
#
# Choices that matter:
#   - NodeAddr and the SlurmctldHost address are what `hostname` resolves to, else 127.0.0.1, so a
#     sandbox whose hostname is not in /etc/hosts still works; the node name is `hostname -s`.
#   - proctrack/linuxproc + task/none, no cgroup.conf, no accounting: nothing needs cgroups/systemd.
#   - select/cons_tres with CR_CPU: jobs consume CPUs only (memory is not a consumable, so a job
#     that gives no --mem does not take the whole node).
#   - AuthInfo=cred_expire=10: SLURM holds a requeued job PENDING (Reason=BeginTime) for
#     cred_expire seconds, 120 by default; with 10 it runs again ~11 s after `scontrol requeue`.
#     (`scontrol update jobid=J starttime=now` right after the requeue starts it at once.)
#   - SchedulerParameters with 2 s sched/backfill intervals, so that pass happens promptly.
#   - EnforcePartLimits=ALL: a job asking for more CPUs than the node has is refused by sbatch
#     instead of pending forever (Reason=PartitionConfig).
#   - JobRequeue=1, ReturnToService=2, SlurmdTimeout=60.
set -euo pipefail

CLUSTER_NAME="${SLURM_LOCAL_CLUSTER_NAME:-clt-local}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR="${SLURM_LOCAL_LOG_DIR:-/var/log/slurm-local}"
RUN_DIR=/run/slurm-local
STATE_DIR=/var/spool/slurm-local/ctld
SPOOL_DIR=/var/spool/slurm-local/d
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"

log() { echo "[slurm-local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install_if_missing() {
  local missing=0 c
  for c in slurmctld slurmd sbatch srun sinfo scontrol munged mungekey; do
    if ! command -v "$c" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$c" ]; then missing=1; fi
  done
  [ "$missing" = 0 ] && return 0
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$LOG_DIR/apt.log" 2>&1; then
    apt-get update -q >>"$LOG_DIR/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$LOG_DIR/apt.log" 2>&1 \
      || die "apt-get install failed, see $LOG_DIR/apt.log"
  fi
}

# The name/address pair this node is known by. The hostname may not resolve in a sandbox.
node_name() { hostname -s 2>/dev/null || hostname; }
node_addr() {
  local a
  a="$(getent hosts "$(hostname)" 2>/dev/null | awk 'NR==1{print $1}')"
  if [ -n "$a" ]; then echo "$a"; else echo 127.0.0.1; fi
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local name addr hw
  name="$(node_name)"
  addr="$(node_addr)"
  # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  hw="$(/usr/sbin/slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')"
  [ -n "$hw" ] || die "slurmd -C printed nothing"
  local overrides=""
  if [ -n "${SLURM_LOCAL_CPUS:-}" ]; then
    # Pretend the node has more (or fewer) CPUs than it has, e.g. to run 4 tasks on a 2-CPU box
    # without --overcommit; config_overrides stops slurmd from draining the node for the mismatch.
    hw="CPUs=$SLURM_LOCAL_CPUS $(echo "$hw" | grep -o 'RealMemory=[0-9]*')"
    overrides="SlurmdParameters=config_overrides"
  fi
  mkdir -p "$CONF_DIR"
  cat >"$CONF.tmp" <<EOF
# Written by launch/slurm-local-cluster.sh: a one-node cluster for local tests.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$name($addr)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Reject at submit a job that can never run here (e.g. more CPUs than the node has) instead of
# leaving it PENDING forever with Reason=PartitionConfig.
EnforcePartLimits=ALL
JobRequeue=1
ReturnToService=2
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
$overrides
# The node: this host, its CPUs and memory as \`slurmd -C\` reports them.
NodeName=$name NodeAddr=$addr NodeHostname=$(hostname) $hw State=UNKNOWN
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if pid_alive "$MUNGE_SOCKET_DIR/munged.pid" && munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge /etc/munge
  chown munge:munge "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge /etc/munge
  chmod 0755 "$MUNGE_SOCKET_DIR"; chmod 0700 /etc/munge /var/log/munge; chmod 0711 /var/lib/munge
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile="$MUNGE_KEY" --force
    else dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none; fi
  fi
  chown munge:munge "$MUNGE_KEY"; chmod 0400 "$MUNGE_KEY"
  rm -f "$MUNGE_SOCKET_DIR/munged.pid"
  # munged refuses to run as root; it daemonizes itself.
  runuser -u munge -- /usr/sbin/munged --force \
    --log-file=/var/log/munge/munged.log --pid-file="$MUNGE_SOCKET_DIR/munged.pid" --origin="$(node_addr)" \
    || die "munged failed to start, see /var/log/munge/munged.log"
  local i
  for i in $(seq 1 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munge does not answer, see /var/log/munge/munged.log"
}

node_state() { sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -1; }

cluster_up() {
  pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" || return 1
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

cmd_start() {
  need_root
  mkdir -p "$LOG_DIR" "$RUN_DIR" "$STATE_DIR" "$SPOOL_DIR"
  install_if_missing
  if [ -f "$CONF" ] && cluster_up; then
    log "already running: node $(node_name) is $(node_state)"; return 0
  fi
  local t0=$SECONDS
  write_conf
  start_munge
  if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
    /usr/sbin/slurmctld -f "$CONF" || die "slurmctld failed, see $LOG_DIR/slurmctld.log"
  else
    scontrol reconfigure >/dev/null 2>&1 || true
  fi
  if ! pid_alive "$RUN_DIR/slurmd.pid"; then
    /usr/sbin/slurmd -f "$CONF" -N "$(node_name)" || die "slurmd failed, see $LOG_DIR/slurmd.log"
  fi
  local i st=""
  for i in $(seq 1 $((WAIT_S * 2))); do
    st="$(node_state)"
    case "$st" in
      # exact names: a trailing '*' (idle*) means slurmd has not registered / is not responding
      idle|mixed|allocated)
        # After a restart slurmctld restores the node as idle from its saved state before slurmd has
        # registered; a one-task job proves munge, slurmctld, slurmd and step launch all work.
        if timeout 30 srun --quiet -N1 -n1 -t1 -J slurm-local-probe true >>"$LOG_DIR/probe.log" 2>&1; then
          log "up in $((SECONDS - t0)) s: node $(node_name) is $st"; return 0
        fi ;;
      drain*|down*|fail*)
        # A node left DOWN/DRAINED by an earlier run (e.g. killed mid-job): bring it back.
        scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  log "node did not become idle (state '${st:-?}'); tail of logs:"
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  exit 1
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local pid i
  [ -f "$2" ] || return 0
  pid="$(cat "$2")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$1 ($pid) did not exit, killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$2"
}

cmd_stop() {
  need_root
  stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
  stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
  stop_pidfile munged "$MUNGE_SOCKET_DIR/munged.pid"
  log "stopped"
}

cmd_status() {
  local rc=0
  for d in slurmctld slurmd; do
    if pid_alive "$RUN_DIR/$d.pid"; then echo "$d: running (pid $(cat "$RUN_DIR/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  if pid_alive "$MUNGE_SOCKET_DIR/munged.pid"; then echo "munged: running"; else echo "munged: stopped"; rc=1; fi
  if [ "$rc" = 0 ]; then sinfo -N -l || rc=1; squeue || rc=1; fi
  return "$rc"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  *) echo "usage: $0 {start|stop|status|restart}" >&2; exit 2 ;;
esac
