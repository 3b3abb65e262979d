#!/usr/bin/env bash
# A real single-node SLURM (with accounting, so `sacct` works) on this machine, for tests, CI and
# trying the SLURM path of `python -m dft.train -m ...` on a workstation.
#
#   launch/slurm.sh start    install the packages if missing, start munged, mariadbd, slurmdbd,
#                            slurmctld, slurmd (idempotent: what already runs is left alone)
#   launch/slurm.sh stop     cancel jobs, stop the daemons by the PIDs in their pid files
#   launch/slurm.sh status   one line per daemon, then sinfo; exit 0 only if all run
#
# Everything (configs, state, spool, logs, pid files, the MariaDB datadir, the munge key and socket)
# lives under one folder, $DFT_SLURM_DIR (default /tmp/dft-slurm). The one exception is
# /etc/slurm/slurm.conf, a symlink to $DFT_SLURM_DIR/etc/slurm.conf: sbatch/squeue/sacct read that
# default path. A slurm.conf there that this script did not write is never overwritten.
#
# Needs root (apt-get, /etc/slurm, daemons running as root and munge). No systemd is used; the
# facts behind each setting are in SLURM-NOTES (measured on Debian 12, Slurm 22.05, munge 0.5.15).
#
# Environment:
#   DFT_SLURM_DIR        the folder above                          (/tmp/dft-slurm)
#   DFT_SLURM_CPUS       CPUs the node advertises (may exceed the real count, so a grid runs in
#                        one wave; config_overrides allows it)     (8)
#   DFT_SLURM_GPUS       fake GPUs (GRES backed by /dev/null) so GPU flags can be tested (2)
#   DFT_SLURM_PARTITION  the one partition's name                  (debug)
#   DFT_SLURM_TIMEOUT    seconds to wait for each daemon            (60)
set -euo pipefail

DIR=${DFT_SLURM_DIR:-/tmp/dft-slurm}
CPUS=${DFT_SLURM_CPUS:-8}
GPUS=${DFT_SLURM_GPUS:-2}
PARTITION=${DFT_SLURM_PARTITION:-debug}
WAIT=${DFT_SLURM_TIMEOUT:-60}
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# written by dft launch/slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)

# Daemons use the config in $DIR; clients (and the jobs) read /etc/slurm/slurm.conf -> the same file.
export SLURM_CONF=$DIR/etc/slurm.conf
# slurmdbd's MariaDB client library connects through this socket (mariadbd has no TCP port).
export MYSQL_UNIX_PORT=$DIR/mysql/mysqld.sock

export PATH=$PATH:/usr/sbin:/sbin
T0=${EPOCHREALTIME/[.,]/}
log() {  # elapsed seconds since the script started, then the message
  local us=$(( ${EPOCHREALTIME/[.,]/} - T0 ))
  printf '[slurm.sh %3d.%01ds] %s\n' $(( us / 1000000 )) $(( us % 1000000 / 100000 )) "$*"
}
die() { log "ERROR: $*" >&2; exit 1; }

# --- pid files -------------------------------------------------------------------------------
# name -> pid file and the executable name /proc/<pid>/comm must show (guards against PID reuse)
declare -A PIDFILE=(
  [munged]=$DIR/munge/munged.pid
  [mariadbd]=$DIR/run/mariadbd.pid
  [slurmdbd]=$DIR/run/slurmdbd.pid
  [slurmctld]=$DIR/run/slurmctld.pid
  [slurmd]=$DIR/run/slurmd.pid
)
ORDER=(munged mariadbd slurmdbd slurmctld slurmd)

pid_of() {  # prints the PID of daemon $1 if it runs, else nothing (exit 1)
  local f=${PIDFILE[$1]} pid
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] || return 1
  echo "$pid"
}
running() { pid_of "$1" >/dev/null; }

