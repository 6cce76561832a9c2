#!/usr/bin/env bash
# shadow.sh - what shadow reads cost the client: pgbench -S (select-only) through Tandem in
# dual-write with shadow=0% and shadow=100%, interleaved, next to the same run straight against the
# old store, with p50/p99 latency from pgbench's per-transaction logs; then the shadow outcomes
# (matched, mismatched, transient, dropped) from GET /api/v1/mismatches.
#
# Starts two throwaway clusters (bench/pgcluster.sh) on free ports, pgbench -i -s SCALE on old,
# copies the tables to new (pg_dump | psql), runs bin/tandem proxy in front of both with the
# control schema on old, and stops everything on exit. See bench/README.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/tmp/tandem-bench}

SCALE=10
PROTOCOLS=extended,simple
CLIENTS=8
DURATION=15
ROUNDS=2
RATE=0
BUILD=1
OUTDIR=
TANDEM_BIN=${TANDEM_BIN:-$REPO/bin/tandem}
OLD_CLUSTER=tandem-sh-old
NEW_CLUSTER=tandem-sh-new
DBNAME=bench

usage() {
  cat <<EOF
Usage: $PROG [options]

Per protocol, ROUNDS rounds of three pgbench -S runs (CLIENTS clients, DURATION s, -n, --log):
direct to old, Tandem with shadow=0%, Tandem with shadow=100% (mirror on in both; the order of
the two Tandem runs alternates). Reports TPS, p50 and p99, and p50(shadow 100%) / p50(shadow 0%).

Options:
  -s SCALE     pgbench scale                      (default $SCALE)
  -M LIST      protocols: simple,extended,prepared (default $PROTOCOLS)
  -c N         clients                            (default $CLIENTS)
  -T SECONDS   duration of each run               (default $DURATION)
  -r ROUNDS    rounds per protocol                (default $ROUNDS)
  -R TPS       pgbench --rate: a fixed load below saturation, where latency shows what the
               client waits for rather than who gets the CPU (default 0: as fast as it goes)
  --no-build   use \$TANDEM_BIN as it is (default: go build -o bin/tandem ./cmd/tandem)
  -o DIR       output directory (default bench/results/<timestamp>/)
  -h           this help
Environment: BENCH_DIR (default /tmp/tandem-bench), PG_BINDIR, TANDEM_BIN.
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -s) need "$@"; SCALE=$2; shift 2 ;;
    -M) need "$@"; PROTOCOLS=$2; shift 2 ;;
    -c) need "$@"; CLIENTS=$2; shift 2 ;;
    -T) need "$@"; DURATION=$2; shift 2 ;;
    -r) need "$@"; ROUNDS=$2; shift 2 ;;
    -R) need "$@"; RATE=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -o) need "$@"; OUTDIR=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
for v in SCALE CLIENTS DURATION ROUNDS; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || die "bad value for $v: '${!v}'"
done
[[ "$RATE" =~ ^[0-9]+$ ]] || die "bad -R '$RATE'"
RATE_ARGS=()
[[ $RATE -eq 0 ]] || RATE_ARGS=(-R "$RATE")
IFS=, read -r -a PROTO_LIST <<<"$PROTOCOLS"
for m in "${PROTO_LIST[@]}"; do [[ "$m" =~ ^(simple|extended|prepared)$ ]] || die "bad protocol '$m'"; done

if [[ $BUILD -eq 1 ]]; then
  log "go build -o $TANDEM_BIN ./cmd/tandem"
  (cd "$REPO" && go build -o "$TANDEM_BIN" ./cmd/tandem)
fi
[[ -x "$TANDEM_BIN" ]] || die "no Tandem binary at $TANDEM_BIN"

BINDIR=${PG_BINDIR:-}
if [[ -z "$BINDIR" ]] && command -v pg_config >/dev/null 2>&1; then BINDIR=$(pg_config --bindir 2>/dev/null || true); fi
[[ -n "$BINDIR" && -x "$BINDIR/pgbench" ]] || die "cannot find pgbench (run ./scripts/ensure-postgres.sh, or set PG_BINDIR)"
PSQL="$BINDIR/psql" PGBENCH="$BINDIR/pgbench" PG_DUMP="$BINDIR/pg_dump"
NCPU=$(nproc)
JOBS=$((CLIENTS < NCPU ? CLIENTS : NCPU))

