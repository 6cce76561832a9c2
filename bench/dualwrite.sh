#!/usr/bin/env bash
# dualwrite.sh - what dual-write costs: pgbench tpcb-like through one Tandem in passthrough
# (mirror off) and with mirroring on to a second throwaway cluster (the new store), interleaved,
# with p50/p99 latency from pgbench's per-transaction logs, next to the limit (the same pgbench
# run directly against old and against new at the same time, issue 15); optionally a baseline
# Tandem build alternated with this one in the same rounds; then the write flip's fence, measured
# by flipping to new and rolling back repeatedly while a dual-write pgbench runs.
#
# Called by bench/bench.sh after its passthrough matrix (or alone, with --dual-only there); can
# also run alone against any cluster started with bench/pgcluster.sh. See bench/README.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/tmp/tandem-bench}

OLD_PORT=45432
DBNAME=bench
SCALE=10
PROTOCOLS=simple,extended
CLIENTS=8
DURATION=15
ROUNDS=2
FLIPS=10
FLIP_PROTO=extended
NEW_CLUSTER=tandem-bench-new
OUTDIR=
KEEP=0
TANDEM_BIN=${TANDEM_BIN:-$REPO/bin/tandem}
BASE_BIN=
LIMIT=1
PPROF=

usage() {
  cat <<EOF
Usage: $PROG [options]

The old store is an existing cluster on 127.0.0.1:PORT (database DB; pgbench -i -s SCALE is run
there when its scale differs). The new store is cluster NAME under \$BENCH_DIR (pgcluster.sh),
started on a free port; pgbench's tables are copied into it from old (pg_dump | psql) on every
run, so the two stores start identical. Tandem (\$TANDEM_BIN, already built) runs on free ports
with both stores and the control schema on old (dropped and recreated on every run).

Measured, per protocol, ROUNDS interleaved rounds (the order alternates every round) of:
passthrough and dual-write through Tandem, and the limit: the same pgbench run directly against
old and against new at the same time (two pgbench processes, CLIENTS clients each; the limit is
the lower of the two stores' TPS, since a dual-write transaction is done on both). With
--baseline BIN, a second Tandem build runs passthrough and dual-write in the same rounds (the
two builds are swapped on the same ports between runs; the order alternates). Every run:
pgbench tpcb-like, CLIENTS clients, DURATION s, -n, --log. Before every run
pgbench_branches/tellers are vacuumed and pgbench_history truncated on both stores, then both
CHECKPOINT. Then one dual-write run of -M FLIP_PROTO, at least 2*FLIPS+4 s long, during which
'tandem route set --primary new --reads 100' and 'tandem rollback' alternate FLIPS times each;
the fences come from tandem.state_history.fence_ms.

Options:
  -p PORT      old store's port                          (default $OLD_PORT)
  -d DB        database                                  (default $DBNAME)
  -s SCALE     pgbench scale                             (default $SCALE)
  -M LIST      protocols: simple,extended,prepared       (default $PROTOCOLS)
  -c N         clients                                   (default $CLIENTS)
  -T SECONDS   duration of each run                      (default $DURATION)
  -r ROUNDS    interleaved rounds per protocol           (default $ROUNDS)
  --flips N    write flips (and as many rollbacks)       (default $FLIPS; 0 = none)
  --flip-protocol P  protocol of the flip run            (default $FLIP_PROTO)
  --baseline BIN     also measure Tandem build BIN, alternated with \$TANDEM_BIN in every round
  --no-limit         skip the direct runs on both stores (the limit)
  --pprof DIR        serve /debug/pprof/ and save, for every dual-write run of \$TANDEM_BIN, a CPU
                     profile (DIR/cpu-PROTO-rN.pprof, the run's middle DURATION-2 s) and an
                     allocation profile after it (DIR/allocs-PROTO-rN.pprof); needs curl
  -n NAME      new store's cluster name                  (default $NEW_CLUSTER)
  -o DIR       output directory (default bench/results/<timestamp>/)
  --keep       leave the new store's cluster running on exit
  -h           this help

Outputs in DIR: dualwrite.md (the report section), dualwrite.csv (one row per run),
dualwrite-fences.csv (one row per flip or rollback), dualwrite-tandem.log, logs/dual-*.log.
Environment: BENCH_DIR (default /tmp/tandem-bench), PG_BINDIR, TANDEM_BIN (default bin/tandem),
BENCH_PORT_MIN/BENCH_PORT_MAX (the range free ports are picked from, default 20000-32767).
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -p) need "$@"; OLD_PORT=$2; shift 2 ;;
    -d) need "$@"; DBNAME=$2; shift 2 ;;
    -s) need "$@"; SCALE=$2; shift 2 ;;
    -M) need "$@"; PROTOCOLS=$2; shift 2 ;;
    -c) need "$@"; CLIENTS=$2; shift 2 ;;
    -T) need "$@"; DURATION=$2; shift 2 ;;
    -r) need "$@"; ROUNDS=$2; shift 2 ;;
    --flips) need "$@"; FLIPS=$2; shift 2 ;;
    --flip-protocol) need "$@"; FLIP_PROTO=$2; shift 2 ;;
    --baseline) need "$@"; BASE_BIN=$2; shift 2 ;;
    --no-limit) LIMIT=0; shift ;;
    --pprof) need "$@"; PPROF=$2; shift 2 ;;
    -n) need "$@"; NEW_CLUSTER=$2; shift 2 ;;
    -o) need "$@"; OUTDIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
