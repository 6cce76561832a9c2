#!/usr/bin/env bash
# verify.sh - tandem compare (the table verify) against count(*) and a naive fetch-and-compare.
#
# Starts two throwaway clusters (bench/pgcluster.sh), loads the same N rows into both, and
# times on the same clusters in one run:
#   (a) SELECT count(*) on old then new (summed), and on both at once
#   (b) tandem compare (a clean verify: server-side range hashes)
#   (c) bench/naivecompare: both tables streamed in key order over pgx, compared in Go
#   (d) tandem compare again after planting 100 scattered differences on new (must report 100)
#   (e) with those repaired, Tandem in dual-write in front of both stores and pgbench updating
#       random rows through it (-R $LIVE_RATE, default 500 tps): a full scan and tandem compare under those live
#       writes (must report 0: every difference a write in flight)
# With --baseline BIN, (b) and (d) are also timed with that Tandem binary (e.g. one built from
# the commit before a change), alternating with the new one, so both are measured side by side.
# Prints rows/s and the ratios compare/count(*) and compare/naive as markdown on stdout
# (progress on stderr). See bench/README.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/tmp/tandem-bench}

ROWS=${ROWS:-5000000}
LIVE_RATE=${LIVE_RATE:-500}
BATCH=10000
OLD_PORT=${VF_OLD_PORT:-25621}
NEW_PORT=${VF_NEW_PORT:-25622}
OLD_CLUSTER=tandem-vf-old
NEW_CLUSTER=tandem-vf-new
DBNAME=vfbench
TABLE=bench_rows
BUILD=1
KEEP=0
LIVE=1
TANDEM_BIN=${TANDEM_BIN:-$REPO/bin/tandem}
BASE_BIN=
NAIVE_BIN=${NAIVE_BIN:-$REPO/bin/naivecompare}

usage() {
  cat <<USAGE
Usage: $PROG [options]

  --rows N       rows in each store (default \$ROWS or $ROWS)
  --batch N      tandem compare --batch (default $BATCH)
  --no-build     do not run 'go build'; use \$TANDEM_BIN and \$NAIVE_BIN (default bin/)
  --keep         leave both clusters running on exit
  --baseline BIN also time (b), (d) and (e) with the Tandem binary BIN, alternating with the new one
  --no-live      skip (e), the verify under live writes through Tandem in dual-write
  -h, --help     this help

Clusters '$OLD_CLUSTER' (:$OLD_PORT) and '$NEW_CLUSTER' (:$NEW_PORT) live under \$BENCH_DIR
(default /tmp/tandem-bench). Environment: ROWS, LIVE_RATE, VF_OLD_PORT, VF_NEW_PORT, BENCH_DIR, PG_BINDIR, TANDEM_BIN, NAIVE_BIN.
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --baseline) BASE_BIN=$2; shift 2 ;;
    --no-live) LIVE=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$PROG: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$ROWS" =~ ^[0-9]+$ && "$ROWS" -ge 1000 ]] || { echo "$PROG: --rows must be a number >= 1000" >&2; exit 2; }

log() { echo "[$PROG] $*" >&2; }
die() { log "error: $*"; exit 1; }

BINDIR=${PG_BINDIR:-}
if [[ -z "$BINDIR" ]] && command -v pg_config >/dev/null 2>&1; then BINDIR=$(pg_config --bindir 2>/dev/null || true); fi
bin() { if [[ -n "$BINDIR" && -x "$BINDIR/$1" ]]; then echo "$BINDIR/$1"; else command -v "$1"; fi; }
PSQL=$(bin psql) || die "psql not found"
PGBENCH=$(bin pgbench) || die "pgbench not found"

if [[ $BUILD -eq 1 ]]; then
  log "go build -o $TANDEM_BIN ./cmd/tandem; go build -o $NAIVE_BIN ./bench/naivecompare"
  (cd "$REPO" && go build -o "$TANDEM_BIN" ./cmd/tandem && go build -o "$NAIVE_BIN" ./bench/naivecompare)
