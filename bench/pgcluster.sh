#!/usr/bin/env bash
# pgcluster.sh - start/stop throwaway PostgreSQL clusters for benchmarking.
#
# Clusters live under ${BENCH_DIR:-/tmp/bench}/NAME (data/ + postgres.log).
# Listens on 127.0.0.1:PORT only, trust auth, unix socket inside the cluster dir.
#
# Vendored (code unchanged) into the Tandem repo (bench/) from the company benchmark harness
# (/work/shared/bench/pgcluster.sh, a.k.a. tools/bench/pgcluster.sh, 2026-11-21) so that bench/bench.sh
# works in a clone without /work/shared.
set -euo pipefail

PROG=$(basename "$0")
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
PG_OS_USER=${PG_OS_USER:-postgres}   # OS user that owns/runs the cluster when we are root

usage() {
  cat <<EOF
Usage: $PROG start   NAME PORT   create (initdb, first time only) and start cluster NAME on 127.0.0.1:PORT
       $PROG stop    NAME        stop cluster NAME (fast shutdown); no-op if not running
       $PROG status  NAME        print running/stopped, port and postmaster pid (exit 0 if running, 3 if not)
       $PROG destroy NAME        stop and delete \$BENCH_DIR/NAME
       $PROG port    NAME        print the configured port

Cluster settings: trust auth (local + 127.0.0.1), superuser 'postgres', fsync default,
shared_buffers=256MB, max_connections=200, wal_level=logical, max_prepared_transactions=100.
Extra settings can be appended with PG_EXTRA_CONF="key=value;key2=value2" on 'start'
(written to bench.conf, replacing the previous extra settings).

Environment:
  BENCH_DIR   base dir for clusters (default /tmp/bench)
  PG_BINDIR   PostgreSQL bin dir (default: pg_config --bindir, else newest Debian-style install)
  PG_OS_USER  OS user to run the server as when invoked as root (default postgres)
  PG_START_TIMEOUT  seconds to wait for readiness (default 60)
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }

find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null 2>&1; then
    local d; d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n "$d" && -x "$d/pg_ctl" ]]; then echo "$d"; return; fi
  fi
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v pg_ctl)"; return; fi
  # Debian/Ubuntu layout: /usr/lib/postgresql/<ver>/bin, take the newest.
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  [[ -n "$d" && -x "$d/pg_ctl" ]] && { echo "$d"; return; }
  die "cannot find PostgreSQL binaries (set PG_BINDIR)"
}

BINDIR=$(find_bindir)

# Run a command as the cluster owner (runuser when root, directly otherwise).
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u "$PG_OS_USER" -- "$@")
  else
    "$@"
  fi
}

valid_name() { [[ "$1" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad cluster name '$1' (use [A-Za-z0-9_.-])"; }

cluster_dir() { echo "$BENCH_DIR/$1"; }

is_running() {  # NAME
  local data; data="$(cluster_dir "$1")/data"
  [[ -f "$data/PG_VERSION" ]] || return 1
  as_pg "$BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1
}

conf_port() {  # NAME -> port from bench.conf
  local f; f="$(cluster_dir "$1")/data/bench.conf"
  [[ -f "$f" ]] || return 1
  sed -n "s/^port = \([0-9]*\).*/\1/p" "$f" | tail -n1
}

write_bench_conf() {  # NAME PORT
  local dir data f
  dir=$(cluster_dir "$1"); data="$dir/data"; f="$data/bench.conf"
  {
    echo "# written by $PROG; rewritten on every start"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $2"
    echo "unix_socket_directories = '$dir'"
    echo "shared_buffers = 256MB"
    echo "max_connections = 200"
    echo "wal_level = logical"
    echo "max_prepared_transactions = 100"
    echo "max_wal_senders = 10"
    echo "max_replication_slots = 10"
    echo "logging_collector = off"
    echo "log_min_messages = warning"
    if [[ -n "${PG_EXTRA_CONF:-}" ]]; then
      echo "# PG_EXTRA_CONF"
      tr ';' '\n' <<<"$PG_EXTRA_CONF" | sed '/^[[:space:]]*$/d'
    fi
  } >"$f.tmp"
  chown "$(stat -c %U "$data")" "$f.tmp" 2>/dev/null || true
  mv "$f.tmp" "$f"
}

cmd_start() {
  [[ $# -eq 2 ]] || { usage >&2; exit 2; }
  local name=$1 port=$2 dir data log
  valid_name "$name"
  [[ "$port" =~ ^[0-9]+$ ]] || die "bad port '$port'"
  dir=$(cluster_dir "$name"); data="$dir/data"; log="$dir/postgres.log"

  if is_running "$name"; then
    local cur; cur=$(conf_port "$name" || true)
    if [[ "$cur" == "$port" ]]; then
      echo "$PROG: cluster '$name' already running on port $port"
      return 0
    fi
    echo "$PROG: cluster '$name' running on port ${cur:-?}; restarting on $port" >&2
    cmd_stop "$name"
  fi

  mkdir -p "$BENCH_DIR"
  chmod 755 "$BENCH_DIR" 2>/dev/null || true
  mkdir -p "$dir"
  if [[ $EUID -eq 0 ]]; then chown "$PG_OS_USER" "$dir"; fi

  if [[ ! -f "$data/PG_VERSION" ]]; then
    rm -rf "$data"
    echo "$PROG: initdb $data" >&2
    as_pg "$BINDIR/initdb" -D "$data" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=trust >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    echo "include_if_exists = 'bench.conf'" >>"$data/postgresql.conf"
  fi
  write_bench_conf "$name" "$port"

  # Refuse to start if something else already listens on the port.
  if "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -t 1 >/dev/null 2>&1; then
    die "port $port already has a server that is not cluster '$name'"
  fi

  local timeout=${PG_START_TIMEOUT:-60}
  as_pg "$BINDIR/pg_ctl" -D "$data" -l "$log" -w -t "$timeout" start >/dev/null \
    || { tail -n 30 "$log" >&2 || true; die "pg_ctl start failed (log: $log)"; }

  local i
  for ((i = 0; i < timeout * 10; i++)); do
    if "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
      echo "$PROG: cluster '$name' ready on 127.0.0.1:$port (pid $(head -n1 "$data/postmaster.pid"))"
      return 0
    fi
    sleep 0.1
  done
  die "cluster '$name' did not become ready within ${timeout}s (log: $log)"
}

cmd_stop() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  local name=$1 data
  valid_name "$name"
  data="$(cluster_dir "$name")/data"
  if ! is_running "$name"; then
    echo "$PROG: cluster '$name' not running"
    return 0
  fi
  as_pg "$BINDIR/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
  echo "$PROG: cluster '$name' stopped"
}

cmd_status() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  local name=$1 data
  valid_name "$name"
  data="$(cluster_dir "$name")/data"
  if is_running "$name"; then
    echo "running port=$(conf_port "$name") pid=$(head -n1 "$data/postmaster.pid") dir=$(cluster_dir "$name")"
    return 0
  fi
  echo "stopped dir=$(cluster_dir "$name")"
  return 3
}

cmd_destroy() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  valid_name "$1"
  cmd_stop "$1"
  rm -rf "$(cluster_dir "$1")"
  echo "$PROG: cluster '$1' removed"
}

cmd_port() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  valid_name "$1"
  conf_port "$1" || die "cluster '$1' has no config"
}

main() {
  local cmd=${1:-}
  [[ -n "$cmd" ]] || { usage >&2; exit 2; }
  shift
  case "$cmd" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    destroy) cmd_destroy "$@" ;;
    port) cmd_port "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
