#!/usr/bin/env bash
# backfill.sh - tandem backfill throughput against pg_dump | psql and a COPY pipe.
#
# Starts two throwaway clusters (bench/pgcluster.sh), loads N rows of ~100 bytes into the old
# one, and copies them old -> new three ways on the same clusters in one run:
#   (a) pg_dump -t T old | psql new
#   (b) psql old -c "COPY T TO STDOUT" | psql new -c "COPY T FROM STDIN"   (T pre-created, with its key)
#   (c) tandem backfill --path snapshot (mirror on through 'tandem route set'; no proxy needed)
#   (d) tandem backfill --path locked (unless --no-locked)
#   (e) with --baseline BIN: BIN backfill --path snapshot, right after (c), same clusters
# The new table is emptied between runs. Prints rows/s and the ratios backfill/pg_dump and
# backfill/COPY as markdown on stdout (progress on stderr). See bench/README.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/tmp/tandem-bench}

ROWS=5000000
WORKERS=2
CHUNK=10000
OLD_PORT=${BF_OLD_PORT:-45611}
NEW_PORT=${BF_NEW_PORT:-45612}
OLD_CLUSTER=tandem-bf-old
NEW_CLUSTER=tandem-bf-new
DBNAME=bfbench
TABLE=bench_rows
BUILD=1
KEEP=0
LOCKED=1
BASE_FIRST=0
INDEXES=0
BASELINE=
EXTRA=()
TANDEM_BIN=${TANDEM_BIN:-$REPO/bin/tandem}

usage() {
  cat <<USAGE
Usage: $PROG [options]

  --rows N       rows to load and copy (default $ROWS, ~100 bytes each)
  --workers N    tandem backfill --workers (default $WORKERS)
  --chunk N      tandem backfill --chunk (default $CHUNK; from 1000 rows a chunk takes the COPY fast path)
  --no-build     do not run 'go build'; use \$TANDEM_BIN (default bin/tandem)
  --baseline BIN also time BIN's 'backfill --path snapshot' (an older build) right after this one's
  --baseline-first  run (e) before (c), to alternate the order between runs
  --no-locked    skip (d), the locked path
  --indexes N    give the table N (0-3) secondary indexes, on old and new (pg_dump builds them after its load)
  --backfill-arg A  pass A to this build's tandem backfill (repeatable; e.g. --defer-indexes)
  --keep         leave both clusters running on exit
  -h, --help     this help

Clusters '$OLD_CLUSTER' (:$OLD_PORT) and '$NEW_CLUSTER' (:$NEW_PORT) live under \$BENCH_DIR
(default /tmp/tandem-bench). Environment: BENCH_DIR, PG_BINDIR, TANDEM_BIN, BF_OLD_PORT, BF_NEW_PORT.
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --chunk) CHUNK=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --no-locked) LOCKED=0; shift ;;
    --baseline-first) BASE_FIRST=1; shift ;;
    --indexes) INDEXES=$2; shift 2 ;;
    --backfill-arg) EXTRA+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$PROG: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

log() { echo "[$PROG] $*" >&2; }
die() { log "error: $*"; exit 1; }

BINDIR=${PG_BINDIR:-}
if [[ -z "$BINDIR" ]] && command -v pg_config >/dev/null 2>&1; then BINDIR=$(pg_config --bindir 2>/dev/null || true); fi
bin() { if [[ -n "$BINDIR" && -x "$BINDIR/$1" ]]; then echo "$BINDIR/$1"; else command -v "$1"; fi; }
PSQL=$(bin psql) || die "psql not found"
PG_DUMP=$(bin pg_dump) || die "pg_dump not found"

if [[ $BUILD -eq 1 ]]; then
  log "go build -o $TANDEM_BIN ./cmd/tandem"
  (cd "$REPO" && go build -o "$TANDEM_BIN" ./cmd/tandem)