fi
[[ -x "$TANDEM_BIN" ]] || die "no Tandem binary at $TANDEM_BIN"
[[ -x "$NAIVE_BIN" ]] || die "no naivecompare binary at $NAIVE_BIN"
[[ -z "$BASE_BIN" || -x "$BASE_BIN" ]] || die "no baseline binary at $BASE_BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-vf.XXXXXX")
CFG="$WORK/tandem.yaml"
PROXY_PID=
WRITER_PID=
cleanup() {
  local rc=$?
  set +e
  for pid in $WRITER_PID $PROXY_PID; do
    kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [[ $KEEP -eq 0 ]]; then
    "$HERE/pgcluster.sh" stop "$OLD_CLUSTER" >&2
    "$HERE/pgcluster.sh" stop "$NEW_CLUSTER" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

q() { local port=$1; shift; "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DBNAME" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }
rate() { awk -v n="$ROWS" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
dsn() { echo "postgres://postgres@127.0.0.1:$1/$DBNAME?sslmode=disable"; }

"$HERE/pgcluster.sh" start "$OLD_CLUSTER" "$OLD_PORT" >&2
"$HERE/pgcluster.sh" start "$NEW_CLUSTER" "$NEW_PORT" >&2
for port in "$OLD_PORT" "$NEW_PORT"; do
  "$PSQL" -X -w -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "drop database if exists $DBNAME" -c "create database $DBNAME" >&2
done

# A realistic row: bigint key, ints, numeric, text, timestamptz, ~120 bytes. The values are
# deterministic, so both stores hold the same rows.
DDL="create table $TABLE (id bigint primary key, account int, qty smallint, amount numeric(12,2), status text,
  note text, created_at timestamptz, updated_at timestamptz)"
FILL="insert into $TABLE select i, i % 100000, (i % 30000)::smallint, (i % 1000000) * 0.37, (array['new','paid','shipped','void'])[1 + i % 4],
    md5(i::text) || substr(md5((i + 1)::text), 1, 20), '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 s',
    '2024-06-01 00:00:00+00'::timestamptz + (i % 86400) * interval '1 s'
  from generate_series(1, $ROWS) i"
log "loading $ROWS rows into old and new"
for port in "$OLD_PORT" "$NEW_PORT"; do
  q "$port" -c "$DDL" -c "$FILL" -c "vacuum analyze $TABLE" >&2 &
done
wait
BYTES=$(q "$OLD_PORT" -Atc "select pg_relation_size('$TABLE')")
cat >"$CFG" <<YAML
listen: 127.0.0.1:$((OLD_PORT + 2))
admin: 127.0.0.1:$((OLD_PORT + 3))
old:
  dsn: $(dsn "$OLD_PORT")
new:
  dsn: $(dsn "$NEW_PORT")
log:
  level: warn
YAML
settle() { q "$OLD_PORT" -c "checkpoint" >&2; q "$NEW_PORT" -c "checkpoint" >&2; }
count() { # $1: port; checks the count
  local n; n=$(q "$1" -Atc "select count(*) from $TABLE")
  [[ "$n" == "$ROWS" ]] || die "count(*) on :$1 is $n, want $ROWS"
}
# compare_run OUT WANT [FLAGS...]: tandem compare --json into OUT, expecting WANT differences.
# BIN (default $TANDEM_BIN) is the binary.
compare_run() {
  local out=$1 want=$2 rc=0
  shift 2
  "${BIN:-$TANDEM_BIN}" compare -c "$CFG" --table "$TABLE" --batch "$BATCH" --json "$@" >"$out" 2>"$out.err" || rc=$?
  local got; got=$(grep -c '"kind"' "$out" || true)
  if [[ "$got" != "$want" ]] || { [[ $want -eq 0 && $rc -ne 0 ]] || [[ $want -gt 0 && $rc -ne 1 ]]; }; then
    tail -n 20 "$out.err" >&2; head -c 2000 "$out" >&2
    die "tandem compare reported $got differences (exit $rc), want $want"
  fi
}

log "(a) count(*), sequential"
settle
t0=$(now); count "$OLD_PORT"; count "$NEW_PORT"; T_COUNT=$(since "$t0")
log "(a) count(*), concurrent"
t0=$(now); count "$OLD_PORT" & p1=$!; count "$NEW_PORT" & p2=$!; wait "$p1"; wait "$p2"; T_COUNTC=$(since "$t0")

log "(a) a full scan that reads every row (count of its last column), concurrent"
fullscan() { q "$1" -Atc "select count(updated_at) from $TABLE" >/dev/null; }
t0=$(now); fullscan "$OLD_PORT" & p1=$!; fullscan "$NEW_PORT" & p2=$!; wait "$p1"; wait "$p2"; T_SCAN=$(since "$t0")

log "(b) tandem compare --batch $BATCH (clean)"
settle
t0=$(now); compare_run "$WORK/clean.json" 0; T_CMP=$(since "$t0")
if [[ -n "$BASE_BIN" ]]; then
  log "(b) baseline $BASE_BIN compare (clean), then the new one again"
  settle
  t0=$(now); BIN=$BASE_BIN compare_run "$WORK/base-clean.json" 0; T_BCMP=$(since "$t0")
  settle
  t0=$(now); compare_run "$WORK/clean2.json" 0; T_CMP2=$(since "$t0")
  settle
  t0=$(now); BIN=$BASE_BIN compare_run "$WORK/base-clean.json" 0; T_BCMP2=$(since "$t0")
fi
log "(b) tandem compare --batch $BATCH --ranges-only (clean: the key-range walk alone)"
settle
t0=$(now); compare_run "$WORK/clean-ranges.json" 0 --ranges-only; T_CMPR=$(since "$t0")

log "(c) naivecompare"
settle
t0=$(now)
NAIVE=$("$NAIVE_BIN" -old "$(dsn "$OLD_PORT")" -new "$(dsn "$NEW_PORT")" -table "$TABLE")
T_NAIVE=$(since "$t0")
[[ "$NAIVE" == "rows $ROWS diffs 0 "* ]] || die "naivecompare: $NAIVE"

log "(d) planting 100 scattered differences on new: 40 values, 30 deletes, 30 inserts"
STEP=$((ROWS / 100))
q "$NEW_PORT" -c "update $TABLE set note = 'planted' where id in (select k * $STEP from generate_series(1, 40) k)" \
  -c "delete from $TABLE where id in (select k * $STEP - 1 from generate_series(41, 70) k)" \
  -c "insert into $TABLE (id, account, status) select $ROWS + k * 7, 0, 'planted' from generate_series(1, 30) k" >&2
settle
t0=$(now); compare_run "$WORK/planted.json" 100; T_PLANT=$(since "$t0")
if [[ -n "$BASE_BIN" ]]; then
  log "(d) baseline compare (100 planted), then the new one again"
  settle
  t0=$(now); BIN=$BASE_BIN compare_run "$WORK/base-planted.json" 100; T_BPLANT=$(since "$t0")
  settle
  t0=$(now); compare_run "$WORK/planted2.json" 100; T_PLANT2=$(since "$t0")
  settle
  t0=$(now); BIN=$BASE_BIN compare_run "$WORK/base-planted.json" 100; T_BPLANT2=$(since "$t0")
fi

if [[ $LIVE -eq 1 ]]; then
  log "(e) repairing the planted differences"
  "$TANDEM_BIN" compare -c "$CFG" --table "$TABLE" --repair --json >"$WORK/repair.json" 2>"$WORK/repair.err" \
    || { tail -n 20 "$WORK/repair.err" >&2; die "tandem compare --repair failed"; }
  log "(e) tandem proxy in dual-write on :$((OLD_PORT + 2)), pgbench updating random rows through it"
  "$TANDEM_BIN" proxy -c "$CFG" >"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  for ((i = 0; i < 100; i++)); do
    kill -0 "$PROXY_PID" 2>/dev/null || { tail -n 20 "$WORK/proxy.log" >&2; die "tandem proxy exited"; }
    "$PSQL" -X -w -h 127.0.0.1 -p $((OLD_PORT + 2)) -U postgres -d "$DBNAME" -Atc 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$TANDEM_BIN" route set -c "$CFG" --mirror on --reason "verify.sh: live writes" >&2
  printf '\\set id random(1, %d)\nUPDATE %s SET qty = qty + 1, updated_at = now() WHERE id = :id;\n' "$ROWS" "$TABLE" >"$WORK/update.sql"
  "$PGBENCH" -n -h 127.0.0.1 -p $((OLD_PORT + 2)) -U postgres -c 4 -j 2 -R "$LIVE_RATE" -T 3600 -f "$WORK/update.sql" "$DBNAME" \
    >"$WORK/pgbench.log" 2>&1 &
  WRITER_PID=$!
  sleep 3
  kill -0 "$WRITER_PID" 2>/dev/null || { tail -n 20 "$WORK/pgbench.log" >&2; die "pgbench exited"; }
  t0=$(now); fullscan "$OLD_PORT" & p1=$!; fullscan "$NEW_PORT" & p2=$!; wait "$p1"; wait "$p2"; T_LSCAN=$(since "$t0")
  t0=$(now); compare_run "$WORK/live.json" 0; T_LIVE=$(since "$t0")
  if [[ -n "$BASE_BIN" ]]; then
    t0=$(now); BIN=$BASE_BIN compare_run "$WORK/base-live.json" 0; T_BLIVE=$(since "$t0")
    t0=$(now); compare_run "$WORK/live2.json" 0; T_LIVE2=$(since "$t0")
    t0=$(now); BIN=$BASE_BIN compare_run "$WORK/base-live2.json" 0; T_BLIVE2=$(since "$t0")
  fi
  t0=$(now); fullscan "$OLD_PORT" & p1=$!; fullscan "$NEW_PORT" & p2=$!; wait "$p1"; wait "$p2"; T_LSCAN2=$(since "$t0")
  kill -TERM "$WRITER_PID" 2>/dev/null; wait "$WRITER_PID" 2>/dev/null || true; WRITER_PID=
  kill -TERM "$PROXY_PID" 2>/dev/null; wait "$PROXY_PID" 2>/dev/null || true; PROXY_PID=
  field() { grep -o "\"$1\": *[0-9]*" "$2" | grep -o '[0-9]*$' | head -1; }
  TRANSIENT=$(field transient "$WORK/live.json")
  LIVE_HOW="ranges $(field ranges "$WORK/live.json"), buckets $(field buckets "$WORK/live.json"), differing $(field bisected "$WORK/live.json")"
  [[ -z "$BASE_BIN" ]] || LIVE_HOW="$LIVE_HOW; the baseline: ranges $(field ranges "$WORK/base-live.json"), differing $(field bisected "$WORK/base-live.json")"
fi

R_SCAN=$(rate "$T_SCAN"); R_CMPR=$(rate "$T_CMPR"); R_COUNT=$(rate "$T_COUNT"); R_COUNTC=$(rate "$T_COUNTC"); R_CMP=$(rate "$T_CMP"); R_NAIVE=$(rate "$T_NAIVE"); R_PLANT=$(rate "$T_PLANT")
cat <<REPORT
## Verify benchmark: $ROWS rows ($((BYTES / 1048576)) MB heap) in each of old :$OLD_PORT and new :$NEW_PORT

rows/s counts each row once (a verify reads it on both stores).

| method | seconds | rows/s |
|---|---:|---:|
| count(*) old, then new | $(printf %.2f "$T_COUNT") | $R_COUNT |
| count(*) old and new at once | $(printf %.2f "$T_COUNTC") | $R_COUNTC |
| full scan reading every row (count(updated_at)), old and new at once | $(printf %.2f "$T_SCAN") | $R_SCAN |
| tandem compare (clean: whole-table pass) | $(printf %.2f "$T_CMP") | $R_CMP |
| tandem compare --ranges-only (clean: key-range walk, --batch $BATCH) | $(printf %.2f "$T_CMPR") | $R_CMPR |
| naivecompare (stream both, compare in Go) | $(printf %.2f "$T_NAIVE") | $R_NAIVE |
| tandem compare (100 planted differences) | $(printf %.2f "$T_PLANT") | $R_PLANT |

compare/count(*) sequential: $(ratio "$T_CMP" "$T_COUNT") the time  
compare/count(*) concurrent: $(ratio "$T_CMP" "$T_COUNTC") the time  
compare/full scan: $(ratio "$T_CMP" "$T_SCAN") the time; ranges-only/full scan: $(ratio "$T_CMPR" "$T_SCAN")  
compare/naive: $(ratio "$T_CMP" "$T_NAIVE") the time ($(ratio "$R_CMP" "$R_NAIVE") the rows/s)  
planted/clean compare: $(ratio "$T_PLANT" "$T_CMP") the time
REPORT
if [[ $LIVE -eq 1 ]]; then
  cat <<REPORT

Under live writes (pgbench through Tandem in dual-write, $LIVE_RATE updates/s of random rows):
full scan $(printf %.2f "$T_LSCAN") s before and $(printf %.2f "$T_LSCAN2") s after the compares;
tandem compare $(printf %.2f "$T_LIVE") s (0 differences, ${TRANSIENT:-0} transient; $LIVE_HOW),
$(ratio "$T_LIVE" "$T_LSCAN") the scan before, $(ratio "$T_LIVE" "$T_CMP") a quiet clean compare.
REPORT
fi
if [[ -n "$BASE_BIN" ]]; then
  cat <<REPORT

### Side by side: baseline $(basename "$BASE_BIN") against $(basename "$TANDEM_BIN"), alternating on the same clusters

| run | baseline s | new s | new/baseline |
|---|---:|---:|---:|
| clean, 1st | $(printf %.2f "$T_BCMP") | $(printf %.2f "$T_CMP") | $(ratio "$T_CMP" "$T_BCMP") |
| clean, 2nd | $(printf %.2f "$T_BCMP2") | $(printf %.2f "$T_CMP2") | $(ratio "$T_CMP2" "$T_BCMP2") |
| 100 planted, 1st | $(printf %.2f "$T_BPLANT") | $(printf %.2f "$T_PLANT") | $(ratio "$T_PLANT" "$T_BPLANT") |
| 100 planted, 2nd | $(printf %.2f "$T_BPLANT2") | $(printf %.2f "$T_PLANT2") | $(ratio "$T_PLANT2" "$T_BPLANT2") |
$(if [[ $LIVE -eq 1 ]]; then
  echo "| live writes, 1st | $(printf %.2f "$T_BLIVE") | $(printf %.2f "$T_LIVE") | $(ratio "$T_LIVE" "$T_BLIVE") |"
  echo "| live writes, 2nd | $(printf %.2f "$T_BLIVE2") | $(printf %.2f "$T_LIVE2") | $(ratio "$T_LIVE2" "$T_BLIVE2") |"
fi)

baseline: clean/full scan $(ratio "$T_BCMP" "$T_SCAN"), planted/clean $(ratio "$T_BPLANT" "$T_BCMP")  
new: clean/full scan $(ratio "$T_CMP" "$T_SCAN"), planted/clean $(ratio "$T_PLANT" "$T_CMP")
REPORT
fi
