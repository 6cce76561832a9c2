#!/usr/bin/env bash
# backfill-load.sh - tandem backfill under live load: pgbench tpcb-like through Tandem in
# dual-write while the backfill copies pgbench_accounts, the table pgbench is writing.
#
# Starts two throwaway clusters (bench/pgcluster.sh) and Tandem's proxy in front of them. Old
# gets pgbench -i -s SCALE (SCALE x 100k accounts); new gets pgbench_branches, _tellers and
# _history copied, and an empty pgbench_accounts. Then, in one run on the same clusters:
#   (a) pg_dump -t pgbench_accounts old | psql new, idle: the offline reference (rows/s)
#   (b) for each --rate R (0 = none), --rounds times: new's pgbench_accounts emptied, mirror
#       on, pgbench tpcb-like through the proxy for the whole case, with per-second progress;
#       WINDOW s without a backfill, then 'tandem backfill --path snapshot --restart --rate R'
#       of pgbench_accounts, then WINDOW s after it. pgbench's TPS during the backfill is set
#       against the mean of its TPS before and after (the same run, the same stores). Then
#       pgbench stops and the script asserts that both stores' pgbench tables hash equal,
#       by a row hash of their own (count and sum of hashtextextended of each row's text),
#       with no repair run.
# Prints, per case: TPS before/during/after and the loss, the backfill's rows/s and its ratio
# to (a), and how many chunks took the straight COPY against the staging table (and how many
# straight COPYs were raced by a mirrored write and loaded again staged). Markdown on stdout,
# progress on stderr. Every process it starts (clusters, proxy, pgbench) is stopped on exit.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/tmp/tandem-bench}
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

SCALE=10
CLIENTS=8
JOBS=2
WORKERS=2
CHUNK=10000
WINDOW=15
ROUNDS=1
RATES="0 50000"
OLD_PORT=${BL_OLD_PORT:-25631}
NEW_PORT=${BL_NEW_PORT:-25632}
T_PORT=$((OLD_PORT + 2))
A_PORT=$((OLD_PORT + 3))
OLD_CLUSTER=tandem-bl-old
NEW_CLUSTER=tandem-bl-new
DBNAME=blbench
BUILD=1
KEEP=0
EXTRA=()
TANDEM_BIN=${TANDEM_BIN:-$REPO/bin/tandem}

usage() {
  cat <<USAGE
Usage: $PROG [options]

  --scale N      pgbench scale: N x 100000 rows in pgbench_accounts (default $SCALE)
  --clients N    pgbench clients (default $CLIENTS; -j $JOBS)
  --rates "R.."  backfill --rate values, one case each, 0 = no rate (default "$RATES")
  --rounds N     repeat the cases N times, in alternating order (default $ROUNDS)
  --window S     seconds of pgbench before and after each backfill (default $WINDOW)
  --workers N    tandem backfill --workers (default $WORKERS)
  --chunk N      tandem backfill --chunk (default $CHUNK)
  --backfill-arg A  pass A to tandem backfill (repeatable)
  --no-build     do not run 'go build'; use \$TANDEM_BIN (default bin/tandem)
  --keep         leave both clusters running on exit
  -h, --help     this help

Clusters '$OLD_CLUSTER' (:$OLD_PORT) and '$NEW_CLUSTER' (:$NEW_PORT) live under \$BENCH_DIR;
the proxy listens on :$T_PORT, its admin on :$A_PORT. Environment: BENCH_DIR, PG_BINDIR,
TANDEM_BIN, BL_OLD_PORT, BL_NEW_PORT.
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --scale) SCALE=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --window) WINDOW=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --chunk) CHUNK=$2; shift 2 ;;
    --backfill-arg) EXTRA+=("$2"); shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
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
PGBENCH=$(bin pgbench) || die "pgbench not found"

for p in "$OLD_PORT" "$NEW_PORT" "$T_PORT" "$A_PORT"; do
  if (: </dev/tcp/127.0.0.1/"$p") 2>/dev/null; then die "port $p is in use"; fi
done

if [[ $BUILD -eq 1 ]]; then
  log "go build -o $TANDEM_BIN ./cmd/tandem"
  (cd "$REPO" && go build -o "$TANDEM_BIN" ./cmd/tandem)
