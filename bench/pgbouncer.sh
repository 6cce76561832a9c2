#!/usr/bin/env bash
# pgbouncer.sh - run a throwaway pgbouncer in front of a local PostgreSQL cluster.
#
# Instance files live under ${BENCH_DIR:-/tmp/bench}/pgbouncer-NAME/
# (pgbouncer.ini, userlist.txt, pgbouncer.log, pgbouncer.pid).
# When run as root the daemon runs as the 'postgres' OS user (pgbouncer refuses root).
#
# Vendored (code unchanged) into the Tandem repo (bench/) from the company benchmark harness
# (/work/shared/bench/pgbouncer.sh, a.k.a. tools/bench/pgbouncer.sh, 2026-11-21) so that bench/bench.sh
# works in a clone without /work/shared.
set -euo pipefail

PROG=$(basename "$0")
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
PG_OS_USER=${PG_OS_USER:-postgres}

usage() {
  cat <<EOF
Usage: $PROG start  NAME LISTEN_PORT PG_PORT [session|transaction|statement]
       $PROG stop   NAME
       $PROG status NAME      (exit 0 if running, 3 if not)

start: listen on 127.0.0.1:LISTEN_PORT and forward every database ('*') to
       127.0.0.1:PG_PORT with the given pool mode (default transaction).
       Idempotent: an instance already running with the same config is left alone;
       one with a different config is restarted.
stop:  SIGTERM the daemon by its pidfile and wait for it to exit.

Environment:
  BENCH_DIR          base dir (default /tmp/bench)
  PGBOUNCER          pgbouncer binary (default: from PATH; Debian installs it in sbin)
  PGB_POOL_SIZE      default_pool_size (default 40; must be >= clients for session mode)
  PGB_MAX_CLIENTS    max_client_conn (default 1000)
  PGB_EXTRA_CONF     extra [pgbouncer] settings, "key=value;key2=value2"
  PG_OS_USER         OS user to run as when root (default postgres)
  PG_BINDIR          PostgreSQL bin dir, for psql readiness checks (default pg_config --bindir)
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }

TMPF=
cleanup() { if [[ -n "$TMPF" ]]; then rm -f "$TMPF"; fi; }
trap cleanup EXIT

find_pgbouncer() {
  if [[ -n "${PGBOUNCER:-}" ]]; then echo "$PGBOUNCER"; return; fi
  if command -v pgbouncer >/dev/null 2>&1; then command -v pgbouncer; return; fi
  die "pgbouncer not found (apt-get install -y pgbouncer, or set PGBOUNCER)"
}

find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1; then
    local d; d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n "$d" && -x "$d/psql" ]]; then echo "$d"; return; fi
  fi
  if command -v psql >/dev/null 2>&1; then dirname "$(command -v psql)"; return; fi
  die "cannot find psql (set PG_BINDIR)"
}

as_pg() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u "$PG_OS_USER" -- "$@")
  else
    "$@"
  fi
}

valid_name() { [[ "$1" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad instance name '$1'"; }
inst_dir() { echo "$BENCH_DIR/pgbouncer-$1"; }

running_pid() {  # NAME -> prints pid if alive
  local pf; pf="$(inst_dir "$1")/pgbouncer.pid"
  [[ -s "$pf" ]] || return 1
  local pid; pid=$(head -n1 "$pf")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # make sure the pid really is a pgbouncer (pid reuse after a crash)
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == pgbouncer* ]] || return 1
  echo "$pid"
}

render_ini() {  # NAME LISTEN_PORT PG_PORT MODE
  local dir; dir=$(inst_dir "$1")
  cat <<EOF
; written by $PROG
[databases]
* = host=127.0.0.1 port=$3

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = postgres
stats_users = postgres
pool_mode = $4
default_pool_size = ${PGB_POOL_SIZE:-40}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = ${PGB_MAX_CLIENTS:-1000}
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
server_reset_query = DISCARD ALL
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
EOF
  if [[ -n "${PGB_EXTRA_CONF:-}" ]]; then
    tr ';' '\n' <<<"$PGB_EXTRA_CONF" | sed '/^[[:space:]]*$/d; s/=/ = /'
  fi
}

cmd_start() {
  [[ $# -ge 3 && $# -le 4 ]] || { usage >&2; exit 2; }
  local name=$1 lport=$2 pgport=$3 mode=${4:-transaction}
  valid_name "$name"
  [[ "$lport" =~ ^[0-9]+$ && "$pgport" =~ ^[0-9]+$ ]] || die "ports must be numeric"
  case "$mode" in session | transaction | statement) ;; *) die "bad pool mode '$mode'" ;; esac

  local bin bindir dir ini tmp
  bin=$(find_pgbouncer); bindir=$(find_bindir)
  dir=$(inst_dir "$name"); ini="$dir/pgbouncer.ini"
  mkdir -p "$dir"
  tmp=$(mktemp "$dir/.ini.XXXXXX")
  TMPF=$tmp
  render_ini "$name" "$lport" "$pgport" "$mode" >"$tmp"

  local pid
  if pid=$(running_pid "$name"); then
    if cmp -s "$tmp" "$ini"; then
      echo "$PROG: '$name' already running (pid $pid, port $lport, $mode)"
      return 0
    fi
    echo "$PROG: '$name' config changed; restarting" >&2
    cmd_stop "$name" >/dev/null
  fi

  mv "$tmp" "$ini"
  TMPF=
  echo '"postgres" ""' >"$dir/userlist.txt"
  if [[ $EUID -eq 0 ]]; then chown -R "$PG_OS_USER" "$dir"; fi
  rm -f "$dir/pgbouncer.pid"

  if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$lport" -t 1 >/dev/null 2>&1; then
    die "port $lport is already in use"
  fi

  as_pg "$bin" -d "$ini" || { tail -n 20 "$dir/pgbouncer.log" >&2 || true; die "pgbouncer failed to start"; }

  local i
  for ((i = 0; i < 100; i++)); do
    if "$bindir/psql" -X -q -h 127.0.0.1 -p "$lport" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
      echo "$PROG: '$name' ready on 127.0.0.1:$lport -> 127.0.0.1:$pgport ($mode, pid $(running_pid "$name"))"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$dir/pgbouncer.log" >&2 || true
  die "pgbouncer '$name' not answering on port $lport (is PostgreSQL up on $pgport?)"
}

cmd_stop() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  valid_name "$1"
  local pid i
  if ! pid=$(running_pid "$1"); then
    echo "$PROG: '$1' not running"
    return 0
  fi
  kill -TERM "$pid"
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "$PROG: '$1' stopped"; return 0; }
    sleep 0.1
  done
  die "pgbouncer pid $pid did not exit after SIGTERM"
}

cmd_status() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  valid_name "$1"
  local pid ini
  ini="$(inst_dir "$1")/pgbouncer.ini"
  if pid=$(running_pid "$1"); then
    echo "running pid=$pid port=$(sed -n 's/^listen_port = //p' "$ini") mode=$(sed -n 's/^pool_mode = //p' "$ini")"
    return 0
  fi
  echo "stopped"
  return 3
}

main() {
  local cmd=${1:-}
  [[ -n "$cmd" ]] || { usage >&2; exit 2; }
  shift
  case "$cmd" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
