#!/usr/bin/env bash
# bench.sh - pgbench side by side: direct PostgreSQL vs pgbouncer (session mode) vs Tandem.
#
# Starts a throwaway cluster (bench/pgcluster.sh), builds and starts Tandem in front of it,
# then runs bench/compare.sh (vendored company harness: pgbouncer in session mode, interleaved
# rounds, noise control) with Tandem as an extra target, and prints a markdown report with
# TPS, latency, the ratios Tandem/pgbouncer and Tandem/direct, and each proxy's CPU seconds per
# 10k transactions. Then bench/dualwrite.sh measures dual-write: tpcb-like through Tandem in
# passthrough vs with mirroring on to a second throwaway cluster (TPS, p50/p99), and the write
# flip's fence under load. See bench/README.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/tmp/tandem-bench}

# defaults (full matrix: 18 configs x 3 targets x 2 rounds x ~19 s = ~35 min on 2 cores)
WORKLOADS=select,tpcb
PROTOCOLS=simple,extended,prepared
CLIENTS=1,8,32
DURATION=15
ROUNDS=2
SCALE=10
QUICK=0
OUTDIR=
PG_PORT=45432
PGB_PORT=46432
T_PORT=47432
A_PORT=47433
CLUSTER=tandem-bench
DBNAME=bench
BUILD=1
KEEP=0
DUAL=1        # 0 = skip the dual-write run, 2 = only the dual-write run
FLIPS=10
TANDEM_BIN=${TANDEM_BIN:-$REPO/bin/tandem}
COMPARE_ARGS=()
declare -A SET=()   # options given explicitly (win over --quick)

usage() {
  cat <<EOF
Usage: $PROG [options] [-- compare.sh options]

Runs pgbench against three targets, interleaved per config (round 1: direct, pgbouncer,
tandem; round 2 reversed; ...): direct PostgreSQL, pgbouncer in session mode, and Tandem
(bin/tandem proxy, built first). Prints a markdown report on stdout (progress on stderr)
and writes it, with CSVs and raw pgbench logs, to the output directory.

Matrix:
  -w LIST      workloads: select (pgbench -S), tpcb (builtin tpcb-like) (default $WORKLOADS)
  -M LIST      protocols: simple,extended,prepared                      (default $PROTOCOLS)
  -c LIST      client counts (each <= PGB_POOL_SIZE, default 40)         (default $CLIENTS)
  -T SECONDS   duration of each pgbench run                             (default $DURATION)
  -r ROUNDS    interleaved rounds per config                            (default $ROUNDS)
  -s SCALE     pgbench scale factor                                     (default $SCALE)
  -q, --quick  quick mode: -T 5 -r 1 -c 8 (both workloads, all protocols; 18 runs,
               ~3-4 min incl. setup). Options given explicitly win over --quick.
Setup:
  -o DIR       output directory (default bench/results/<timestamp>/)
  -p PORT      PostgreSQL port of the throwaway cluster       (default $PG_PORT)
  -B PORT      pgbouncer port                                 (default $PGB_PORT)
  -t PORT      Tandem listen port                             (default $T_PORT)
  -a PORT      Tandem admin port                              (default $A_PORT)
  --no-dual    skip the dual-write run (bench/dualwrite.sh)
  --dual-only  only the dual-write run: no direct/pgbouncer/Tandem matrix, no pgbouncer needed
  --flips N    write flips (and rollbacks) timed during the dual-write run (default $FLIPS)
  --no-build   do not run 'go build'; use \$TANDEM_BIN (default bin/tandem)
  --keep       leave the cluster running on exit (Tandem and pgbouncer are always stopped)
  -h, --help   this help

Everything after '--' is passed to bench/compare.sh, e.g. noise control or pinning:
  $PROG -- --max-other 20 --retries 3        (see: bench/compare.sh -h)

The full default matrix is 2 workloads x 3 protocols x 3 client counts x 3 targets x 2 rounds
= 108 runs of 15 s plus ~4 s of per-run overhead: about 35 minutes.

Dual-write (bench/dualwrite.sh, after the matrix): tpcb-like, -M simple and extended, 8 clients,
-T and -r as above, through one Tandem with both stores: passthrough (mirror off) vs dual-write
(mirror on, a second throwaway cluster as the new store, pgbench's tables copied into it), and
the limit (the same pgbench directly on both stores at once), with p50/p99 latency from pgbench
--log; then --flips write flips and rollbacks during a dual-write pgbench, with the fence's
p50/p99. 2 protocols x 3 runs x rounds + one flip run, plus ~10 s of setup.

Environment:
  BENCH_DIR      cluster/pgbouncer state (default /tmp/tandem-bench; kept between runs, so
                 pgbench -i only runs the first time or when -s changes)
  BENCH_ARGS     extra options, parsed before the command line (make bench BENCH_ARGS=--quick)
  PG_BINDIR      PostgreSQL bin dir (default pg_config --bindir)
  PGB_POOL_SIZE  pgbouncer default_pool_size (default 40; must be >= the largest client count)
  GO             go command (default go); TANDEM_BIN  Tandem binary (default bin/tandem)

Outputs in DIR: report.md (this report), bench.csv (one row per config, the report table),
runs.csv (every pgbench run, incl. noisy/failed ones, with the target process's CPU ticks),
summary.csv (per config and target: median/min/max TPS, median latency, median CPU s/10k tx),
summary.md + compare-report.md (compare.sh's own tables), meta.txt, tandem.log, logs/*.log.
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# ---------------------------------------------------------------- arguments
args=()
if [[ -n "${BENCH_ARGS:-}" ]]; then read -r -a args <<<"$BENCH_ARGS"; fi
args+=("$@")
set -- "${args[@]}"
need() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -w) need "$@"; WORKLOADS=$2; shift 2 ;;
    -M) need "$@"; PROTOCOLS=$2; shift 2 ;;
    -c) need "$@"; CLIENTS=$2; SET[c]=1; shift 2 ;;
    -T) need "$@"; DURATION=$2; SET[T]=1; shift 2 ;;
    -r) need "$@"; ROUNDS=$2; SET[r]=1; shift 2 ;;
    -s) need "$@"; SCALE=$2; shift 2 ;;
    -q | --quick) QUICK=1; shift ;;
    -o) need "$@"; OUTDIR=$2; shift 2 ;;
    -p) need "$@"; PG_PORT=$2; shift 2 ;;
    -B) need "$@"; PGB_PORT=$2; shift 2 ;;
    -t) need "$@"; T_PORT=$2; shift 2 ;;
    -a) need "$@"; A_PORT=$2; shift 2 ;;
    --no-dual) DUAL=0; shift ;;
    --dual-only) DUAL=2; shift ;;
    --flips) need "$@"; FLIPS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; COMPARE_ARGS+=("$@"); break ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