wait_for() {  # wait_for "<daemon> up" <command...>: poll every 0.2 s up to $WAIT seconds
  local what=$1; shift
  local deadline=$(( $(date +%s) + WAIT ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || return 1
    sleep 0.2
  done
  log "$what (pid $(pid_of "${what%% *}" || echo '?'))"
}

# --- install ---------------------------------------------------------------------------------
install_packages() {
  local missing=0 b
  for b in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db; do
    command -v "$b" >/dev/null || missing=1
  done
  (( missing )) || return 0
  [[ $EUID -eq 0 ]] || die "SLURM packages are missing and installing them needs root: apt-get install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (apt-get, ~20-50 s)"
  export DEBIAN_FRONTEND=noninteractive
  # postinst's "could not start service" messages are harmless: nothing is started without systemd.
  if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$DIR/log/apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update >>"$DIR/log/apt.log" 2>&1 || true
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$DIR/log/apt.log" 2>&1 \
      || { tail -20 "$DIR/log/apt.log" >&2; die "apt-get install failed (log: $DIR/log/apt.log)"; }
  fi
  log "installed ($(slurmctld -V))"
}

# --- configuration ---------------------------------------------------------------------------
write_configs() {
  local node=$1 mem
  # RealMemory must not exceed what slurmd detects, or the node is INVAL.
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  [[ -n $mem ]] || die "slurmd -C did not report RealMemory"
  mkdir -p "$DIR/dev"
  local i
  for (( i = 0; i < GPUS; i++ )); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done

  cat >"$DIR/etc/slurm.conf.new" <<EOF
$MARKER (DFT_SLURM_DIR=$DIR); rewritten on every start
ClusterName=dft
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (2 is rejected): a requeued job restarts after ~7 s instead of ~140 s.
AuthInfo=cred_expire=5,socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers, CI): track processes by process group (linuxproc loses the children
# of a killed batch script: they are reparented to init and keep running), no task binding.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SwitchType=switch/none
# cons_tres is needed for --gpus-per-node; without DefMemPerCPU every job takes the whole node's
# memory and array tasks run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# For slurmdbd the "password" is the munge socket to use (ours is not the default path).
AccountingStoragePass=$DIR/munge/munge.socket
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
InactiveLimit=0
ReturnToService=2
MailProg=/bin/true
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"

  # Fake GPUs: File= entries are needed (Count= alone makes the node INVAL); /dev/null backs them.
  {
    echo "$MARKER"
    echo "AutoDetect=off"
    (( GPUS > 0 )) && echo "NodeName=$node Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]"
  } >"$DIR/etc/gres.conf"

  # slurmdbd refuses a config readable by others.
  ( umask 077; cat >"$DIR/etc/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$DIR/etc/slurmdbd.conf"

  # Clients read the default path: point it at our file, unless someone else's config is there.
  mkdir -p /etc/slurm
  if [[ -e $ETC_CONF || -L $ETC_CONF ]] && ! grep -q "^$MARKER" "$ETC_CONF" 2>/dev/null \
     && [[ ! -L $ETC_CONF ]]; then
    die "$ETC_CONF exists and was not written by this script; move it away first"
  fi
  ln -sfn "$DIR/etc/slurm.conf" "$ETC_CONF"
}

# --- daemons ---------------------------------------------------------------------------------
start_munge() {
  running munged && { log "munged already running (pid $(pid_of munged))"; return; }
  install -d -o munge -g munge -m 0755 "$DIR/munge"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$DIR/munge/munge.key"; chmod 0400 "$DIR/munge/munge.key"
  rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
  # munged must not run as root; it daemonises itself and writes its pid file.
  runuser -u munge -- munged 9>&- --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="${PIDFILE[munged]}" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" \
    || die "munged failed to start (log: $DIR/munge/munged.log)"
  wait_for "munged up" \
    bash -c "munge -n --socket='$DIR/munge/munge.socket' | unmunge --socket='$DIR/munge/munge.socket'" \
    || die "munged did not answer (log: $DIR/munge/munged.log)"
}

start_mariadb() {
  running mariadbd && { log "mariadbd already running (pid $(pid_of mariadbd))"; return; }
  if [[ ! -d $DIR/mysql/mysql ]]; then
    rm -rf "$DIR/mysql"; mkdir -p "$DIR/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" \
      --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (log: $DIR/log/mariadb-install.log)"
    log "MariaDB datadir initialised"
  fi
  # No TCP port: only the unix socket in $DIR (slurmdbd finds it through MYSQL_UNIX_PORT).
  setsid mariadbd 9>&- --no-defaults --user=root --datadir="$DIR/mysql" --socket="$MYSQL_UNIX_PORT" \
    --skip-networking --pid-file="${PIDFILE[mariadbd]}" --log-error="$DIR/log/mariadbd.log" \
    --innodb-buffer-pool-size=32M --performance-schema=OFF </dev/null >/dev/null 2>&1 &
  wait_for "mariadbd up" \
    mariadb --no-defaults --socket="$MYSQL_UNIX_PORT" -u root -e 'select 1' \
    || die "mariadbd did not answer (log: $DIR/log/mariadbd.log)"
}

start_slurmdbd() {
  running slurmdbd && { log "slurmdbd already running (pid $(pid_of slurmdbd))"; return; }
  slurmdbd 9>&- || die "slurmdbd failed to start (log: $DIR/log/slurmdbd.log)"
  wait_for "slurmdbd up" \
    bash -c "timeout 5 bash -c '</dev/tcp/127.0.0.1/6819'" \
    || die "slurmdbd did not listen on 6819 (log: $DIR/log/slurmdbd.log)"
}

start_slurmctld() {
  if ! running slurmctld; then
    slurmctld 9>&- || die "slurmctld failed to start (log: $DIR/log/slurmctld.log)"
  else
    log "slurmctld already running (pid $(pid_of slurmctld))"
  fi
  wait_for "slurmctld up" bash -c 'scontrol ping | grep -q UP' \
    || die "slurmctld not UP (log: $DIR/log/slurmctld.log)"
}

node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -1; }

start_slurmd() {
  local node=$1
  if ! running slurmd; then
    slurmd 9>&- -N "$node" || die "slurmd failed to start (log: $DIR/log/slurmd.log)"
  else
    log "slurmd already running (pid $(pid_of slurmd))"
  fi
  local deadline=$(( $(date +%s) + WAIT )) st
  while :; do
    st=$(node_state "$node")
    case $st in
      idle*|mixed*|allocated*|completing*) break ;;
      down*|drain*|fail*)  # e.g. left down by a previous unclean stop
        scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    (( $(date +%s) < deadline )) || die "node $node is '${st:-unknown}', not idle (log: $DIR/log/slurmd.log; scontrol show node $node)"
    sleep 0.2
  done
  log "slurmd up (pid $(pid_of slurmd)), node $node is $st"
}