for v in OLD_PORT SCALE CLIENTS DURATION ROUNDS; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || die "bad value for $v: '${!v}'"
done
[[ "$FLIPS" =~ ^[0-9]+$ ]] || die "bad --flips '$FLIPS'"
IFS=, read -r -a PROTO_LIST <<<"$PROTOCOLS"
for m in "${PROTO_LIST[@]}" "$FLIP_PROTO"; do [[ "$m" =~ ^(simple|extended|prepared)$ ]] || die "bad protocol '$m'"; done
[[ -x "$TANDEM_BIN" ]] || die "no Tandem binary at $TANDEM_BIN (go build -o bin/tandem ./cmd/tandem)"
[[ -z "$BASE_BIN" || -x "$BASE_BIN" ]] || die "no baseline Tandem binary at $BASE_BIN"
if [[ -n "$PPROF" ]]; then
  command -v curl >/dev/null 2>&1 || die "--pprof needs curl"
  mkdir -p "$PPROF"; PPROF=$(cd "$PPROF" && pwd)
fi

find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1; then
    local d; d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n "$d" && -x "$d/pgbench" ]]; then echo "$d"; return; fi
  fi
  if command -v pgbench >/dev/null 2>&1; then dirname "$(command -v pgbench)"; return; fi
  die "cannot find pgbench/psql (run ./scripts/ensure-postgres.sh, or set PG_BINDIR)"
}
BINDIR=$(find_bindir)
PSQL="$BINDIR/psql"
PGBENCH="$BINDIR/pgbench"
PG_DUMP="$BINDIR/pg_dump"
NCPU=$(nproc)
JOBS=$((CLIENTS < NCPU ? CLIENTS : NCPU))
HZ=$(getconf CLK_TCK)