if [[ $QUICK -eq 1 ]]; then
  [[ -n "${SET[T]:-}" ]] || DURATION=5
  [[ -n "${SET[r]:-}" ]] || ROUNDS=1
  [[ -n "${SET[c]:-}" ]] || CLIENTS=8
fi

[[ "$FLIPS" =~ ^[0-9]+$ ]] || die "bad value for --flips: '$FLIPS'"
for v in DURATION ROUNDS SCALE PG_PORT PGB_PORT T_PORT A_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || die "bad value for $v: '${!v}'"
done
IFS=, read -r -a WL_LIST <<<"$WORKLOADS"
IFS=, read -r -a PROTO_LIST <<<"$PROTOCOLS"
IFS=, read -r -a CLIENT_LIST <<<"$CLIENTS"
for w in "${WL_LIST[@]}"; do [[ "$w" == select || "$w" == tpcb ]] || die "bad workload '$w'"; done
for m in "${PROTO_LIST[@]}"; do [[ "$m" =~ ^(simple|extended|prepared)$ ]] || die "bad protocol '$m'"; done
POOL=${PGB_POOL_SIZE:-40}
for c in "${CLIENT_LIST[@]}"; do
  [[ "$c" =~ ^[0-9]+$ && "$c" -ge 1 ]] || die "bad client count '$c'"
  # session mode: a client without a server connection would wait, not be measured
  [[ "$c" -le "$POOL" ]] || die "$c clients > pgbouncer pool size $POOL (set PGB_POOL_SIZE)"
done
ports=("$PG_PORT" "$PGB_PORT" "$T_PORT" "$A_PORT")
[[ $(printf '%s\n' "${ports[@]}" | sort -u | wc -l) -eq 4 ]] || die "ports must differ: ${ports[*]}"

