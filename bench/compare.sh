#!/usr/bin/env bash
# compare.sh - pgbench side by side: direct PostgreSQL vs pgbouncer vs arbitrary proxies.
#
# Runs every (workload x protocol x clients) config against every target, interleaved
# within a config (round 1: A B C, round 2: C B A, round 3: A B C, ...), then prints
# median TPS / average latency / min-max and the ratio target/direct as markdown and
# writes CSV files.
#
# Vendored into the Tandem repo (bench/) from the company benchmark harness
# (/work/shared/bench/compare.sh, a.k.a. tools/bench/compare.sh, 2026-11-21) so that
# bench/bench.sh works in a clone without /work/shared. Local changes (marked "tandem:"):
#   * -n NAME: cluster name (was hard-coded 'cmp').
#   * --target-pid LABEL=PID: the process serving target LABEL (implies --proxy-pid PID).
#     pgbouncer targets get theirs from the pgbouncer pidfile automatically.
#   * every run records the target process's CPU time (utime+stime from /proc/PID/stat,
#     sampled just before and just after pgbench): runs.csv gains target_cpu_ticks and
#     cpu_s_per_10k_xacts (before 'error'), summary.csv gains cpu_s_per_10k_median (last
#     column), and the long markdown table a 'CPU s/10k tx' column.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
export BENCH_DIR

DURATION=15
ROUNDS=2
CLIENTS=1,8,32
WORKLOADS=select,tpcb
PROTOCOLS=simple,extended,prepared
SCALE=10
THREADS=auto
PG_PORT=45432
CLUSTER="cmp"
EXTERNAL=0
PGB_PORT=46432
PGB_MODES=session,transaction
DBNAME=bench
DBUSER=postgres
OUTDIR=
PIN_CLIENT=
PIN_SERVER=
PIN_POOLER=
PROXY_PIDS=()
CHECKPOINT=1
QUIET_WAIT=10
QUIET_PCT=15
MAX_OTHER=30
RETRIES=2
REINIT=0
KEEP=0
PROXIES=()
TARGET_PIDS=()   # tandem: LABEL=PID

