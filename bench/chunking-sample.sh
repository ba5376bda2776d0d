#!/usr/bin/env bash
# Two copies of one PostgreSQL 15 data directory, before and after changing about 1% of it
# (pgbench at scale 50, then an update of 1% of pgbench_accounts and a checkpoint).
# Usage: bench/chunking-sample.sh OUT_DIR   (creates OUT_DIR/before and OUT_DIR/after)
set -euo pipefail
out=${1:?usage: bench/chunking-sample.sh OUT_DIR}
bin=${WALVAULT_PG_BIN:-/usr/lib/postgresql/15/bin}
work=$(mktemp -d /tmp/walvault-chunking.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres: "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
as_pg "$bin/initdb" -A trust -U postgres -D "$work/data" >/dev/null
pgctl() { as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w -o "-p $port -k $work" "$@" >/dev/null; }
pgctl start
"$bin/pgbench" -h "$work" -p "$port" -U postgres -i -s 50 -q postgres 2>/dev/null
"$bin/psql" -X -q -h "$work" -p "$port" -U postgres -c "vacuum analyze" -c checkpoint postgres
pgctl stop
rm -rf "$out/before" "$out/after"; mkdir -p "$out"
cp -a "$work/data" "$out/before"
pgctl start
"$bin/psql" -X -q -h "$work" -p "$port" -U postgres -c "update pgbench_accounts set abalance = abalance + 1 where aid <= 50000" -c checkpoint postgres
pgctl stop
cp -a "$work/data" "$out/after"
du -sh "$out/before" "$out/after"