fi
[[ -x "$TANDEM_BIN" ]] || die "no Tandem binary at $TANDEM_BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bl.XXXXXX")
CFG="$WORK/tandem.yaml"
PROXY_PID=
BENCH_PID=
BF_PID=
stop_pid() { # PID [signal]: stop it and wait
  [[ -n "$1" ]] || return 0
  kill -"${2:-TERM}" "$1" 2>/dev/null || return 0
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  stop_pid "$BF_PID"; stop_pid "$BENCH_PID"; stop_pid "$PROXY_PID" # (SIGTERM: a background job ignores SIGINT)
  if [[ $KEEP -eq 0 ]]; then
    "$HERE/pgcluster.sh" stop "$OLD_CLUSTER" >&2
    "$HERE/pgcluster.sh" stop "$NEW_CLUSTER" >&2
  fi
  [[ $rc -eq 0 ]] && rm -rf "$WORK" || log "logs kept in $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

q() { local port=$1; shift; "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DBNAME" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }
ROWS=$((SCALE * 100000))
rate() { awk -v n="$ROWS" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }

"$HERE/pgcluster.sh" start "$OLD_CLUSTER" "$OLD_PORT" >&2
"$HERE/pgcluster.sh" start "$NEW_CLUSTER" "$NEW_PORT" >&2
for port in "$OLD_PORT" "$NEW_PORT"; do
  "$PSQL" -X -w -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "drop database if exists $DBNAME" -c "create database $DBNAME" >&2
done
log "pgbench -i -s $SCALE on old"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$OLD_PORT" -U postgres "$DBNAME" >"$WORK/init.log" 2>&1 \
  || { cat "$WORK/init.log" >&2; die "pgbench -i failed"; }
q "$OLD_PORT" -c "vacuum analyze" >&2
log "copying pgbench_branches, _tellers, _history and pgbench_accounts' definition to new"
"$PG_DUMP" -h 127.0.0.1 -p "$OLD_PORT" -U postgres -t pgbench_branches -t pgbench_tellers -t pgbench_history "$DBNAME" \
  | q "$NEW_PORT" -o /dev/null >&2
"$PG_DUMP" -h 127.0.0.1 -p "$OLD_PORT" -U postgres -s -t pgbench_accounts "$DBNAME" | q "$NEW_PORT" -o /dev/null >&2

log "(a) pg_dump -t pgbench_accounts | psql, idle"
q "$NEW_PORT" -c "drop table pgbench_accounts" -c checkpoint >&2
q "$OLD_PORT" -c checkpoint >&2
t0=$(now)
"$PG_DUMP" -h 127.0.0.1 -p "$OLD_PORT" -U postgres -t pgbench_accounts "$DBNAME" | q "$NEW_PORT" -o /dev/null >&2
T_DUMP=$(since "$t0")
n=$(q "$NEW_PORT" -Atc "select count(*) from pgbench_accounts")
[[ "$n" == "$ROWS" ]] || die "pg_dump | psql left $n rows on new, want $ROWS"

cat >"$CFG" <<YAML
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
YAML
# The backfill logs at info: each straight COPY a mirrored write raced, with the key it met.
sed 's/level: warn/level: info/' "$CFG" >"$WORK/backfill.yaml"
"$TANDEM_BIN" route set -c "$CFG" --mirror on --reason "bench: backfill under load" >"$WORK/route.log" 2>&1 \
  || { cat "$WORK/route.log" >&2; die "tandem route set --mirror on failed"; }
"$TANDEM_BIN" proxy -c "$CFG" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
for ((i = 0; i < 100; i++)); do
  kill -0 "$PROXY_PID" 2>/dev/null || { tail -n 20 "$WORK/proxy.log" >&2; die "tandem proxy exited"; }
  "$PSQL" -X -w -h 127.0.0.1 -p "$T_PORT" -U postgres -d "$DBNAME" -Atc 'select 1' >/dev/null 2>&1 && break
  sleep 0.1
done
log "proxy in dual-write on :$T_PORT (pid $PROXY_PID)"

# tables_hash PORT: each pgbench table's row count and sum of its rows' text hashes, one line.
tables_hash() {
  q "$1" -Atc "select string_agg(h, ' ' order by h) from (
      select 'accounts ' || count(*) || ' ' || coalesce(sum(hashtextextended(t::text, 0)), 0) h from pgbench_accounts t
      union all select 'branches ' || count(*) || ' ' || coalesce(sum(hashtextextended(t::text, 0)), 0) from pgbench_branches t
      union all select 'tellers ' || count(*) || ' ' || coalesce(sum(hashtextextended(t::text, 0)), 0) from pgbench_tellers t) x"
}
# tps_window LOG START FROM TO: mean of pgbench's per-second progress TPS over the seconds
# whose end falls in [FROM, TO) (epoch seconds; pgbench started at START).
tps_window() {
  awk -v s="$2" -v a="$3" -v b="$4" '$1 == "progress:" { t = s + $2; if (t > a && t <= b) { sum += $4; n++ } }
    END { if (n) printf "%.0f", sum / n; else print "" }' "$1"
}
field() { grep -o "\"$1\": *[0-9]*" "$2" | grep -o '[0-9]*$' | head -1; }