OUTDIR=${OUTDIR:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR/logs"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}

# shellcheck source=bench/lib.sh
source "$HERE/lib.sh" # free_port, percentiles
TAKEN=" $OLD_PORT "
NEW_PORT=$(free_port)
T_PORT=$(free_port)
A_PORT=$(free_port)

q() { # PORT SQL...: run SQL on a store, directly
  local port=$1; shift
  "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DBNAME" -At "$@"
}

TANDEM_PID=
STARTED_NEW=0
CFG="$OUTDIR/dualwrite-tandem.yaml"
cleanup() {
  local rc=$?
  set +e
  trap - INT TERM
  [[ -n "${LIMIT_PIDS:-}" ]] && kill -INT $LIMIT_PIDS 2>/dev/null
  [[ -n "${PPROF_PID:-}" ]] && kill "$PPROF_PID" 2>/dev/null
  if [[ -n "$TANDEM_PID" ]]; then
    stop_tandem
    log "dual-write tandem stopped"
  fi
  if [[ $STARTED_NEW -eq 1 && $KEEP -eq 0 ]]; then "$HERE/pgcluster.sh" stop "$NEW_CLUSTER" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the two stores
ndb=$("$PSQL" -X -w -h 127.0.0.1 -p "$OLD_PORT" -U postgres -d postgres -Atc \
  "select count(*) from pg_database where datname = '$DBNAME'") || die "no server on 127.0.0.1:$OLD_PORT"
[[ "$ndb" == 1 ]] || "$PSQL" -X -w -q -h 127.0.0.1 -p "$OLD_PORT" -U postgres -d postgres -c "create database $DBNAME"
cur_scale=$(q "$OLD_PORT" -c "select count(*) from pgbench_branches" 2>/dev/null || echo 0)
if [[ "$cur_scale" != "$SCALE" ]]; then
  log "pgbench -i -s $SCALE on old (current: $cur_scale)"
  "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$OLD_PORT" -U postgres "$DBNAME" >"$OUTDIR/logs/dual-init.log" 2>&1 \
    || { cat "$OUTDIR/logs/dual-init.log" >&2; die "pgbench -i failed"; }
fi

if ! "$HERE/pgcluster.sh" status "$NEW_CLUSTER" >/dev/null 2>&1; then STARTED_NEW=1; fi
"$HERE/pgcluster.sh" start "$NEW_CLUSTER" "$NEW_PORT" >&2
"$PSQL" -X -w -q -h 127.0.0.1 -p "$NEW_PORT" -U postgres -d postgres -c "drop database if exists $DBNAME" \
  -c "create database $DBNAME" >&2
log "copying pgbench's tables from old (:$OLD_PORT) to new (:$NEW_PORT)"
"$PG_DUMP" -h 127.0.0.1 -p "$OLD_PORT" -U postgres -t 'public.pgbench_*' "$DBNAME" \
  | q "$NEW_PORT" -o /dev/null >"$OUTDIR/logs/dual-copy.log" 2>&1 \
  || { cat "$OUTDIR/logs/dual-copy.log" >&2; die "copying the pgbench tables to the new store failed"; }
q "$NEW_PORT" -c "vacuum analyze" >/dev/null
# A fresh control schema: no routing history, drift or replicas from earlier runs.
q "$OLD_PORT" -c "drop schema if exists tandem cascade" 2>/dev/null

# ---------------------------------------------------------------- tandem with both stores
cat >"$CFG" <<EOF
# written by $PROG
listen: 127.0.0.1:$T_PORT
admin: 127.0.0.1:$A_PORT
old:
  dsn: postgres://postgres@127.0.0.1:$OLD_PORT/$DBNAME?sslmode=disable
new:
  dsn: postgres://postgres@127.0.0.1:$NEW_PORT/$DBNAME?sslmode=disable
limits:
  max_client_sessions: 1000
log:
  level: warn
EOF
# start_tandem BIN: Tandem build BIN on the configured ports (TANDEM_PID, TANDEM_RUNNING)
start_tandem() {
  local bin=$1 i ready=0 extra=()
  [[ -z "$PPROF" ]] || extra=(--admin-pprof)
  "$bin" proxy -c "$CFG" "${extra[@]}" >>"$OUTDIR/dualwrite-tandem.log" 2>&1 &
  TANDEM_PID=$!
  TANDEM_RUNNING=$bin
  for ((i = 0; i < 100; i++)); do
    kill -0 "$TANDEM_PID" 2>/dev/null || { tail -n 20 "$OUTDIR/dualwrite-tandem.log" >&2; die "tandem exited at startup"; }
    if "$PSQL" -X -w -h 127.0.0.1 -p "$T_PORT" -U postgres -d "$DBNAME" -Atc 'select 1' >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
  done
  [[ $ready -eq 1 ]] || { tail -n 20 "$OUTDIR/dualwrite-tandem.log" >&2; die "tandem not answering on 127.0.0.1:$T_PORT"; }
  log "dual-write tandem ready on 127.0.0.1:$T_PORT ($bin, pid $TANDEM_PID; old :$OLD_PORT, new :$NEW_PORT)"
}
stop_tandem() {
  local i
  [[ -n "$TANDEM_PID" ]] || return 0
  if kill -0 "$TANDEM_PID" 2>/dev/null; then
    kill -TERM "$TANDEM_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$TANDEM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$TANDEM_PID" 2>/dev/null && kill -KILL "$TANDEM_PID" 2>/dev/null
  fi
  wait "$TANDEM_PID" 2>/dev/null
  TANDEM_PID= TANDEM_RUNNING=
}
use_tandem() { # BIN: make BIN the running Tandem
  [[ "$TANDEM_RUNNING" == "$1" ]] && return
  stop_tandem
  start_tandem "$1"
}
: >"$OUTDIR/dualwrite-tandem.log"
TANDEM_RUNNING=
start_tandem "$TANDEM_BIN"

tandem_cli() { "$TANDEM_BIN" "$@" -c "$CFG"; }
set_mirror() { # on|off
  tandem_cli route set --mirror "$1" --reason "bench: mirror $1" >>"$OUTDIR/logs/dual-route.log" 2>&1 \
    || { tail -n 5 "$OUTDIR/logs/dual-route.log" >&2; die "tandem route set --mirror $1 failed"; }
}
proc_ticks() { # utime+stime of PID in clock ticks
  local line rest f
  line=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  rest=${line##*) }
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}
prepare() { # both stores as compare.sh leaves them before a run
  local p
  for p in "$OLD_PORT" "$NEW_PORT"; do
    q "$p" -c "vacuum pgbench_branches" -c "vacuum pgbench_tellers" -c "truncate pgbench_history" -c "checkpoint" >/dev/null
  done
}

CSV="$OUTDIR/dualwrite.csv"
echo "protocol,build,mode,round,tps,lat_avg_ms,lat_p50_ms,lat_p99_ms,xacts,failed,tandem_cpu_s_per_10k_xacts,status,tps_old,tps_new" >"$CSV"
# pgbench_results LOGFILE PREFIX RC: sets tps lat p50 p99 xacts failed status from one run's output
pgbench_results() {
  local lf=$1 prefix=$2 rc=$3 pct
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$lf" | tail -n1)
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$lf" | tail -n1)
  xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$lf" | tail -n1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$lf" | tail -n1)
  pct=$(percentiles "$prefix")
  p50=${pct%,*} p99=${pct#*,}
  rm -f "$prefix".* # per-transaction logs are large; the percentiles are kept
  status=ok
  if [[ $rc -ne 0 || -z "$tps" ]] || grep -q 'aborted' "$lf"; then status=fail; fi
}
# run_pgbench NAME PROTO SECONDS [PPROF_TAG]: one pgbench run through tandem; sets tps lat p50 p99
# xacts failed cpu10k status. With PPROF_TAG (and --pprof) a CPU profile of the run's middle and
# an allocation profile after it are saved.
run_pgbench() {
  local name=$1 proto=$2 secs=$3 tag=${4:-} lf prefix rc=0 c0 c1 ps
  lf="$OUTDIR/logs/dual-$name.log"
  prefix="$OUTDIR/logs/txlog-$name"
  rm -f "$prefix".*
  PPROF_PID=
  if [[ -n "$PPROF" && -n "$tag" && $secs -ge 3 ]]; then
    ps=$((secs - 2))
    (sleep 1; curl -sf -o "$PPROF/cpu-$tag.pprof" "http://127.0.0.1:$A_PORT/debug/pprof/profile?seconds=$ps") &
    PPROF_PID=$!
  fi
  c0=$(proc_ticks "$TANDEM_PID")
  timeout -s INT $((secs + 60)) "$PGBENCH" -n -c "$CLIENTS" -j "$JOBS" -T "$secs" -M "$proto" \
    --log --log-prefix="$prefix" -h 127.0.0.1 -p "$T_PORT" -U postgres "$DBNAME" >"$lf" 2>&1 || rc=$?
  c1=$(proc_ticks "$TANDEM_PID")
  if [[ -n "$PPROF_PID" ]]; then
    wait "$PPROF_PID" || log "warning: no CPU profile for $tag"
    PPROF_PID=
    curl -sf -o "$PPROF/allocs-$tag.pprof" "http://127.0.0.1:$A_PORT/debug/pprof/allocs" || log "warning: no allocation profile for $tag"
  fi
  pgbench_results "$lf" "$prefix" "$rc"
  cpu10k=
  if [[ "${xacts:-0}" -gt 0 ]]; then
    cpu10k=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v x="$xacts" 'BEGIN { printf "%.4f", c / hz * 10000 / x }')
  fi
}
# run_limit NAME PROTO SECONDS: the same pgbench directly against old and against new at once;
# sets tps (the lower store's), p50/p99 (the higher store's), tps_old, tps_new, status.
LIMIT_PIDS=
run_limit() {
  local name=$1 proto=$2 secs=$3 p side rc st=ok
  local -A pid=() t=() l=() p5=() p9=() x=() fl=()
  for side in old new; do
    if [[ $side == old ]]; then p=$OLD_PORT; else p=$NEW_PORT; fi
    rm -f "$OUTDIR/logs/txlog-$name-$side".*
    timeout -s INT $((secs + 60)) "$PGBENCH" -n -c "$CLIENTS" -j "$JOBS" -T "$secs" -M "$proto" \
      --log --log-prefix="$OUTDIR/logs/txlog-$name-$side" -h 127.0.0.1 -p "$p" -U postgres "$DBNAME" \
      >"$OUTDIR/logs/dual-$name-$side.log" 2>&1 &
    pid[$side]=$!
    LIMIT_PIDS+=" $!"
  done
  for side in old new; do
    rc=0; wait "${pid[$side]}" || rc=$?
    pgbench_results "$OUTDIR/logs/dual-$name-$side.log" "$OUTDIR/logs/txlog-$name-$side" "$rc"
    t[$side]=$tps l[$side]=$lat p5[$side]=$p50 p9[$side]=$p99 x[$side]=$xacts fl[$side]=$failed
    [[ $status == ok ]] || st=fail
  done
  LIMIT_PIDS=
  tps_old=${t[old]} tps_new=${t[new]}
  tps=$(awk -v a="${t[old]:-0}" -v b="${t[new]:-0}" 'BEGIN { print (a < b ? a : b) }')
  lat=$(awk -v a="${l[old]:-0}" -v b="${l[new]:-0}" 'BEGIN { print (a > b ? a : b) }')
  p50=$(awk -v a="${p5[old]:-0}" -v b="${p5[new]:-0}" 'BEGIN { print (a > b ? a : b) }')
  p99=$(awk -v a="${p9[old]:-0}" -v b="${p9[new]:-0}" 'BEGIN { print (a > b ? a : b) }')
  xacts=$(( ${x[old]:-0} + ${x[new]:-0} )) failed=$(( ${fl[old]:-0} + ${fl[new]:-0} ))
  status=$st
}

# ---------------------------------------------------------------- passthrough vs dual-write vs the limit
BUILDS=(this)
[[ -z "$BASE_BIN" ]] || BUILDS+=(base)
bin_of() { if [[ $1 == base ]]; then echo "$BASE_BIN"; else echo "$TANDEM_BIN"; fi; }
for proto in "${PROTO_LIST[@]}"; do
  for ((r = 1; r <= ROUNDS; r++)); do
    # One round: every build's passthrough and dual-write runs, and the limit; the order of the
    # builds, of the two modes, and the limit's place (first or last) alternate between rounds.
    runs=()
    if ((r % 2 == 1)); then modes=(passthrough dual-write); builds=("${BUILDS[@]}"); else
      modes=(dual-write passthrough); builds=(); for ((k = ${#BUILDS[@]} - 1; k >= 0; k--)); do builds+=("${BUILDS[k]}"); done; fi
    ((LIMIT == 0 || r % 2 == 0)) || runs+=(direct:limit)
    for b in "${builds[@]}"; do for mode in "${modes[@]}"; do runs+=("$b:$mode"); done; done
    ((LIMIT == 0 || r % 2 == 1)) || runs+=(direct:limit)
    for run in "${runs[@]}"; do
      b=${run%%:*} mode=${run#*:}
      prepare
      tps_old= tps_new=
      if [[ $mode == limit ]]; then
        run_limit "$proto-limit-r$r" "$proto" "$DURATION"
        cpu10k=
        log "tpcb $proto c=$CLIENTS limit r$r: old ${tps_old:-?} tps, new ${tps_new:-?} tps (both at once); p50 ${p50:-?} ms, p99 ${p99:-?} ms (the slower store) $([[ $status == ok ]] || echo FAIL)"
      else
        use_tandem "$(bin_of "$b")"
        if [[ $mode == dual-write ]]; then set_mirror on; else set_mirror off; fi
        tag=
        [[ $b != this || $mode != dual-write ]] || tag="$proto-r$r"
        sfx=; [[ $b == this ]] || sfx=-$b
        run_pgbench "$proto-$mode-r$r$sfx" "$proto" "$DURATION" "$tag"
        log "tpcb $proto c=$CLIENTS $b $mode r$r: ${tps:-?} tps, avg ${lat:-?} ms, p50 ${p50:-?} ms, p99 ${p99:-?} ms$([[ -z "$cpu10k" ]] || echo ", tandem cpu ${cpu10k}s/10k tx") $([[ $status == ok ]] || echo FAIL)"
        kill -0 "$TANDEM_PID" 2>/dev/null || die "tandem died (log: $OUTDIR/dualwrite-tandem.log)"
      fi
      echo "$proto,$b,$mode,$r,${tps:-},${lat:-},$p50,$p99,${xacts:-},${failed:-},$cpu10k,$status,${tps_old:-},${tps_new:-}" >>"$CSV"
    done
  done
done
use_tandem "$TANDEM_BIN"

# ---------------------------------------------------------------- write flip fence under load
FENCES="$OUTDIR/dualwrite-fences.csv"
echo "version,direction,fence_ms" >"$FENCES"
flip_line=
if [[ $FLIPS -gt 0 ]]; then
  set_mirror on
  # The flip's gates want the playbook done: every table backfilled and verified clean.
  log "tandem backfill, then tandem compare (the write flip's gates)"
  tandem_cli backfill >>"$OUTDIR/logs/dual-route.log" 2>&1 || die "tandem backfill failed (log: $OUTDIR/logs/dual-route.log)"
  tandem_cli compare >>"$OUTDIR/logs/dual-route.log" 2>&1 || die "tandem compare found differences (log: $OUTDIR/logs/dual-route.log)"
  prepare
  v0=$(q "$OLD_PORT" -c "select max(version) from tandem.state_history")
  flip_secs=$((DURATION > 2 * FLIPS + 4 ? DURATION : 2 * FLIPS + 4))
  log "write flips: $FLIPS flips to new and $FLIPS rollbacks during a ${flip_secs}s dual-write pgbench (-M $FLIP_PROTO)"
  run_pgbench "flips" "$FLIP_PROTO" "$flip_secs" &
  bench_pid=$!
  sleep 1
  flips=0 rollbacks=0 refused=0
  for ((k = 0; k < FLIPS; k++)); do
    kill -0 "$bench_pid" 2>/dev/null || break
    if tandem_cli route set --primary new --reads 100 --reason "bench: write flip $k" >>"$OUTDIR/logs/dual-route.log" 2>&1; then
      flips=$((flips + 1))
    else
      refused=$((refused + 1))
    fi
    sleep 0.4
    # Always back to old, even when pgbench has finished meanwhile.
    if tandem_cli rollback --reason "bench: rollback $k" >>"$OUTDIR/logs/dual-route.log" 2>&1; then
      rollbacks=$((rollbacks + 1))
    else
      refused=$((refused + 1))
    fi
    sleep 0.4
  done
  wait "$bench_pid" || true
  # run_pgbench ran in a subshell: read its results back from its log
  lf="$OUTDIR/logs/dual-flips.log"
  ftps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$lf" | tail -n1)
  ffailed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$lf" | tail -n1)
  faborted=$(grep -c 'aborted' "$lf" || true)
  q "$OLD_PORT" -F, -c "select version, case primary_store when 'new' then 'flip' else 'rollback' end, round(fence_ms::numeric, 3)
    from tandem.state_history where version > $v0 and fence_ms is not null order by version" >>"$FENCES"
  [[ -n "$(tandem_cli route show 2>/dev/null | sed -n '1s/.*primary=old.*/ok/p')" ]] || log "warning: primary is not old after the flips"
  flip_line="$flips flips, $rollbacks rollbacks, $refused refused, during a ${flip_secs}s dual-write pgbench -M $FLIP_PROTO -c $CLIENTS: $(printf '%.0f' "${ftps:-0}") TPS, ${ffailed:-?} failed transactions, $faborted aborted clients"
  log "$flip_line"
fi

# ---------------------------------------------------------------- report
{
  echo "### Dual-write: tpcb-like, $CLIENTS clients, ${DURATION}s runs, $ROUNDS round(s), scale $SCALE"
  echo ""
  echo "Tandem passthrough (mirror off) against Tandem mirroring every write to a second cluster"
  echo "(mirror on; row images upserted in lockstep, same machine), and the limit: the same pgbench"
  echo "run directly against old and against new at the same time (limit TPS = the lower store's;"
  echo "its p50/p99 = the slower store's). Medians over the rounds; p50/p99 from pgbench --log"
  echo "(per-transaction latency); CPU = Tandem's utime+stime per 10k transactions; **CPU dual ÷ pass**"
  echo "is the median over the rounds of the two runs' ratio. Build \`this\` = $TANDEM_BIN$([[ -z "$BASE_BIN" ]] || echo ", \`base\` = $BASE_BIN")."
  echo ""
  echo "| protocol | build | passthrough TPS | dual-write TPS | limit TPS (old / new) | **dual / limit** | dual / passthrough | p50 ms pass / dual / limit | p99 ms pass / dual / limit | **p99 added ms** (vs pass / vs limit) | Tandem CPU s/10k tx pass / dual | **CPU dual ÷ pass** | failed runs |"
  echo "|---|---|---:|---:|---|---:|---:|---|---|---|---|---:|---:|"
  awk -F, '
  function median(arr, n,    i, j, tmp, a) {
    for (i = 1; i <= n; i++) a[i] = arr[i]
    for (i = 2; i <= n; i++) { tmp = a[i]; j = i - 1; while (j >= 1 && a[j] > tmp) { a[j + 1] = a[j]; j-- } a[j + 1] = tmp }
    if (n == 0) return ""
    if (n % 2) return a[(n + 1) / 2]
    return (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function med(col, key,    n, x, v) { n = cnt[key]; for (x = 1; x <= n; x++) v[x] = val[key, x, col]; return median(v, n) }
  function f(x, p) { return (x == "") ? "-" : sprintf("%." p "f", x) }
  function sub2(a, b) { return (a != "" && b != "") ? sprintf("%+.2f", a - b) : "-" }
  NR == 1 { next }
  {
    if (!($1 in seen)) { seen[$1] = 1; order[++np] = $1 }
    if ($2 != "direct" && !(($1, $2) in bseen)) { bseen[$1, $2] = 1; border[$1, ++nb[$1]] = $2 }
    key = $1 SUBSEP $2 SUBSEP $3
    if ($12 != "ok") { fails[$1, $2]++; next }
    n = ++cnt[key]
    for (c = 5; c <= 14; c++) val[key, n, c] = $c
    if ($3 == "passthrough") cpa[$1, $2, $4] = $11
    if ($3 == "dual-write") cdu[$1, $2, $4] = $11
  }
  END {
    for (i = 1; i <= np; i++) {
      p = order[i]; l = p SUBSEP "direct" SUBSEP "limit"
      tl = med(5, l); p50l = med(7, l); p99l = med(8, l); to = med(13, l); tn = med(14, l)
      for (j = 1; j <= nb[p]; j++) {
        bld = border[p, j]; a = p SUBSEP bld SUBSEP "passthrough"; b = p SUBSEP bld SUBSEP "dual-write"
        tp = med(5, a); td = med(5, b); p50a = med(7, a); p50b = med(7, b); p99a = med(8, a); p99b = med(8, b)
        ca = med(11, a); cb = med(11, b)
        nr = 0; delete rr
        for (k in cdu) { split(k, kk, SUBSEP); if (kk[1] == p && kk[2] == bld && ((p, bld, kk[3]) in cpa) && cpa[p, bld, kk[3]] > 0 && cdu[k] != "") rr[++nr] = cdu[k] / cpa[p, bld, kk[3]] }
        cr = median(rr, nr)
        rl = (tl != "" && td != "" && tl > 0) ? sprintf("%.2f", td / tl) : "-"
        rp = (tp != "" && td != "" && tp > 0) ? sprintf("%.2f", td / tp) : "-"
        printf "| %s | %s | %s | %s | %s (%s / %s) | **%s** | %s | %s / %s / %s | %s / %s / %s | **%s** / %s | %s / %s | **%s** | %d |\n", p, bld,
          f(tp, 0), f(td, 0), f(tl, 0), f(to, 0), f(tn, 0), rl, rp,
          f(p50a, 2), f(p50b, 2), f(p50l, 2), f(p99a, 2), f(p99b, 2), f(p99l, 2), sub2(p99b, p99a), sub2(p99b, p99l),
          f(ca, 3), f(cb, 3), f(cr, 2), fails[p, bld] + fails[p, "direct"]
      }
    }
  }' "$CSV"
  if [[ $FLIPS -gt 0 ]]; then
    echo ""
    echo "**Write flip fence** (tandem.state_history.fence_ms; target: p99 under 100 ms, zero client errors):"
    echo "$flip_line."
    echo ""
    echo "| direction | fences | p50 ms | p99 ms | max ms |"
    echo "|---|---:|---:|---:|---:|"
    for d in flip rollback all; do
      awk -F, -v d="$d" 'NR > 1 && (d == "all" || $2 == d) && $3 != "" { print $3 }' "$FENCES" | sort -n | awk -v d="$d" '
        { v[NR] = $1 }
        END {
          if (NR == 0) { printf "| %s | 0 | - | - | - |\n", d; exit }
          i50 = int(0.50 * NR + 0.999999); i99 = int(0.99 * NR + 0.999999)
          printf "| %s | %d | %.1f | %.1f | %.1f |\n", d, NR, v[i50], v[i99], v[NR]
        }'
    done
  fi
  if [[ -s "$OUTDIR/dualwrite-tandem.log" ]]; then
    echo ""
    echo "Tandem logged $(wc -l <"$OUTDIR/dualwrite-tandem.log") warning/error line(s): see dualwrite-tandem.log."
  fi
} >"$OUTDIR/dualwrite.md"
set_mirror off
cat "$OUTDIR/dualwrite.md"
log "wrote $OUTDIR/dualwrite.md, dualwrite.csv, dualwrite-fences.csv"