cmd_start() {
  if [[ $EUID -ne 0 ]]; then
    all_up && { log "already running"; return 0; }
    die "start needs root"
  fi
  mkdir -p "$DIR"/{etc,state,spool,log,run}
  # Concurrent starts (parallel test sessions) wait for each other. Daemons are started with
  # fd 9 closed (9>&-), or they would hold this lock for their whole life.
  exec 9>"$DIR/.lock"; flock 9
  if all_up; then log "already running"; cmd_status; return 0; fi
  install_packages
  local node; node=$(hostname -s)
  write_configs "$node"
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd "$node"
  log "SLURM ready: node $node, partition $PARTITION, $CPUS CPUs, gpu:$GPUS (fake), folder $DIR"
}

# --- stop ------------------------------------------------------------------------------------
stop_daemons() {  # stop_daemons <name...>: SIGTERM by pid file, wait, SIGKILL what is left
  local name pid pids=() names=()
  for name in "$@"; do
    if pid=$(pid_of "$name"); then
      kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); names+=("$name")
    fi
  done
  (( ${#pids[@]} )) || return 0
  local deadline=$(( $(date +%s) + 20 )) p alive
  while :; do
    alive=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    (( ${#alive[@]} )) || break
    if (( $(date +%s) >= deadline )); then
      log "SIGKILL ${alive[*]} (did not stop on SIGTERM)"; kill -KILL "${alive[@]}" 2>/dev/null || true; break
    fi
    sleep 0.1
  done
  log "stopped ${names[*]}"
}

cmd_stop() {
  [[ -d $DIR ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
  exec 9>"$DIR/.lock"; flock 9
  if running slurmctld && [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]]; then
    # Cancel every job (root may) and wait for them to end, so no slurmstepd outlives slurmd.
    timeout 10 scancel --quiet --partition="$PARTITION" 2>/dev/null || true
    local deadline=$(( $(date +%s) + 30 ))
    while [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && (( $(date +%s) < deadline )); do sleep 0.5; done
    log "jobs cancelled"
  fi
  stop_daemons slurmd slurmctld
  stop_daemons slurmdbd mariadbd
  stop_daemons munged
  log "all stopped (state kept in $DIR; rm -rf it for a clean slate)"
}

# --- status ----------------------------------------------------------------------------------
all_up() {
  local name
  for name in "${ORDER[@]}"; do running "$name" || return 1; done
  timeout 10 scontrol ping 2>/dev/null | grep -q UP || return 1
  case $(node_state "$(hostname -s)") in idle*|mixed*|allocated*|completing*) return 0 ;; esac
  return 1
}

cmd_status() {
  local name ok=0
  for name in "${ORDER[@]}"; do
    if pid=$(pid_of "$name"); then printf '%-10s running (pid %s)\n' "$name" "$pid"
    else printf '%-10s stopped\n' "$name"; ok=1; fi
  done
  if running slurmctld; then timeout 10 sinfo -N -o '%N %P %T %c %m %G' || ok=1; fi
  return $ok
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  *) echo "usage: $0 start|stop|status|restart   (folder: \$DFT_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