fi
[[ -x "$TANDEM_BIN" ]] || die "no Tandem binary at $TANDEM_BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bf.XXXXXX")
CFG="$WORK/tandem.yaml"
cleanup() {
  local rc=$?
  set +e
  if [[ $KEEP -eq 0 ]]; then
    "$HERE/pgcluster.sh" stop "$OLD_CLUSTER" >&2
    "$HERE/pgcluster.sh" stop "$NEW_CLUSTER" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

q() { local port=$1; shift; "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DBNAME" "$@"; }
now() { date +%s.%N; }
rate() { awk -v n="$ROWS" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }

"$HERE/pgcluster.sh" start "$OLD_CLUSTER" "$OLD_PORT" >&2
"$HERE/pgcluster.sh" start "$NEW_CLUSTER" "$NEW_PORT" >&2
for port in "$OLD_PORT" "$NEW_PORT"; do
  "$PSQL" -X -w -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "drop database if exists $DBNAME" -c "create database $DBNAME" >&2
done

DDL="create table $TABLE (id bigint primary key, a int, b smallint, c bigint, t1 text, t2 text, ts1 timestamptz, ts2 timestamptz)"
IDX=("create index ${TABLE}_a on $TABLE (a)" "create index ${TABLE}_t1 on $TABLE (t1)" "create index ${TABLE}_ts1 on $TABLE (ts1)")
IDX_ARGS=()
for ((i = 0; i < INDEXES && i < 3; i++)); do IDX_ARGS+=(-c "${IDX[$i]}"); done
log "loading $ROWS rows into old"
q "$OLD_PORT" -c "$DDL" "${IDX_ARGS[@]}" -c "insert into $TABLE select i, i % 100000, (i % 30000)::smallint, i * 7,
    md5(i::text), substr(md5((i + 1)::text), 1, 20), now() - i * interval '1 s', now()
  from generate_series(1, $ROWS) i" -c "vacuum analyze $TABLE" >&2
BYTES=$(q "$OLD_PORT" -Atc "select pg_relation_size('$TABLE')")

fresh_new() { # $1: create the table (1) or leave it to pg_dump (0)
  q "$NEW_PORT" -c "drop table if exists $TABLE" >&2
  [[ $1 -eq 1 ]] && q "$NEW_PORT" -c "$DDL" "${IDX_ARGS[@]}" >&2
  q "$NEW_PORT" -c "checkpoint" >&2
  q "$OLD_PORT" -c "checkpoint" >&2
}
check() { # $1: method
  local n; n=$(q "$NEW_PORT" -Atc "select count(*) from $TABLE")
  [[ "$n" == "$ROWS" ]] || die "$1 left $n rows on new, want $ROWS"
}

log "(a) pg_dump | psql"
fresh_new 0
t0=$(now)
"$PG_DUMP" -h 127.0.0.1 -p "$OLD_PORT" -U postgres -t "$TABLE" "$DBNAME" | q "$NEW_PORT" -o /dev/null >&2
T_DUMP=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
check dump

log "(b) COPY TO STDOUT | COPY FROM STDIN"
fresh_new 1
t0=$(now)
q "$OLD_PORT" -c "copy $TABLE to stdout" | q "$NEW_PORT" -c "copy $TABLE from stdin" >&2
T_COPY=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
check copy

cat >"$CFG" <<YAML
listen: 127.0.0.1:45613
admin: 127.0.0.1:45614
old:
  dsn: postgres://postgres@127.0.0.1:$OLD_PORT/$DBNAME?sslmode=disable
new:
  dsn: postgres://postgres@127.0.0.1:$NEW_PORT/$DBNAME?sslmode=disable
log:
  level: warn
YAML
backfill() { # $1: --path, $2: binary (default TANDEM_BIN), then extra flags; sets T_BF
  P=$1
  local bin=${2:-$TANDEM_BIN}
  shift 2 || shift $#
  fresh_new 1
  q "$OLD_PORT" -c "drop schema if exists tandem cascade" 2>/dev/null
  q "$NEW_PORT" -c "drop schema if exists tandem cascade" 2>/dev/null
  "$bin" route set -c "$CFG" --mirror on --reason "bench: backfill" >"$WORK/route.log" 2>&1 \
    || { cat "$WORK/route.log" >&2; die "tandem route set --mirror on failed"; }
  t0=$(now)
  "$bin" backfill -c "$CFG" --table "$TABLE" --workers "$WORKERS" --chunk "$CHUNK" --path "$P" "$@" >"$WORK/backfill-$P.log" 2>&1 \
    || { tail -n 20 "$WORK/backfill-$P.log" >&2; die "tandem backfill --path $P failed"; }
  T_BF=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
  grep -q "^path: $P " "$WORK/backfill-$P.log" || { cat "$WORK/backfill-$P.log" >&2; die "tandem backfill did not take the $P path"; }
  check "backfill --path $P"
}

T_BASE=
baseline() {
  log "(e) baseline $BASELINE backfill --path snapshot --workers $WORKERS"
  backfill snapshot "$BASELINE"
  T_BASE=$T_BF
}
[[ -n "$BASELINE" && $BASE_FIRST -eq 1 ]] && baseline
log "(c) tandem backfill --path snapshot --workers $WORKERS ${EXTRA[*]}"
backfill snapshot "$TANDEM_BIN" "${EXTRA[@]}"
T_SNAP=$T_BF
[[ -n "$BASELINE" && $BASE_FIRST -eq 0 ]] && baseline
T_LOCK=
if [[ $LOCKED -eq 1 ]]; then
  log "(d) tandem backfill --path locked --workers $WORKERS --chunk $CHUNK"
  backfill locked "$TANDEM_BIN"
  T_LOCK=$T_BF
fi
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)


row() { printf '| %s | %.1f | %s |\n' "$1" "$2" "$(rate "$2")"; }
ratio() { awk -v a="$(rate "$1")" -v b="$(rate "$2")" 'BEGIN { printf "%.2fx", a / b }'; }
echo "## Backfill benchmark: $ROWS rows ($((BYTES / 1048576)) MB heap, $INDEXES secondary indexes), old :$OLD_PORT -> new :$NEW_PORT, load average $LOAD"
echo
echo "| method | seconds | rows/s |"
echo "|---|---:|---:|"
row "pg_dump -t $TABLE \\| psql" "$T_DUMP"
row "COPY TO STDOUT \\| COPY FROM STDIN" "$T_COPY"
row "tandem backfill --path snapshot (--workers $WORKERS${EXTRA[*]:+ ${EXTRA[*]}})" "$T_SNAP"
[[ -n "$T_BASE" ]] && row "baseline backfill --path snapshot (--workers $WORKERS)" "$T_BASE"
[[ -n "$T_LOCK" ]] && row "tandem backfill --path locked (--workers $WORKERS --chunk $CHUNK)" "$T_LOCK"
echo
echo "snapshot/pg_dump: $(ratio "$T_SNAP" "$T_DUMP")  "
[[ -n "$T_BASE" ]] && echo "baseline/pg_dump: $(ratio "$T_BASE" "$T_DUMP")  " && echo "snapshot/baseline: $(ratio "$T_SNAP" "$T_BASE")  "
[[ -n "$T_LOCK" ]] && echo "locked/pg_dump: $(ratio "$T_LOCK" "$T_DUMP")  "
echo "snapshot/COPY: $(ratio "$T_SNAP" "$T_COPY")"
