#!/usr/bin/env bash
# Peak RSS and time of walvault's full, second and third backups of a cluster of many files, for
# two builds run A B B A on the same cluster (README, "Issue 39, the previous backup held
# compactly"). The cluster is bench/rivals.py's `many:TABLES` shape (TABLES tables of 50 rows with
# their keys), vacuumed so that every table has its free space and visibility maps: 300,963
# files at 50,000 tables. It is made once in WORK and kept (a rerun reuses it); PostgreSQL 15 from
# Debian runs it as the postgres user on PORT.
#   bench/many_files_rss.sh BIN_A BIN_B [TABLES] [WORK] [PORT]
# BIN_A, BIN_B: directories holding archive-agent (cargo build --release -p archive-agent, copied
# aside for each build). Prints one line per backup: the phase, the build, its repository, its
# peak RSS (KiB) and its wall, user and system seconds. Each full backup goes to a new `file://`
# repository of its own, and the second and third backups go to the same.
set -euo pipefail
A=${1:?BIN_A}; B=${2:?BIN_B}; TABLES=${3:-50000}; WORK=${4:-/tmp/walvault-many-rss}; PORT=${5:-55499}
PG=/usr/lib/postgresql/15/bin
D=$WORK/data
as_pg() { runuser -u postgres -- "$@"; }
psql_() { as_pg "$PG/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }
set_archive() { psql_ -c "alter system set archive_command = '$1'" -c "select pg_reload_conf()" >/dev/null; }

mkdir -p "$WORK"; chown postgres "$WORK"; chmod 755 "$WORK"
chmod 755 "$A" "$B"
if [ ! -f "$D/PG_VERSION" ]; then
  as_pg "$PG/initdb" -A trust -U postgres -D "$D" >/dev/null
  cat >> "$D/postgresql.conf" <<EOF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
archive_mode = on
archive_command = '/bin/true'
max_wal_size = 1GB
checkpoint_timeout = 30min
max_locks_per_transaction = $(( TABLES * 3 / 100 > 256 ? TABLES * 3 / 100 : 256 ))
EOF
  as_pg "$PG/pg_ctl" -D "$D" -l "$WORK/pg.log" -w start >/dev/null
  python3 -c "
import sys
with open(sys.argv[1], 'w') as f:
    for i in range(int(sys.argv[2])):
        f.write(f'create table t{i} (id int primary key, v text); insert into t{i} select g, md5(g::text) from generate_series(1, 50) g;\n')
" "$WORK/many.sql" "$TABLES"
  chown postgres "$WORK/many.sql"
  psql_ -f "$WORK/many.sql"
  as_pg "$PG/vacuumdb" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -j 2 -q
  psql_ -c checkpoint
else
  as_pg "$PG/pg_ctl" -D "$D" -l "$WORK/pg.log" -w start >/dev/null 2>&1 || true
fi
trap 'set_archive /bin/true; as_pg "$PG/pg_ctl" -D "$D" -m fast stop >/dev/null' EXIT
echo "files: $(find "$D" -type f | wc -l)"

# backup PHASE BIN TAG: a backup into repository TAG (a new one for a full backup).
backup() {
  local phase=$1 bin=$2 repo=$WORK/repo-$3
  set_archive /bin/true
  if [ "$phase" = full ]; then
    rm -rf "$repo"; mkdir -p "$repo"; chown postgres "$repo"
    as_pg "$bin/archive-agent" --repo "file://$repo" init --pgdata "$D" >/dev/null 2>&1
  fi
  set_archive "$bin/archive-agent --repo file://$repo push %p"
  local out
  out=$( { /usr/bin/time -f "peak_kib=%M wall=%e user=%U sys=%S" runuser -u postgres -- "$bin/archive-agent" \
      --repo "file://$repo" backup --pgdata "$D" --pg-url "host=127.0.0.1 port=$PORT user=postgres" >/dev/null; } 2>&1 \
      | grep -E 'peak_kib|ERROR' | tail -1)
  echo "$phase $bin $3 $out"
}

for x in "$A a" "$B b" "$B c" "$A d"; do set -- $x; backup full "$1" "$2"; done
for x in "$A a" "$B b" "$B c" "$A d"; do set -- $x; backup second "$1" "$2"; done
for x in "$B b" "$A a" "$A d" "$B c"; do set -- $x; backup third "$1" "$2"; done