usage() {
  cat <<EOF
Usage: $PROG [options] [[LABEL=]HOST:PORT ...]

Each positional HOST:PORT is an extra proxy target (e.g. myproxy=127.0.0.1:6544);
it must forward to the same PostgreSQL server. Without one, only direct and
pgbouncer are measured.

Targets:
  -p PORT        PostgreSQL port (default $PG_PORT). Cluster '$CLUSTER' is started there with
                 pgcluster.sh (refuses if a foreign server holds the port) and stopped on
                 exit unless it was already running.
  -n NAME        cluster name under \$BENCH_DIR (default $CLUSTER); pgbouncer instances are
                 named NAME-MODE
  -E             use an existing server on 127.0.0.1:PORT instead (never started/stopped;
                 creates DB and pgbench tables in it)
  -b MODES       pgbouncer pool modes, comma list or 'none' (default $PGB_MODES)
  -B PORT        first pgbouncer port, +1 per mode (default $PGB_PORT)
  -d DB          database (default $DBNAME; created if missing), -U USER (default $DBUSER)
Matrix:
  -w LIST        workloads: select (pgbench -S), tpcb (default builtin)   (default $WORKLOADS)
  -M LIST        protocols: simple,extended,prepared                     (default $PROTOCOLS)
  -c LIST        client counts                                           (default $CLIENTS)
  -T SECONDS     duration of each run                                    (default $DURATION)
  -r ROUNDS      interleaved rounds per config, >= 1                     (default $ROUNDS)
  -s SCALE       pgbench scale factor                                    (default $SCALE)
  -j THREADS     pgbench threads, or 'auto' = min(clients, nproc)        (default $THREADS)
  -i             force pgbench re-initialisation
Pinning (taskset CPU lists, e.g. 0 or 1 or 0-1; default: no pinning):
  --pin-client CPUS   run pgbench under taskset -c CPUS
  --pin-server CPUS   pin the postmaster and its children (new backends inherit)
  --pin-pooler CPUS   pin the pgbouncer daemons and every --proxy-pid PID
  --proxy-pid PID     pid of your proxy process (repeatable): pinned with --pin-pooler and
                      its CPU time counted as 'ours' (not 'other') in the noise accounting
  --target-pid LABEL=PID  the process serving target LABEL (repeatable; implies --proxy-pid
                      PID): its utime+stime over each run of LABEL is recorded as
                      target_cpu_ticks / cpu_s_per_10k_xacts. pgbouncer targets are
                      measured automatically (pid from the pgbouncer pidfile).
  Affinities changed here are reset to all CPUs on exit.
Noise control (this box may be shared):
  --quiet-wait SECS   before each run wait up to SECS for the machine to be idle
                      (< --quiet-pct % busy over 0.5 s) (default $QUIET_WAIT; 0 = off)
  --quiet-pct PCT     idle threshold (default $QUIET_PCT)
  --max-other PCT     a run whose other_cpu_pct exceeds PCT is repeated, up to --retries N
                      times; the first quiet try (else the least noisy) is kept, the rest are
                      logged as 'noisy' and excluded (defaults $MAX_OTHER and $RETRIES; 0 = off)
  Every run records other_cpu_pct: CPU used during the run by processes that are not
  pgbench, the cluster, pgbouncer or --proxy-pid (100 = one whole core of 'noise'), and
  steal_pct (hypervisor steal). Runs with high other_cpu_pct are suspect.
Other:
  -o DIR         output dir (default \$BENCH_DIR/results/compare-<timestamp>)
  --no-checkpoint  skip the CHECKPOINT issued (directly) before every run
  --keep         leave the cluster and pgbouncers running on exit
  -h             this help

Before each run the script vacuums pgbench_branches/tellers and truncates
pgbench_history over a direct connection (pgbench runs with -n), then CHECKPOINTs.
Output: markdown on stdout; DIR/runs.csv (every run), DIR/summary.csv, DIR/summary.md,
DIR/logs/*.log (raw pgbench output). Progress goes to stderr.

Environment: BENCH_DIR (default /tmp/bench), PG_BINDIR, PGB_POOL_SIZE (default 40).
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1; then
    local d; d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n "$d" && -x "$d/pgbench" ]]; then echo "$d"; return; fi
  fi
  if command -v pgbench >/dev/null 2>&1; then dirname "$(command -v pgbench)"; return; fi
  die "cannot find pgbench (set PG_BINDIR)"
}

# ---------------------------------------------------------------- arguments
while [[ $# -gt 0 ]]; do
  case "$1" in
    -p) PG_PORT=$2; shift 2 ;;
    -n) CLUSTER=$2; shift 2 ;;
    -E) EXTERNAL=1; shift ;;
    -b) PGB_MODES=$2; shift 2 ;;
    -B) PGB_PORT=$2; shift 2 ;;
    -d) DBNAME=$2; shift 2 ;;
    -U) DBUSER=$2; shift 2 ;;
    -w) WORKLOADS=$2; shift 2 ;;
    -M) PROTOCOLS=$2; shift 2 ;;
    -c) CLIENTS=$2; shift 2 ;;
    -T) DURATION=$2; shift 2 ;;
    -r) ROUNDS=$2; shift 2 ;;
    -s) SCALE=$2; shift 2 ;;
    -j) THREADS=$2; shift 2 ;;
    -i) REINIT=1; shift ;;
    -o) OUTDIR=$2; shift 2 ;;
    --pin-client) PIN_CLIENT=$2; shift 2 ;;
    --pin-server) PIN_SERVER=$2; shift 2 ;;
    --pin-pooler) PIN_POOLER=$2; shift 2 ;;
    --proxy-pid) PROXY_PIDS+=("$2"); shift 2 ;;
    --target-pid)
      [[ "$2" =~ ^[^=]+=[0-9]+$ ]] || die "bad --target-pid '$2' (want LABEL=PID)"
      TARGET_PIDS+=("$2"); PROXY_PIDS+=("${2##*=}"); shift 2 ;;
    --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
    --quiet-pct) QUIET_PCT=$2; shift 2 ;;
    --max-other) MAX_OTHER=$2; shift 2 ;;
    --retries) RETRIES=$2; shift 2 ;;
    --no-checkpoint) CHECKPOINT=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; PROXIES+=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) PROXIES+=("$1"); shift ;;
  esac
done

[[ "$DURATION" =~ ^[0-9]+$ && "$DURATION" -ge 1 ]] || die "bad -T"
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -ge 1 ]] || die "bad -r"
[[ "$SCALE" =~ ^[0-9]+$ ]] || die "bad -s"
for v in QUIET_WAIT QUIET_PCT MAX_OTHER RETRIES; do [[ "${!v}" =~ ^[0-9]+$ ]] || die "bad value for $v: ${!v}"; done
[[ "$THREADS" == auto || "$THREADS" =~ ^[0-9]+$ ]] || die "bad -j"
IFS=, read -r -a WL_LIST <<<"$WORKLOADS"
IFS=, read -r -a PROTO_LIST <<<"$PROTOCOLS"
IFS=, read -r -a CLIENT_LIST <<<"$CLIENTS"
for w in "${WL_LIST[@]}"; do [[ "$w" == select || "$w" == tpcb ]] || die "bad workload '$w'"; done
for m in "${PROTO_LIST[@]}"; do [[ "$m" =~ ^(simple|extended|prepared)$ ]] || die "bad protocol '$m'"; done
for c in "${CLIENT_LIST[@]}"; do [[ "$c" =~ ^[0-9]+$ && "$c" -ge 1 ]] || die "bad client count '$c'"; done

BINDIR=$(find_bindir)
PSQL="$BINDIR/psql"
PGBENCH="$BINDIR/pgbench"
NCPU=$(nproc)
OUTDIR=${OUTDIR:-$BENCH_DIR/results/compare-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR/logs"
RUNS_CSV="$OUTDIR/runs.csv"
SUMMARY_CSV="$OUTDIR/summary.csv"
SUMMARY_MD="$OUTDIR/summary.md"

# ---------------------------------------------------------------- cleanup
STARTED_CLUSTER=0
STARTED_PGB=()
PINNED_PIDS=()
cleanup() {
  local rc=$?
  set +e
  if [[ ${#PINNED_PIDS[@]} -gt 0 ]]; then
    local p
    for p in "${PINNED_PIDS[@]}"; do
      taskset -a -p -c "0-$((NCPU - 1))" "$p" >/dev/null 2>&1
    done
  fi
  if [[ $KEEP -eq 0 ]]; then
    local n
    for n in "${STARTED_PGB[@]}"; do "$HERE/pgbouncer.sh" stop "$n" >&2; done
    if [[ $STARTED_CLUSTER -eq 1 ]]; then "$HERE/pgcluster.sh" stop "$CLUSTER" >&2; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

q_direct() {  # SQL... -> each statement sent separately on one direct connection
  local a=() s
  for s in "$@"; do a+=(-c "$s"); done
  "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$DBUSER" -d "$DBNAME" -At "${a[@]}"
}

# ---------------------------------------------------------------- setup
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}
if [[ $EXTERNAL -eq 1 ]]; then
  "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 5 || die "-E: no server on 127.0.0.1:$PG_PORT"
else
  if ! "$HERE/pgcluster.sh" status "$CLUSTER" >/dev/null 2>&1; then STARTED_CLUSTER=1; fi
  "$HERE/pgcluster.sh" start "$CLUSTER" "$PG_PORT" >&2
fi

ndb=$("$PSQL" -X -w -h 127.0.0.1 -p "$PG_PORT" -U "$DBUSER" -d postgres -Atc \
  "select count(*) from pg_database where datname = '$DBNAME'") || die "cannot connect to 127.0.0.1:$PG_PORT as $DBUSER"
if [[ "$ndb" == 0 ]]; then
  "$PSQL" -X -w -q -h 127.0.0.1 -p "$PG_PORT" -U "$DBUSER" -d postgres -c "create database \"$DBNAME\"" >&2
fi

cur_scale=$(q_direct "select count(*) from pgbench_branches" 2>/dev/null || echo 0)
if [[ $REINIT -eq 1 || "$cur_scale" != "$SCALE" ]]; then
  log "pgbench -i -s $SCALE (current: $cur_scale)"
  "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$DBUSER" "$DBNAME" >"$OUTDIR/logs/init.log" 2>&1 \
    || { cat "$OUTDIR/logs/init.log" >&2; die "pgbench -i failed"; }
fi
q_direct "vacuum analyze" >/dev/null

# targets: parallel arrays
T_NAME=(direct)
T_HOST=(127.0.0.1)
T_PORT=("$PG_PORT")
T_PID=("")   # tandem: process whose CPU is charged to the target ('' = not measured)
if [[ "$PGB_MODES" != none && -n "$PGB_MODES" ]]; then
  IFS=, read -r -a modes <<<"$PGB_MODES"
  i=0
  for mode in "${modes[@]}"; do
    inst="$CLUSTER-$mode"
    port=$((PGB_PORT + i))
    i=$((i + 1))
    if ! "$HERE/pgbouncer.sh" status "$inst" >/dev/null 2>&1; then STARTED_PGB+=("$inst"); fi
    "$HERE/pgbouncer.sh" start "$inst" "$port" "$PG_PORT" "$mode" >&2
    T_NAME+=("pgbouncer-$mode"); T_HOST+=(127.0.0.1); T_PORT+=("$port")
    pf="$BENCH_DIR/pgbouncer-$inst/pgbouncer.pid"
    pgb_pid=$(head -n1 "$pf" 2>/dev/null || true)
    [[ "$pgb_pid" =~ ^[0-9]+$ && -r /proc/$pgb_pid/stat ]] || die "cannot find pgbouncer pid ($pf)"
    T_PID+=("$pgb_pid")
  done
fi
for p in "${PROXIES[@]}"; do
  label=proxy
  hp=$p
  if [[ "$p" == *=* ]]; then label=${p%%=*}; hp=${p#*=}; fi
  host=${hp%:*}; port=${hp##*:}
  [[ "$port" =~ ^[0-9]+$ && -n "$host" ]] || die "bad proxy '$p' (want [LABEL=]HOST:PORT)"
  if ! "$PSQL" -X -w -h "$host" -p "$port" -U "$DBUSER" -d "$DBNAME" -Atc 'select 1' >/dev/null 2>&1; then
    die "proxy $label at $host:$port does not answer 'select 1' for db $DBNAME"
  fi
  T_NAME+=("$label"); T_HOST+=("$host"); T_PORT+=("$port")
  tpid=
  for tp in "${TARGET_PIDS[@]}"; do
    if [[ "${tp%%=*}" == "$label" ]]; then tpid=${tp##*=}; fi
  done
  if [[ -n "$tpid" && ! -r /proc/$tpid/stat ]]; then die "--target-pid $label=$tpid: no such process"; fi
  T_PID+=("$tpid")
done
NT=${#T_NAME[@]}
for tp in "${TARGET_PIDS[@]}"; do
  found=0
  for n in "${T_NAME[@]}"; do if [[ "$n" == "${tp%%=*}" ]]; then found=1; fi; done
  [[ $found -eq 1 ]] || die "--target-pid $tp: no target labelled '${tp%%=*}'"
done

# ---------------------------------------------------------------- our processes
# postmaster = parent of the checkpointer (works for clusters we did not start too)
aux=$(q_direct "select pid from pg_stat_activity where backend_type = 'checkpointer'")
PM_PID=
if [[ -n "$aux" && -r /proc/$aux/stat ]]; then PM_PID=$(ps -o ppid= -p "$aux" | tr -d ' '); fi
POOLER_PIDLIST=()
for n in "${T_NAME[@]}"; do
  [[ "$n" == pgbouncer-* ]] || continue
  pf="$BENCH_DIR/pgbouncer-$CLUSTER-${n#pgbouncer-}/pgbouncer.pid"
  if [[ -s "$pf" ]]; then POOLER_PIDLIST+=("$(head -n1 "$pf")"); fi
done
POOLER_PIDLIST+=("${PROXY_PIDS[@]}")
OUR_ROOTS=("${POOLER_PIDLIST[@]}")
if [[ -n "$PM_PID" ]]; then OUR_ROOTS+=("$PM_PID"); else log "warning: postmaster pid unknown (remote server?); its CPU counts as 'other'"; fi
if [[ ${#PROXY_PIDS[@]} -eq 0 && ${#PROXIES[@]} -gt 0 ]]; then
  log "note: no --proxy-pid given; the proxy's CPU will be counted as other_cpu_pct"
fi

# /proc/PID/stat fields 14-17 (utime stime cutime cstime) in clock ticks
ticks_of() {
  local line rest f
  line=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  rest=${line##*) }
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12] + f[13] + f[14]))
}
# CPU ticks of our process trees (roots + direct children) plus this shell's waited-for children (pgbench)
our_ticks() {
  local sum=0 r c
  for r in "${OUR_ROOTS[@]}"; do
    for c in $(ps -o pid= --ppid "$r" 2>/dev/null); do sum=$((sum + $(ticks_of "$c"))); done
    sum=$((sum + $(ticks_of "$r")))
  done
  local line rest f
  line=$(cat "/proc/$$/stat"); rest=${line##*) }; read -r -a f <<<"$rest"
  echo $((sum + f[13] + f[14]))
}
# /proc/stat: "busy steal" ticks summed over all CPUs
sys_ticks() {
  local l
  read -r -a l </proc/stat
  echo "$((l[1] + l[2] + l[3] + l[6] + l[7])) ${l[8]}"
}
wait_quiet() {  # -> prints seconds waited
  local start=$SECONDS a b busy tot
  [[ "$QUIET_WAIT" -gt 0 ]] || { echo 0; return; }
  while :; do
    read -r -a a </proc/stat; sleep 0.5; read -r -a b </proc/stat
    busy=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8])))
    tot=$((busy + (b[4] + b[5]) - (a[4] + a[5])))
    if ((tot == 0 || 100 * busy < QUIET_PCT * tot)) || ((SECONDS - start >= QUIET_WAIT)); then break; fi
  done
  echo $((SECONDS - start))
}
HZ=$(getconf CLK_TCK)
# tandem: utime+stime (fields 14-15) of one process, in clock ticks; '' if PID is empty/gone
proc_ticks() {
  local line rest f
  [[ -n "$1" ]] || { echo ""; return; }
  line=$(cat "/proc/$1/stat" 2>/dev/null) || { echo ""; return; }
  rest=${line##*) }
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}

# ---------------------------------------------------------------- pinning
pin() {  # CPUS PID...
  local cpus=$1 p; shift
  for p in "$@"; do
    if taskset -a -p -c "$cpus" "$p" >/dev/null; then PINNED_PIDS+=("$p"); fi
  done
}
if [[ -n "$PIN_SERVER" ]]; then
  [[ -n "$PM_PID" ]] || die "cannot find postmaster pid"
  mapfile -t pm_children < <(ps -o pid= --ppid "$PM_PID" | tr -d ' ')
  pin "$PIN_SERVER" "$PM_PID" "${pm_children[@]}"
  log "pinned postmaster $PM_PID and children to CPUs $PIN_SERVER"
fi
if [[ -n "$PIN_POOLER" && ${#POOLER_PIDLIST[@]} -gt 0 ]]; then
  pin "$PIN_POOLER" "${POOLER_PIDLIST[@]}"
  log "pinned poolers/proxies (${POOLER_PIDLIST[*]}) to CPUs $PIN_POOLER"
fi
CLIENT_WRAP=()
if [[ -n "$PIN_CLIENT" ]]; then CLIENT_WRAP=(taskset -c "$PIN_CLIENT"); fi

# ---------------------------------------------------------------- metadata
{
  echo "date: $(date -Is)"
  echo "host: $(uname -srm), cpus=$NCPU"
  echo "postgres: $(q_direct 'select version()')"
  echo "pgbench: $("$PGBENCH" --version)"
  echo "pgbouncer: $(pgbouncer --version 2>/dev/null | head -n1 || echo n/a)"
  echo "targets: $(for ((t = 0; t < NT; t++)); do printf '%s=%s:%s ' "${T_NAME[t]}" "${T_HOST[t]}" "${T_PORT[t]}"; done)"
  echo "matrix: workloads=$WORKLOADS protocols=$PROTOCOLS clients=$CLIENTS T=${DURATION}s rounds=$ROUNDS scale=$SCALE threads=$THREADS"
  echo "pinning: client=${PIN_CLIENT:-none} server=${PIN_SERVER:-none} pooler=${PIN_POOLER:-none}"
  echo "pgbouncer pool size: ${PGB_POOL_SIZE:-40}; quiet-wait: ${QUIET_WAIT}s at <${QUIET_PCT}% busy; max-other: ${MAX_OTHER}% x${RETRIES} retries"
  echo "target cpu: $(for ((t = 0; t < NT; t++)); do [[ -z "${T_PID[t]}" ]] || printf '%s=pid %s ' "${T_NAME[t]}" "${T_PID[t]}"; done)(utime+stime, CLK_TCK=$HZ)"
} >"$OUTDIR/meta.txt"
sed 's/^/# /' "$OUTDIR/meta.txt" >&2

echo "workload,protocol,clients,target,round,seq,tps,lat_ms,xacts,failed,status,started_at,waited_s,other_cpu_pct,steal_pct,target_cpu_ticks,cpu_s_per_10k_xacts,error" >"$RUNS_CSV"

# ---------------------------------------------------------------- run loop
total=$((${#WL_LIST[@]} * ${#PROTO_LIST[@]} * ${#CLIENT_LIST[@]} * ROUNDS * NT))
eta=$((total * (DURATION + 2)))
log "$total runs, ~$((eta / 60)) min"
# run_once TARGET_INDEX WORKLOAD PROTO CLIENTS THREADS ROUND TRY -> sets status tps lat other ...
run_once() {
  local t=$1 wl=$2 proto=$3 c=$4 j=$5 r=$6 try=$7 name=${T_NAME[$1]}
  local args lf rc sb0 st0 o0 t0 sb1 st1 o1 t1 avail c0 c1
  if [[ "$wl" == tpcb ]]; then
    q_direct "vacuum pgbench_branches" "vacuum pgbench_tellers" "truncate pgbench_history" >/dev/null
  fi
  if [[ $CHECKPOINT -eq 1 ]]; then q_direct "checkpoint" >/dev/null; fi
  args=(-h "${T_HOST[t]}" -p "${T_PORT[t]}" -U "$DBUSER" -n -T "$DURATION" -c "$c" -j "$j" -M "$proto")
  if [[ "$wl" == select ]]; then args+=(-S); fi
  lf="$OUTDIR/logs/$wl-$proto-c$c-$name-r$r$([[ $try -eq 0 ]] || echo "-retry$try").log"
  waited=$(wait_quiet)
  started=$(date -Is)
  rc=0
  read -r sb0 st0 < <(sys_ticks); o0=$(our_ticks); t0=$(date +%s%N)
  c0=$(proc_ticks "${T_PID[t]}")
  "${CLIENT_WRAP[@]}" timeout -s INT $((DURATION + 60)) "$PGBENCH" "${args[@]}" "$DBNAME" >"$lf" 2>&1 || rc=$?
  sleep 0.3 # let backends exit so the postmaster has reaped them
  c1=$(proc_ticks "${T_PID[t]}")
  read -r sb1 st1 < <(sys_ticks); o1=$(our_ticks); t1=$(date +%s%N)
  avail=$(((t1 - t0) * HZ / 1000000000)) # ticks of one CPU over the window
  other=$(awk -v b=$((sb1 - sb0)) -v o=$((o1 - o0)) -v a="$avail" 'BEGIN { x = (a > 0) ? 100 * (b - o) / a : 0; if (x < 0) x = 0; printf "%.0f", x }')
  steal=$(awk -v s=$((st1 - st0)) -v a="$avail" 'BEGIN { printf "%.0f", (a > 0) ? 100 * s / a : 0 }')
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$lf" | tail -n1)
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$lf" | tail -n1)
  xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$lf" | tail -n1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$lf" | tail -n1)
  cpu_ticks= cpu10k=
  if [[ -n "$c0" && -n "$c1" ]]; then
    cpu_ticks=$((c1 - c0))
    if [[ "${xacts:-0}" -gt 0 ]]; then
      cpu10k=$(awk -v c="$cpu_ticks" -v hz="$HZ" -v x="$xacts" 'BEGIN { printf "%.4f", c / hz * 10000 / x }')
    fi
  fi
  status=ok
  err=
  if [[ $rc -ne 0 || -z "$tps" ]] || grep -q 'aborted' "$lf"; then
    status=fail
    err=$(grep -m1 -iE 'error|fatal|abort' "$lf" | tr -d '\r,"' | cut -c1-160 || true)
    [[ -n "$err" ]] || err="pgbench exit $rc"
  fi
}

seq=0
for wl in "${WL_LIST[@]}"; do
  for proto in "${PROTO_LIST[@]}"; do
    for c in "${CLIENT_LIST[@]}"; do
      if [[ "$THREADS" == auto ]]; then j=$((c < NCPU ? c : NCPU)); else j=$THREADS; fi
      [[ $j -le $c ]] || j=$c
      for ((r = 1; r <= ROUNDS; r++)); do
        for ((k = 0; k < NT; k++)); do
          # alternate the target order each round (ABC CBA ...) to cancel drift
          if ((r % 2 == 1)); then t=$k; else t=$((NT - 1 - k)); fi
          name=${T_NAME[t]}
          seq=$((seq + 1))
          # A successful run disturbed by foreign CPU load (other_cpu_pct > MAX_OTHER) is
          # repeated up to RETRIES times. The first quiet try is kept; if every try was
          # noisy, the least noisy one is kept. The others are written as 'noisy'.
          lines=() others=() best=-1
          for ((try = 0; ; try++)); do
            run_once "$t" "$wl" "$proto" "$c" "$j" "$r" "$try"
            noisy_run=0
            if [[ $status == ok && $MAX_OTHER -gt 0 && $other -gt $MAX_OTHER ]]; then noisy_run=1; fi
            lines+=("$wl,$proto,$c,$name,$r,$seq,${tps:-},${lat:-},${xacts:-},${failed:-},$status,$started,$waited,$other,$steal,$cpu_ticks,$cpu10k,\"$err\"")
            others+=("$other")
            log "[$seq/$total] $wl $proto c=$c $name r$r$([[ $try -eq 0 ]] || echo " retry$try"): ${tps:-?} tps, ${lat:-?} ms,$([[ -z "$cpu10k" ]] || echo " cpu=${cpu10k}s/10k tx,") other=${other}% steal=${steal}% waited=${waited}s $([[ $noisy_run -eq 0 ]] || echo NOISY) $([[ $status == ok ]] || echo "${status^^}${err:+: $err}")"
            if [[ $noisy_run -eq 0 ]]; then best=$try; break; fi
            if [[ $try -ge $RETRIES ]]; then
              best=0
              for ((x = 1; x <= try; x++)); do ((others[x] < others[best])) && best=$x; done
              break
            fi
          done
          for ((x = 0; x < ${#lines[@]}; x++)); do
            if [[ $x -eq $best ]]; then echo "${lines[x]}"; else echo "${lines[x]}" | sed 's/,ok,/,noisy,/'; fi
          done >>"$RUNS_CSV"
        done
      done
    done
  done
done

# ---------------------------------------------------------------- summary
# summary.csv: one row per (workload, protocol, clients, target)
awk -F, -v targets="$(IFS=,; echo "${T_NAME[*]}")" '
function median(arr, n,    i, j, tmp, a) {
  for (i = 1; i <= n; i++) a[i] = arr[i]
  for (i = 2; i <= n; i++) { tmp = a[i]; j = i - 1; while (j >= 1 && a[j] > tmp) { a[j + 1] = a[j]; j-- } a[j + 1] = tmp }
  if (n == 0) return ""
  if (n % 2) return a[(n + 1) / 2]
  return (a[n / 2] + a[n / 2 + 1]) / 2
}
NR == 1 || $11 == "noisy" { next }
{
  cfg = $1 "," $2 "," $3; key = cfg "," $4
  if (!(cfg in seen)) { seen[cfg] = 1; order[++ncfg] = cfg }
  runs[key]++
  if (!(key in oth) || $14 + 0 > oth[key]) oth[key] = $14 + 0
  if ($11 == "ok") {
    n = ++ok[key]; tps[key, n] = $7 + 0; lat[key, n] = $8 + 0
    if ($17 != "") { nc = ++ncpu[key]; cpu[key, nc] = $17 + 0 }
    if (!(key in mn) || $7 + 0 < mn[key]) mn[key] = $7 + 0
    if (!(key in mx) || $7 + 0 > mx[key]) mx[key] = $7 + 0
  } else fails[key]++
}
END {
  nt = split(targets, T, ",")
  print "workload,protocol,clients,target,runs,ok_runs,tps_median,tps_min,tps_max,spread_pct,lat_ms_median,tps_ratio_vs_direct,lat_ratio_vs_direct,other_cpu_pct_max,cpu_s_per_10k_median"
  for (i = 1; i <= ncfg; i++) {
    cfg = order[i]
    dk = cfg ",direct"; dm = ""; dl = ""
    if (ok[dk] > 0) {
      for (x = 1; x <= ok[dk]; x++) { v[x] = tps[dk, x]; w[x] = lat[dk, x] }
      dm = median(v, ok[dk]); dl = median(w, ok[dk])
    }
    for (t = 1; t <= nt; t++) {
      key = cfg "," T[t]
      if (!(key in runs)) continue
      n = ok[key] + 0
      if (n > 0) {
        for (x = 1; x <= n; x++) { v[x] = tps[key, x]; w[x] = lat[key, x] }
        m = median(v, n); l = median(w, n)
        spread = (m > 0) ? sprintf("%.1f", 100 * (mx[key] - mn[key]) / m) : ""
        ratio = (dm != "" && dm > 0) ? sprintf("%.3f", m / dm) : ""
        lratio = (dl != "" && dl > 0) ? sprintf("%.3f", l / dl) : ""
        cm = ""
        if (ncpu[key] > 0) { for (x = 1; x <= ncpu[key]; x++) u[x] = cpu[key, x]; cm = sprintf("%.4f", median(u, ncpu[key])) }
        printf "%s,%d,%d,%.1f,%.1f,%.1f,%s,%.3f,%s,%s,%d,%s\n", key, runs[key], n, m, mn[key], mx[key], spread, l, ratio, lratio, oth[key], cm
      } else {
        printf "%s,%d,0,,,,,,,,%d,\n", key, runs[key], oth[key]
      }
    }
  }
}' "$RUNS_CSV" >"$SUMMARY_CSV"

# markdown: a pivot (one row per config) and the long table with noise figures
awk -F, -v targets="$(IFS=,; echo "${T_NAME[*]}")" '
NR == 1 { next }
{
  cfg = $1 "|" $2 "|" $3
  if (!(cfg in seen)) { seen[cfg] = 1; order[++ncfg] = cfg }
  if ($6 > 0) cell[cfg, $4] = sprintf("%.0f / %.3f%s", $7, $11, ($12 != "" && $4 != "direct") ? sprintf(" (x%.2f)", $12) : "")
  else cell[cfg, $4] = "FAIL"
  long[++nl] = sprintf("| %s | %s | %s | %s | %s/%s | %.0f | %.0f | %.0f | %s | %.3f | %s | %s | %s |", $1, $2, $3, $4, $6, $5, $7, $8, $9, $10, $11, ($4 == "direct" || $12 == "") ? "" : $12, $14, $15)
  if ($6 == 0) long[nl] = sprintf("| %s | %s | %s | %s | 0/%s | FAIL | | | | | | %s | |", $1, $2, $3, $4, $5, $14)
}
END {
  nt = split(targets, T, ",")
  print "### Median TPS / avg latency ms (xTPS ratio vs direct)"
  print ""
  h = "| workload | protocol | clients |"; s = "|---|---|---:|"
  for (t = 1; t <= nt; t++) { h = h " " T[t] " |"; s = s "---:|" }
  print h; print s
  for (i = 1; i <= ncfg; i++) {
    split(order[i], p, "|")
    line = "| " p[1] " | " p[2] " | " p[3] " |"
    for (t = 1; t <= nt; t++) line = line " " (((order[i], T[t]) in cell) ? cell[order[i], T[t]] : "-") " |"
    print line
  }
  print ""
  print "### All targets with noise (min/median/max TPS over rounds)"
  print ""
  print "| workload | protocol | clients | target | ok/runs | TPS median | TPS min | TPS max | spread % | avg lat ms | TPS ratio | other CPU % max | CPU s/10k tx |"
  print "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for (i = 1; i <= nl; i++) print long[i]
}' "$SUMMARY_CSV" >"$SUMMARY_MD"

fails=$(awk -F, 'NR > 1 && $11 == "fail"' "$RUNS_CSV" | wc -l)
noisy=$(awk -F, 'NR > 1 && $11 == "noisy"' "$RUNS_CSV" | wc -l)
{
  echo "## pgbench comparison ($(date -Is))"
  echo ""
  sed 's/^/    /' "$OUTDIR/meta.txt"
  echo ""
  cat "$SUMMARY_MD"
  if [[ $fails -gt 0 ]]; then
    echo ""
    echo "### Failed runs ($fails)"
    echo ""
    awk -F, 'NR > 1 && $11 == "fail" { e = $NF; gsub(/"/, "", e); printf "- %s %s c=%s %s r%s: %s\n", $1, $2, $3, $4, $5, e }' "$RUNS_CSV"
  fi
  echo ""
  echo "Runs repeated because other_cpu_pct > ${MAX_OTHER}%: $noisy (kept in runs.csv as 'noisy')."
} | tee "$OUTDIR/report.md"
log "wrote $RUNS_CSV, $SUMMARY_CSV, $OUTDIR/report.md"