find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1; then
    local d; d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n "$d" && -x "$d/pgbench" ]]; then echo "$d"; return; fi
  fi
  if command -v pgbench >/dev/null 2>&1; then dirname "$(command -v pgbench)"; return; fi
  die "cannot find pgbench/psql (run ./scripts/ensure-postgres.sh pgbouncer, or set PG_BINDIR)"
}
BINDIR=$(find_bindir)
PSQL="$BINDIR/psql"
[[ $DUAL -eq 2 ]] || command -v pgbouncer >/dev/null 2>&1 || [[ -n "${PGBOUNCER:-}" ]] \
  || die "pgbouncer not found (./scripts/ensure-postgres.sh pgbouncer, or set PGBOUNCER)"

OUTDIR=${OUTDIR:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

nruns=$((${#WL_LIST[@]} * ${#PROTO_LIST[@]} * ${#CLIENT_LIST[@]} * ROUNDS * 3))
[[ $DUAL -ne 2 ]] || nruns=0
secs=$((nruns * (DURATION + 4)))
if [[ $DUAL -ne 0 ]]; then
  secs=$((secs + 6 * ROUNDS * (DURATION + 3) + (DURATION > 2 * FLIPS + 4 ? DURATION : 2 * FLIPS + 4) + 15))
fi
log "$nruns pgbench runs of ${DURATION}s$([[ $DUAL -eq 0 ]] || echo " + dual-write ($((6 * ROUNDS + 1)) runs)"): expect ~$(((secs + 59) / 60)) min (+ setup); output in $OUTDIR"

# ---------------------------------------------------------------- build
if [[ $BUILD -eq 1 ]]; then
  log "go build -o bin/tandem ./cmd/tandem"
  (cd "$REPO" && "${GO:-go}" build -o "$TANDEM_BIN" ./cmd/tandem) || die "go build failed"
fi
[[ -x "$TANDEM_BIN" ]] || die "no Tandem binary at $TANDEM_BIN (drop --no-build)"

# ---------------------------------------------------------------- cleanup
STARTED_CLUSTER=0
STARTED_PGB=0
TANDEM_PID=
PGB_INST="$CLUSTER-session"
cleanup() {
  local rc=$? i
  set +e
  trap - INT TERM
  if [[ -n "$TANDEM_PID" ]] && kill -0 "$TANDEM_PID" 2>/dev/null; then
    kill -TERM "$TANDEM_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$TANDEM_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$TANDEM_PID" 2>/dev/null; then
      log "tandem (pid $TANDEM_PID) did not exit after SIGTERM; SIGKILL"
      kill -KILL "$TANDEM_PID" 2>/dev/null
    fi
    wait "$TANDEM_PID" 2>/dev/null
    log "tandem stopped"
  fi
  # compare.sh stops the pgbouncer it started; this covers an interrupted run
  if [[ $STARTED_PGB -eq 1 ]]; then "$HERE/pgbouncer.sh" stop "$PGB_INST" >/dev/null 2>&1; fi
  if [[ $STARTED_CLUSTER -eq 1 && $KEEP -eq 0 ]]; then "$HERE/pgcluster.sh" stop "$CLUSTER" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- cluster + tandem
if ! "$HERE/pgcluster.sh" status "$CLUSTER" >/dev/null 2>&1; then STARTED_CLUSTER=1; fi
"$HERE/pgcluster.sh" start "$CLUSTER" "$PG_PORT" >&2
if ! "$HERE/pgbouncer.sh" status "$PGB_INST" >/dev/null 2>&1; then STARTED_PGB=1; fi
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}
ndb=$("$PSQL" -X -w -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc \
  "select count(*) from pg_database where datname = '$DBNAME'")
if [[ "$ndb" == 0 ]]; then
  "$PSQL" -X -w -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "create database $DBNAME" >&2
fi

# The passthrough matrix (direct, pgbouncer, Tandem): skipped with --dual-only.
if [[ $DUAL -ne 2 ]]; then
  if "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$T_PORT" -t 1 >/dev/null 2>&1; then
    die "port $T_PORT is already in use (choose another with -t)"
  fi
  "$TANDEM_BIN" proxy --listen "127.0.0.1:$T_PORT" --admin "127.0.0.1:$A_PORT" \
    --old "postgres://postgres@127.0.0.1:$PG_PORT/$DBNAME?sslmode=disable" \
    --max-client-sessions 1000 --log-level warn >"$OUTDIR/tandem.log" 2>&1 &
  TANDEM_PID=$!
  ready=0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$TANDEM_PID" 2>/dev/null || { tail -n 20 "$OUTDIR/tandem.log" >&2; die "tandem exited at startup (log: $OUTDIR/tandem.log)"; }
    if "$PSQL" -X -w -h 127.0.0.1 -p "$T_PORT" -U postgres -d "$DBNAME" -Atc 'select 1' >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
  done
  [[ $ready -eq 1 ]] || { tail -n 20 "$OUTDIR/tandem.log" >&2; die "tandem not answering on 127.0.0.1:$T_PORT"; }
  [[ "$(cat "/proc/$TANDEM_PID/comm" 2>/dev/null)" == tandem* ]] || die "pid $TANDEM_PID is not tandem"
  log "tandem ready on 127.0.0.1:$T_PORT (pid $TANDEM_PID, admin 127.0.0.1:$A_PORT)"

  # measure
  "$HERE/compare.sh" -n "$CLUSTER" -p "$PG_PORT" -b session -B "$PGB_PORT" -d "$DBNAME" \
    -w "$WORKLOADS" -M "$PROTOCOLS" -c "$CLIENTS" -T "$DURATION" -r "$ROUNDS" -s "$SCALE" \
    -o "$OUTDIR" --target-pid "tandem=$TANDEM_PID" "${COMPARE_ARGS[@]}" \
    "tandem=127.0.0.1:$T_PORT" >/dev/null
  mv -f "$OUTDIR/report.md" "$OUTDIR/compare-report.md"
  kill -0 "$TANDEM_PID" 2>/dev/null || die "tandem died during the benchmark (log: $OUTDIR/tandem.log)"
  {
    echo "tandem: $(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown) ($TANDEM_BIN, pid $TANDEM_PID)"
  } >>"$OUTDIR/meta.txt"
fi

# ---------------------------------------------------------------- dual-write
if [[ $DUAL -ne 0 ]]; then
  log "dual-write: bench/dualwrite.sh (tpcb, -M simple,extended, 8 clients, ${DURATION}s, $ROUNDS round(s), $FLIPS flips)"
  dual_args=(-p "$PG_PORT" -d "$DBNAME" -s "$SCALE" -M simple,extended -c 8 -T "$DURATION" -r "$ROUNDS"
    --flips "$FLIPS" -n "$CLUSTER-new" -o "$OUTDIR")
  [[ $KEEP -eq 0 ]] || dual_args+=(--keep)
  TANDEM_BIN="$TANDEM_BIN" "$HERE/dualwrite.sh" "${dual_args[@]}" >/dev/null
fi
if [[ ! -f "$OUTDIR/meta.txt" ]]; then # --dual-only: compare.sh wrote none
  {
    echo "date: $(date -Is)"
    echo "host: $(hostname), $(nproc) CPUs, $(uname -r)"
    echo "postgres: $("$BINDIR/postgres" --version 2>/dev/null || "$PSQL" --version)"
    echo "pgbench: $("$BINDIR/pgbench" --version)"
    echo "tandem: $(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown) ($TANDEM_BIN)"
  } >"$OUTDIR/meta.txt"
fi

# ---------------------------------------------------------------- report
# bench.csv: one row per config, from summary.csv (medians over the rounds)
[[ $DUAL -eq 2 ]] || awk -F, '
NR == 1 { next }
{
  cfg = $1 "," $2 "," $3
  if (!(cfg in seen)) { seen[cfg] = 1; order[++n] = cfg }
  t = $4; if (t ~ /^pgbouncer/) t = "pgb"
  if ($6 > 0) { tps[cfg, t] = $7; lat[cfg, t] = $11; cpu[cfg, t] = $15 }
}
function r(a, b) { return (a != "" && b != "" && b > 0) ? sprintf("%.3f", a / b) : "" }
function g(k) { return (k in tps) ? tps[k] : "" }
function gl(k) { return (k in lat) ? lat[k] : "" }
function gc(k) { return (k in cpu) ? cpu[k] : "" }
END {
  print "workload,protocol,clients,direct_tps,direct_lat_ms,pgbouncer_tps,pgbouncer_lat_ms,tandem_tps,tandem_lat_ms,tps_ratio_tandem_vs_pgbouncer,tps_ratio_tandem_vs_direct,lat_ratio_tandem_vs_pgbouncer,pgbouncer_cpu_s_per_10k_xacts,tandem_cpu_s_per_10k_xacts,cpu_ratio_tandem_vs_pgbouncer"
  for (i = 1; i <= n; i++) {
    c = order[i]
    print c "," g(c SUBSEP "direct") "," gl(c SUBSEP "direct") "," g(c SUBSEP "pgb") "," gl(c SUBSEP "pgb") "," \
      g(c SUBSEP "tandem") "," gl(c SUBSEP "tandem") "," \
      r(g(c SUBSEP "tandem"), g(c SUBSEP "pgb")) "," r(g(c SUBSEP "tandem"), g(c SUBSEP "direct")) "," \
      r(gl(c SUBSEP "tandem"), gl(c SUBSEP "pgb")) "," gc(c SUBSEP "pgb") "," gc(c SUBSEP "tandem") "," \
      r(gc(c SUBSEP "tandem"), gc(c SUBSEP "pgb"))
  }
}' "$OUTDIR/summary.csv" >"$OUTDIR/bench.csv"

fmt_table() {
  awk -F, '
  function f(x, p) { return (x == "") ? "FAIL" : sprintf("%." p "f", x) }
  function rr(x) { return (x == "") ? "-" : sprintf("%.2f", x) }
  function gm(sum, k) { return (k > 0) ? sprintf("%.3f", exp(sum / k)) : "-" }
  NR == 1 {
    print "| workload | protocol | clients | direct TPS | direct lat ms | pgbouncer TPS | pgbouncer lat ms | tandem TPS | tandem lat ms | **tandem / pgbouncer** TPS | tandem / direct TPS | pgbouncer CPU s/10k tx | tandem CPU s/10k tx | CPU tandem / pgbouncer |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    next
  }
  {
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | **%s** | %s | %s | %s | %s |\n", $1, $2, $3,
      f($4, 0), f($5, 3), f($6, 0), f($7, 3), f($8, 0), f($9, 3), rr($10), rr($11),
      ($13 == "") ? "-" : sprintf("%.3f", $13), ($14 == "") ? "-" : sprintf("%.3f", $14), rr($15)
    if ($10 != "" && $10 > 0) { s1 += log($10); k1++ }
    if ($11 != "" && $11 > 0) { s2 += log($11); k2++ }
    if ($15 != "" && $15 > 0) { s3 += log($15); k3++ }
  }
  END {
    print ""
    printf "Geometric means over %d config(s): TPS tandem/pgbouncer **%s**, TPS tandem/direct %s, CPU per transaction tandem/pgbouncer %s.\n", NR - 1, gm(s1, k1), gm(s2, k2), gm(s3, k3)
  }' "$OUTDIR/bench.csv"
}

fails=0 noisy=0
if [[ $DUAL -ne 2 ]]; then
  fails=$(awk -F, 'NR > 1 && $11 == "fail"' "$OUTDIR/runs.csv" | wc -l)
  noisy=$(awk -F, 'NR > 1 && $11 == "noisy"' "$OUTDIR/runs.csv" | wc -l)
fi
{
  if [[ $DUAL -eq 2 ]]; then
    echo "## Tandem dual-write: pgbench ($(date -Is))"
  else
    echo "## Tandem vs pgbouncer (session) vs direct PostgreSQL: pgbench ($(date -Is))"
  fi
  echo ""
  sed 's/^/    /' "$OUTDIR/meta.txt"
  echo ""
  if [[ $DUAL -ne 2 ]]; then
    echo "TPS and latency are medians over the rounds (pgbench \"without initial connection time\" TPS,"
    echo "\"latency average\"). CPU s/10k tx = the proxy process's utime+stime during the run / transactions"
    echo "x 10000 (median over the rounds). Ratios > 1 mean more TPS / longer latency / more CPU for Tandem."
    echo ""
    fmt_table
    echo ""
    sed -n '/^### All targets with noise/,$p' "$OUTDIR/summary.md"
    if [[ $fails -gt 0 ]]; then
      echo ""
      echo "### Failed runs ($fails)"
      echo ""
      awk -F, 'NR > 1 && $11 == "fail" { e = $NF; gsub(/"/, "", e); printf "- %s %s c=%s %s r%s: %s\n", $1, $2, $3, $4, $5, e }' "$OUTDIR/runs.csv"
    fi
    echo ""
    echo "Runs repeated because of foreign CPU load (other_cpu_pct above compare.sh --max-other): $noisy (kept in runs.csv as 'noisy')."
  fi
  if [[ $DUAL -ne 0 ]]; then
    [[ $DUAL -eq 2 ]] || echo ""
    cat "$OUTDIR/dualwrite.md"
  fi
  echo ""
  echo "Raw data: $OUTDIR"
} | tee "$OUTDIR/report.md"
log "wrote $OUTDIR/report.md$([[ $DUAL -eq 2 ]] || echo ", bench.csv, runs.csv, summary.csv")$([[ $DUAL -eq 0 ]] || echo ", dualwrite.csv, dualwrite-fences.csv")"
