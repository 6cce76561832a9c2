#!/usr/bin/env bash
# ensure-postgres.sh - make sure the PostgreSQL server binaries (initdb, postgres),
# psql and pgbench are installed; install them from Debian's packages when missing.
# Idempotent: does nothing when they are present. Pass "pgbouncer" to also require pgbouncer.
set -euo pipefail

want_pgbouncer=0
[[ "${1:-}" == pgbouncer ]] && want_pgbouncer=1

server_bindir() {
  local d
  if [[ -n "${PG_BINDIR:-}" && -x "$PG_BINDIR/initdb" ]]; then echo "$PG_BINDIR"; return 0; fi
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/postgres" ]]; then echo "$d"; return 0; fi
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/initdb" && -x "$d/postgres" ]]; then echo "$d"; return 0; fi
  done
  return 1
}

missing=()
if bindir=$(server_bindir); then
  [[ -x "$bindir/psql" ]] || command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  [[ -x "$bindir/pgbench" ]] || command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-contrib)
else
  missing+=(postgresql postgresql-contrib)
fi
if [[ $want_pgbouncer == 1 ]] && ! command -v pgbouncer >/dev/null 2>&1; then
  missing+=(pgbouncer)
fi
id postgres >/dev/null 2>&1 || { [[ ${#missing[@]} -gt 0 ]] || missing+=(postgresql); }

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $EUID -ne 0 ]]; then
  echo "ensure-postgres: missing ${missing[*]}; run as root or install them: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "ensure-postgres: installing ${missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
server_bindir >/dev/null || { echo "ensure-postgres: server binaries still not found after install" >&2; exit 1; }
