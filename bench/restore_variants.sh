#!/usr/bin/env bash
# One walvault backup, restored again and again with different restore flags, each timed until
# durable (dirty data flushed before, `sync -f` after): for deciding a restore lever by
# measurement before bench/rivals.py compares it with the rivals. Not a rival comparison.
#
#   SHAPE=pgbench SCALE=50 bench/restore_variants.sh "--sync-method syncfs" "--sync-method fsync"
#   SHAPE=many bench/restore_variants.sh ...   # 10,000 tables of 50 rows with their keys (~41,000 files)
#
# SETTLE=N waits N seconds after deleting the previous restore (ext4 without a journal, as here,
# does not reuse inodes freed in the last 60 s, which makes a restore right after a delete slower:
# docs/BENCH.md, "The disk after a deletion"; SETTLE=62 waits it out). Run as root (PostgreSQL
# runs as postgres). The cluster and its backup are kept in $WORK (default /var/tmp/walvault-rv-$SHAPE)
# and reused; delete it to start over. Binaries from $BIN (default target/release); a variant that
# begins with @DIR uses the restore-agent in DIR instead (to compare two builds, interleaved):
#   bench/restore_variants.sh "@/tmp/old" "" "@/tmp/old" ""
set -euo pipefail
SHAPE=${SHAPE:-pgbench}; SCALE=${SCALE:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}; PGB=${PGB:-/usr/lib/postgresql/15/bin}
W=${WORK:-/var/tmp/walvault-rv-$SHAPE}; PORT=${PORT:-55439}
as_pg() { runuser -u postgres -- "$@"; }
if [ ! -f "$W/ready" ]; then
  rm -rf "$W"; mkdir -p "$W/repo"; chown -R postgres "$W"
  as_pg "$PGB/initdb" -A trust -U postgres -D "$W/data" >/dev/null
  cat >> "$W/data/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$W'
archive_mode = on
archive_command = '$BIN/archive-agent push --repo file://$W/repo %p'
max_wal_size = 4GB
CONF
  as_pg "$BIN/archive-agent" init --repo "file://$W/repo" --pgdata "$W/data" >/dev/null
  as_pg "$PGB/pg_ctl" -D "$W/data" -l "$W/log" -w start >/dev/null
  case $SHAPE in
    pgbench) as_pg "$PGB/pgbench" -h "$W" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres 2>/dev/null ;;
    many)
      python3 -c 'print("\n".join(f"create table t{i} (id int primary key, v text); insert into t{i} select g, md5(g::text) from generate_series(1, 50) g;" for i in range(10000)))' > "$W/many.sql"
      as_pg "$PGB/psql" -q -h "$W" -p "$PORT" -U postgres -f "$W/many.sql" >/dev/null ;;
    *) echo "SHAPE is pgbench or many" >&2; exit 2 ;;
  esac
  as_pg "$PGB/psql" -h "$W" -p "$PORT" -U postgres -c checkpoint >/dev/null
  as_pg "$BIN/archive-agent" backup --repo "file://$W/repo" --pgdata "$W/data" \
    --pg-url "host=$W port=$PORT user=postgres" --parallel 2 >/dev/null
  as_pg "$PGB/pg_ctl" -D "$W/data" -w stop >/dev/null
  touch "$W/ready"
fi
echo "shape $SHAPE: $(find "$W/data" -type f | wc -l) files, $(du -sm "$W/data" | cut -f1) MiB"
for v in "$@"; do
  rm -rf "$W/out"; sync; sleep "${SETTLE:-0}"
  bin=$BIN; flags=$v
  if [[ $v == @* ]]; then bin=${v%% *}; bin=${bin#@}; flags=${v#"@$bin"}; fi
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # the variant is a list of flags
  as_pg "$bin/restore-agent" restore --repo "file://$W/repo" --pgdata "$W/out" $flags >/dev/null
  t1=$(date +%s.%N); sync -f "$W"; t2=$(date +%s.%N)
  printf '%-36s exited %6.2f s   durable %6.2f s\n' "$v" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t0" | bc)"
done
rm -rf "$W/out"
