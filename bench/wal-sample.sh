#!/usr/bin/env bash
# Make a sample of real WAL: a throwaway PostgreSQL 15 cluster runs pgbench mixed with inserts of
# random payloads, and archives every segment with plain `cp` into OUT_DIR.
# Usage: bench/wal-sample.sh OUT_DIR [PGBENCH_SECONDS]
set -euo pipefail
out=${1:?usage: bench/wal-sample.sh OUT_DIR [PGBENCH_SECONDS]}
secs=${2:-60}
bin=${WALVAULT_PG_BIN:-/usr/lib/postgresql/15/bin}
work=$(mktemp -d /tmp/walvault-sample.XXXXXX)
mkdir -p "$out"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres: "$work" "$out"; fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
as_pg "$bin/initdb" -A trust -U postgres -D "$work/data" >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
archive_mode = on
archive_command = 'cp %p $out/%f'
max_wal_size = 4GB
CONF
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w start >/dev/null
psql() { "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
psql -c "create table payload(id bigserial primary key, body text)"
"$bin/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -s 20 -q postgres
cat >"$work/payload.sql" <<'SQL'
insert into payload(body) select string_agg(md5(random()::text), '') from generate_series(1, 64);
SQL
"$bin/pgbench" -h 127.0.0.1 -p "$port" -U postgres -c 2 -T "$secs" -n postgres \
  -f "$work/payload.sql@1" -b tpcb-like@4 >/dev/null
psql -c "select pg_switch_wal()" >/dev/null
for _ in $(seq 1 120); do
  ready=$(ls "$work/data/pg_wal/archive_status" | grep -c '\.ready$' || true)
  [ "$ready" = 0 ] && break
  sleep 1
done
echo "$(ls "$out" | wc -l) WAL files, $(du -sh "$out" | cut -f1) in $out"