OUTDIR=${OUTDIR:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR/logs"
OUTDIR=$(cd "$OUTDIR" && pwd)

# shellcheck source=bench/lib.sh
source "$HERE/lib.sh" # free_port, percentiles
OLD_PORT=$(free_port) NEW_PORT=$(free_port) T_PORT=$(free_port) A_PORT=$(free_port)
q() { local port=$1; shift; "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DBNAME" -At "$@"; }

TANDEM_PID=
cleanup() {
  local rc=$? i
  set +e
  trap - INT TERM
  if [[ -n "$TANDEM_PID" ]] && kill -0 "$TANDEM_PID" 2>/dev/null; then
    kill -TERM "$TANDEM_PID"
    for ((i = 0; i < 100; i++)); do kill -0 "$TANDEM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$TANDEM_PID" 2>/dev/null
    wait "$TANDEM_PID" 2>/dev/null
  fi
  "$HERE/pgcluster.sh" stop "$OLD_CLUSTER" >&2
  "$HERE/pgcluster.sh" stop "$NEW_CLUSTER" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$HERE/pgcluster.sh" start "$OLD_CLUSTER" "$OLD_PORT" >&2
"$HERE/pgcluster.sh" start "$NEW_CLUSTER" "$NEW_PORT" >&2
for p in "$OLD_PORT" "$NEW_PORT"; do
  "$PSQL" -X -w -q -h 127.0.0.1 -p "$p" -U postgres -d postgres -c "drop database if exists $DBNAME" -c "create database $DBNAME" >&2
done
log "pgbench -i -s $SCALE on old, copied to new"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$OLD_PORT" -U postgres "$DBNAME" >"$OUTDIR/logs/shadow-init.log" 2>&1 \
  || { cat "$OUTDIR/logs/shadow-init.log" >&2; die "pgbench -i failed"; }
"$PG_DUMP" -h 127.0.0.1 -p "$OLD_PORT" -U postgres -t 'public.pgbench_*' "$DBNAME" | q "$NEW_PORT" -o /dev/null >/dev/null
for p in "$OLD_PORT" "$NEW_PORT"; do q "$p" -c "vacuum analyze" -c "checkpoint"; done

CFG="$OUTDIR/shadow-tandem.yaml"
cat >"$CFG" <<EOF
# written by $PROG
listen: 127.0.0.1:$T_PORT
admin: 127.0.0.1:$A_PORT
old:
  dsn: postgres://postgres@127.0.0.1:$OLD_PORT/$DBNAME?sslmode=disable
new:
  dsn: postgres://postgres@127.0.0.1:$NEW_PORT/$DBNAME?sslmode=disable
log:
  level: warn
EOF
"$TANDEM_BIN" proxy -c "$CFG" >"$OUTDIR/shadow-tandem.log" 2>&1 &
TANDEM_PID=$!
for ((i = 0; i < 100; i++)); do
  kill -0 "$TANDEM_PID" 2>/dev/null || { tail -n 20 "$OUTDIR/shadow-tandem.log" >&2; die "tandem exited at startup"; }
  "$PSQL" -X -w -h 127.0.0.1 -p "$T_PORT" -U postgres -d "$DBNAME" -Atc 'select 1' >/dev/null 2>&1 && break
  sleep 0.1
done
route() { "$TANDEM_BIN" route set -c "$CFG" "$@" >>"$OUTDIR/logs/shadow-route.log" 2>&1 || die "tandem route set $* failed"; }
route --mirror on --reason "bench: dual-write"

run() { # NAME PORT PROTO: sets tps p50 p99
  local name=$1 port=$2 proto=$3 lf="$OUTDIR/logs/shadow-$1.log" prefix="$OUTDIR/logs/tx-$1" pct
  rm -f "$prefix".*
  "$PGBENCH" -n -S -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -M "$proto" "${RATE_ARGS[@]}" --log --log-prefix="$prefix" \
    -h 127.0.0.1 -p "$port" -U postgres "$DBNAME" >"$lf" 2>&1 || die "pgbench $name failed: $(tail -n 3 "$lf")"
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$lf" | tail -n1)
  pct=$(percentiles "$prefix")
  p50=${pct%,*} p99=${pct#*,}
  rm -f "$prefix".*
}

CSV="$OUTDIR/shadow.csv"
echo "protocol,round,mode,tps,p50_ms,p99_ms" >"$CSV"
for proto in "${PROTO_LIST[@]}"; do
  for ((r = 1; r <= ROUNDS; r++)); do
    run "$proto-direct-r$r" "$OLD_PORT" "$proto"
    echo "$proto,$r,direct,$tps,$p50,$p99" >>"$CSV"
    log "$proto r$r direct: $tps tps, p50 $p50 ms, p99 $p99 ms"
    if ((r % 2 == 1)); then order=(0 100); else order=(100 0); fi
    for pct in "${order[@]}"; do
      route --shadow "$pct" --reason "bench: shadow $pct%"
      run "$proto-shadow$pct-r$r" "$T_PORT" "$proto"
      echo "$proto,$r,shadow$pct,$tps,$p50,$p99" >>"$CSV"
      log "$proto r$r tandem shadow=$pct%: $tps tps, p50 $p50 ms, p99 $p99 ms"
    done
  done
done
route --shadow 0 --reason "bench: done"
sleep 6 # the proxy stores its shadow counts every 5 s
curl -fsS "http://127.0.0.1:$A_PORT/api/v1/mismatches?window=24h" >"$OUTDIR/shadow-mismatches.json" || die "GET /api/v1/mismatches failed"

{
  echo "### Shadow reads: pgbench -S, $CLIENTS clients$([[ $RATE -eq 0 ]] || echo ", --rate $RATE tps"), ${DURATION}s runs, $ROUNDS round(s), scale $SCALE"
  echo ""
  echo "Medians over the rounds. Tandem runs are in dual-write (mirror on); shadow=100% runs every read"
  echo "again on the new store, off the client's path, and compares. Same 2-core machine for everything."
  echo ""
  echo "| protocol | direct TPS | shadow 0% TPS | shadow 100% TPS | p50 ms direct / 0% / 100% | p99 ms direct / 0% / 100% | **p50 100% / 0%** |"
  echo "|---|---:|---:|---:|---|---|---:|"
  for proto in "${PROTO_LIST[@]}"; do
    awk -F, -v p="$proto" '
      function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
      $1 == p { k = $3; n[k]++; tps[k, n[k]] = $4; p50[k, n[k]] = $5; p99[k, n[k]] = $6 }
      END {
        split("direct shadow0 shadow100", ks, " ")
        for (x = 1; x <= 3; x++) { k = ks[x]
          for (i = 1; i <= n[k]; i++) { a[i] = tps[k, i]; b[i] = p50[k, i]; c[i] = p99[k, i] }
          T[k] = median(a, n[k]); P[k] = median(b, n[k]); Q[k] = median(c, n[k]) }
        printf "| %s | %.0f | %.0f | %.0f | %.3f / %.3f / %.3f | %.3f / %.3f / %.3f | **%.2fx** |\n", p,
          T["direct"], T["shadow0"], T["shadow100"], P["direct"], P["shadow0"], P["shadow100"],
          Q["direct"], Q["shadow0"], Q["shadow100"], P["shadow100"] / P["shadow0"] }' "$CSV"
  done
  echo ""
  python3 - "$OUTDIR/shadow-mismatches.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))["rate"]["total"]
c = t["matched"] + t["mismatched"] + t["transient"]
print(f"Shadow outcomes: {c} compared ({t['matched']} matched, {t['mismatched']} mismatched, {t['transient']} transient), "
      f"{t['dropped']} dropped (queue full), {t['skipped']} skipped.")
PY
} | tee "$OUTDIR/shadow.md"
