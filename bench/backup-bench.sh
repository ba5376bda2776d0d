#!/usr/bin/env bash
# Base backup and restore of one data directory, in one run: walvault against pg_basebackup -Ft
# and pgBackRest (full backup, restore, and a differential backup after a ~1% change).
# Prints a table and writes JSON. Measurements, not pass/fail.
# Usage: bench/backup-bench.sh [PGBENCH_SCALE] [JSON_OUT]   (installs pgbackrest when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-50}
json_out=${2:-bench/results/backup.json}
bin=${WALVAULT_PG_BIN:-/usr/lib/postgresql/15/bin}
command -v pgbackrest >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
cargo build --release -p archive-agent -p restore-agent >/dev/null 2>&1
work=$(mktemp -d /tmp/walvault-bench.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$work/bin" "$work/pgbr" "$work/spool"
cp target/release/archive-agent target/release/restore-agent "$work/bin/"
[ "$(id -u)" = 0 ] && chown -R postgres: "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
repo="file://$work/repo"
cat >"$work/pgbackrest.conf" <<CONF
[global]
repo1-path=$work/pgbr
repo1-retention-full=9
compress-type=zst
compress-level=3
process-max=2
spool-path=$work/spool
lock-path=$work/spool
log-path=$work/spool
log-level-console=warn
start-fast=y
[bench]
pg1-path=$work/data
pg1-port=$port
pg1-socket-path=$work
CONF
pgbr() { as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench "$@"; }
as_pg "$bin/initdb" -A trust -U postgres -D "$work/data" >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
archive_mode = on
archive_command = '$work/bin/archive-agent push --repo $repo %p && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w start >/dev/null
psql() { "$bin/psql" -X -q -At -h "$work" -p "$port" -U postgres -d postgres "$@"; }
"$bin/pgbench" -h "$work" -p "$port" -U postgres -i -s "$scale" -q postgres 2>/dev/null
psql -c "vacuum analyze" -c checkpoint
pgbr stanza-create >/dev/null
size=$(psql -c "select sum(pg_database_size(oid)) from pg_database")
secs() { python3 -c "import time; print(time.time())"; }
timed() { local t0; t0=$(secs); "$@" >/dev/null; python3 -c "import time; print(round(time.time()-$t0, 2))"; }
conn="host=$work port=$port user=postgres dbname=postgres"
wv_backup() { as_pg "$work/bin/archive-agent" backup --repo "$repo" --pgdata "$work/data" --pg-url "$conn" --json 2>/dev/null; }

t_bb=$(timed as_pg "$bin/pg_basebackup" -h "$work" -p "$port" -U postgres -D "$work/bb" -Ft -X none -c fast)
t_bbz=$(timed as_pg "$bin/pg_basebackup" -h "$work" -p "$port" -U postgres -D "$work/bbz" -Ft -X none -c fast --compress=client-zstd:3)
bbz_bytes=$(du -sb "$work/bbz" | cut -f1)
t_pgbr=$(timed pgbr --type=full backup)
pgbr_full=$(pgbr info --output=json | python3 -c 'import json,sys; b=json.load(sys.stdin)[0]["backup"][-1]; print(b["info"]["repository"]["delta"])')
t0=$(secs); wv1=$(wv_backup); t_wv=$(python3 -c "import time; print(round(time.time()-$t0, 2))")
wv1_new=$(echo "$wv1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["new_bytes"])')

psql -c "update pgbench_accounts set abalance = abalance + 1 where aid <= $((scale * 1000))" -c checkpoint
sleep 1.2
t_pgbr_diff=$(timed pgbr --type=diff backup)
pgbr_diff=$(pgbr info --output=json | python3 -c 'import json,sys; b=json.load(sys.stdin)[0]["backup"][-1]; print(b["info"]["repository"]["delta"])')
wv2=$(wv_backup)
wv2_new=$(echo "$wv2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["new_bytes"])')

mkdir -p "$work/r-bb" && chown postgres: "$work/r-bb" 2>/dev/null || true
t_r_bb=$(timed as_pg tar -xf "$work/bb/base.tar" -C "$work/r-bb")
t_r_pgbr=$(timed as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --pg1-path="$work/r-pgbr" restore)
t_r_wv=$(timed as_pg "$work/bin/restore-agent" restore --repo "$repo" --pgdata "$work/r-wv")

mib() { python3 -c "print(round($1/1048576, 1))"; }
rate() { python3 -c "print(round($size/1048576/$1, 1))"; }
printf '\ndatabase: %s MiB (pgbench scale %s)\n\n' "$(mib "$size")" "$scale"
printf '%-34s %10s %10s\n' "base backup" "seconds" "MiB/s"
printf '%-34s %10s %10s\n' "pg_basebackup -Ft (uncompressed)" "$t_bb" "$(rate "$t_bb")"
printf '%-34s %10s %10s\n' "pg_basebackup -Ft zstd:3" "$t_bbz" "$(rate "$t_bbz")"
printf '%-34s %10s %10s\n' "pgBackRest full (zst 3, 2 proc)" "$t_pgbr" "$(rate "$t_pgbr")"
printf '%-34s %10s %10s\n' "walvault backup (zstd 3)" "$t_wv" "$(rate "$t_wv")"
printf '\n%-34s %10s %10s\n' "restore" "seconds" "MiB/s"
printf '%-34s %10s %10s\n' "tar -x of pg_basebackup" "$t_r_bb" "$(rate "$t_r_bb")"
printf '%-34s %10s %10s\n' "pgBackRest restore" "$t_r_pgbr" "$(rate "$t_r_pgbr")"
printf '%-34s %10s %10s\n' "walvault restore" "$t_r_wv" "$(rate "$t_r_wv")"
printf '\n%-34s %14s %14s\n' "stored bytes" "first/full" "after 1% change"
printf '%-34s %14s %14s\n' "pg_basebackup zstd:3" "$bbz_bytes" "$bbz_bytes"
printf '%-34s %14s %14s\n' "pgBackRest full / diff" "$pgbr_full" "$pgbr_diff"
printf '%-34s %14s %14s\n' "walvault (new bytes uploaded)" "$wv1_new" "$wv2_new"
mkdir -p "$(dirname "$json_out")"
cat >"$json_out" <<JSON
{"database_bytes": $size, "scale": $scale,
 "backup_seconds": {"pg_basebackup": $t_bb, "pg_basebackup_zstd3": $t_bbz, "pgbackrest_full": $t_pgbr, "walvault": $t_wv},
 "restore_seconds": {"tar": $t_r_bb, "pgbackrest": $t_r_pgbr, "walvault": $t_r_wv},
 "stored_bytes": {"pg_basebackup_zstd3": $bbz_bytes, "pgbackrest_full": $pgbr_full, "pgbackrest_diff": $pgbr_diff, "walvault_first": $wv1_new, "walvault_second": $wv2_new}}
JSON
echo "wrote $json_out"
