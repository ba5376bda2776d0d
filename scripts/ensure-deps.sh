#!/usr/bin/env bash
# Install what the demo and the tests need when it is missing: PostgreSQL 15 server binaries from
# Debian's packages. Safe to run again: it installs nothing that is already there.
set -euo pipefail
pg_bin=${WALVAULT_PG_BIN:-/usr/lib/postgresql/15/bin}
if [ ! -x "$pg_bin/postgres" ] || [ ! -x "$pg_bin/pgbench" ]; then
  echo "walvault: installing PostgreSQL 15 (postgresql-15, postgresql-contrib) from Debian's packages" >&2
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql-15 postgresql-contrib >/dev/null
fi
if ! id postgres >/dev/null 2>&1; then
  echo "walvault: the tests run PostgreSQL as the 'postgres' user, which does not exist" >&2
  exit 1
fi
command -v runuser >/dev/null || { echo "walvault: runuser (util-linux) is required" >&2; exit 1; }