RESULTS=()
case_run() { # RATE ROUND
  local r=$1 round=$2 name="rate$1-r$2"
  log "case --rate $r, round $round: emptying new's pgbench_accounts"
  q "$NEW_PORT" -c "truncate pgbench_accounts" -c "vacuum analyze pgbench_accounts" -c checkpoint >&2
  for p in "$OLD_PORT" "$NEW_PORT"; do q "$p" -c "vacuum pgbench_branches" -c "vacuum pgbench_tellers" -c checkpoint >&2; done
  local plog="$WORK/pgbench-$name.log" bflog="$WORK/backfill-$name.json" start t0 t1 rc=0
  start=$(now)
  "$PGBENCH" -n -c "$CLIENTS" -j "$JOBS" -T 7200 -P 1 -h 127.0.0.1 -p "$T_PORT" -U postgres "$DBNAME" >"$plog" 2>&1 &
  BENCH_PID=$!
  sleep "$WINDOW"
  kill -0 "$BENCH_PID" 2>/dev/null || { tail -n 20 "$plog" >&2; die "pgbench exited"; }
  log "case --rate $r: tandem backfill under pgbench"
  t0=$(now)
  "$TANDEM_BIN" backfill -c "$WORK/backfill.yaml" --table pgbench_accounts --path snapshot --restart --workers "$WORKERS" --chunk "$CHUNK" \
    --rate "$r" --json "${EXTRA[@]}" >"$bflog" 2>"$bflog.err" &
  BF_PID=$!
  wait "$BF_PID" || rc=$?
  BF_PID=
  t1=$(now)
  [[ $rc -eq 0 ]] || { tail -n 20 "$bflog.err" >&2; cat "$bflog" >&2; die "tandem backfill --rate $r failed (exit $rc)"; }
  grep -q '"path": *"snapshot"' "$bflog" || { cat "$bflog" >&2; die "tandem backfill did not take the snapshot path"; }
  sleep "$WINDOW"
  stop_pid "$BENCH_PID"
  BENCH_PID=
  grep -q 'aborted' "$plog" && { tail -n 20 "$plog" >&2; die "pgbench clients aborted"; }
  # pgbench's last mirrored writes may still be in flight to new when it exits: give them
  # up to 10 s to land, then the stores must hash equal.
  local ho hn i
  for ((i = 0; i < 20; i++)); do
    ho=$(tables_hash "$OLD_PORT"); hn=$(tables_hash "$NEW_PORT")
    [[ "$ho" != "$hn" ]] || break
    sleep 0.5
  done
  [[ "$ho" == "$hn" ]] || die "after the backfill --rate $r the stores differ: old '$ho', new '$hn'"
  [[ "$ho" == "accounts $ROWS "* ]] || die "old's pgbench_accounts: $ho"
  log "case --rate $r: stores equal ($ho)"
  local before during after loss tbf
  before=$(tps_window "$plog" "$start" "$(awk -v t="$t0" -v w="$WINDOW" 'BEGIN { printf "%.3f", t - w }')" "$t0")
  during=$(tps_window "$plog" "$start" "$t0" "$t1")
  after=$(tps_window "$plog" "$start" "$t1" "$(awk -v t="$t1" -v w="$WINDOW" 'BEGIN { printf "%.3f", t + w }')")
  loss=$(awk -v b="$before" -v a="$after" -v d="$during" 'BEGIN { printf "%.1f", 100 * (1 - d / ((b + a) / 2)) }')
  tbf=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
  local straight staged raced
  straight=$(field chunks_straight "$bflog"); staged=$(field chunks_staged "$bflog"); raced=$(field chunks_straight_raced "$bflog")
  local load; load=$(cut -d' ' -f1 /proc/loadavg)
  log "case --rate $r: tps $before / $during / $after (loss $loss%), backfill $(printf %.1f "$tbf") s, chunks straight $straight staged $staged raced $raced, load $load"
  RESULTS+=("| $r | $round | $before | $during | $after | $loss% | $(printf %.1f "$tbf") | $(rate "$tbf") | $(awk -v a="$(rate "$tbf")" -v b="$(rate "$T_DUMP")" 'BEGIN { printf "%.2fx", a / b }') | ${straight:-0} / ${staged:-0} (${raced:-0} raced) | equal | $load |")
}

read -r -a RATE_LIST <<<"$RATES"
for ((round = 1; round <= ROUNDS; round++)); do
  if ((round % 2 == 1)); then order=("${RATE_LIST[@]}"); else order=(); for ((i = ${#RATE_LIST[@]} - 1; i >= 0; i--)); do order+=("${RATE_LIST[$i]}"); done; fi
  for r in "${order[@]}"; do case_run "$r" "$round"; done
done
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

echo "## Backfill under load: pgbench_accounts, $ROWS rows (scale $SCALE), pgbench tpcb-like -c $CLIENTS -j $JOBS through Tandem in dual-write, load average $LOAD"
echo
echo "pg_dump -t pgbench_accounts | psql, idle: $(printf %.1f "$T_DUMP") s, $(rate "$T_DUMP") rows/s. tandem backfill --path snapshot --workers $WORKERS --chunk $CHUNK${EXTRA[*]:+ ${EXTRA[*]}}."
echo
echo "| --rate | round | TPS before | TPS during | TPS after | TPS loss | backfill s | rows/s | /pg_dump | chunks straight / staged | stores | load |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"
printf '%s\n' "${RESULTS[@]}"
echo
echo "TPS loss: 1 - during / mean(before, after), from pgbench's per-second progress; stores: both stores' pgbench tables hash equal after pgbench stopped (asserted)."
