#!/usr/bin/env bash
# The container story, run for real with podman (no Docker engine, no registry): images built from
# Debian's packages (docker/build-images.sh), a Garage S3 server container holding the repository,
# PostgreSQL 15 archiving through `archive-agent push %p` in the walvault container, the daemon as a
# sidecar container sharing the data volume and taking a scheduled backup, a workload and a
# recorded moment, then a point-in-time restore in a fresh container whose table equals, row for
# row, what it held at that moment, and a drill run in a container that must pass. Everything it
# starts is removed at the end (images too, unless --keep-images).
#
# Installs podman, runc and mmdebstrap (apt) when missing and, when no containers.conf sets them,
# cgroup_manager = "cgroupfs" and default_ulimits = []. Runs as root. Exit status: 0 when every
# check passed, 1 on a failure, 77 when this machine cannot run containers (skipped).
# Environment: BIN_DIR, GARAGE_BIN, DEBIAN_MIRROR as for docker/build-images.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
keep_images=0
for arg in "$@"; do
  case $arg in
    --keep-images) keep_images=1 ;;
    *) echo "usage: $0 [--keep-images]" >&2; exit 2 ;;
  esac
done
SKIP=77
say() { echo "container-test: $*" >&2; }
skip() { say "SKIPPED: $*"; exit $SKIP; }
# On failure, the last lines of each of this run's containers say why (they are removed next).
fail() {
  say "FAILED: $*"
  if [ -n "${p:-}" ]; then
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^$p-" || true); do
      say "--- the last lines of container $c:"
      podman logs --tail 20 "$c" 2>&1 | sed 's/^/    /' >&2 || true
    done
  fi
  exit 1
}
checked() { say "ok: $*"; }
started=$SECONDS

[ "$(id -u)" = 0 ] || skip "needs root (podman as root, mmdebstrap's root mode)"
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v runc >/dev/null; then
  say "installing podman, runc and mmdebstrap from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc mmdebstrap >/dev/null || skip "apt-get install podman runc mmdebstrap failed"
fi
# Containers in a container: cgroupfs (no systemd to ask), no ulimits to raise, runc.
# A containers.conf of the machine's own is left alone; the settings go into a drop-in beside it.
if ! grep -qs cgroup_manager /etc/containers/containers.conf /etc/containers/containers.conf.d/*.conf; then
  conf_file=/etc/containers/containers.conf
  if [ -e $conf_file ]; then conf_file=/etc/containers/containers.conf.d/50-walvault.conf; fi
  mkdir -p "$(dirname $conf_file)"
  printf '%s\n' '[containers]' 'default_ulimits = []' '[engine]' 'cgroup_manager = "cgroupfs"' \
    'runtime = "runc"' > $conf_file
  say "wrote $conf_file"
fi
podman info >/dev/null 2>&1 || skip "podman info fails here: $(podman info 2>&1 | tail -1)"

p=walvault-ct-$$
work=$(mktemp -d /tmp/walvault-ct.XXXXXX)
chmod 0755 "$work"
cleanup() {
  local rc=$? c
  if [ $rc != 0 ] && [ $rc != $SKIP ]; then
    for c in "$p-garage" "$p-pg" "$p-daemon" "$p-restored"; do
      podman container exists "$c" 2>/dev/null || continue
      say "last lines of $c:"
      podman logs --tail 25 "$c" 2>&1 | sed 's/^/    /' >&2
    done
  fi
  podman rm -f -t 5 "$p-garage" "$p-pg" "$p-daemon" "$p-restored" >/dev/null 2>&1 || true
  podman volume rm -f "$p-garage" "$p-pgdata" "$p-restore" >/dev/null 2>&1 || true
  if [ $keep_images = 0 ] && [ -n "${images_built:-}" ]; then
    podman rmi -f walvault:bookworm walvault-garage:bookworm walvault-base:bookworm \
      walvault-garage-base:bookworm >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  say "removed containers, volumes and $work; $((SECONDS - started)) s in all"
  exit $rc
}
trap cleanup EXIT
trap 'exit 1' INT TERM

build_start=$SECONDS
docker/build-images.sh
images_built=1
say "images ready in $((SECONDS - build_start)) s"
podman run --rm --network host walvault:bookworm true >/dev/null 2>&1 ||
  skip "podman cannot run a container here: $(podman run --rm --network host walvault:bookworm true 2>&1 | tail -1)"

# Six free ports, distinct: all bound at once before any is let go (one at a time, the kernel may
# hand out the same port twice, and Garage, given one port for two of its listeners, never
# starts).
read -r s3_port rpc_port admin_port pg_port restored_port metrics_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
key_id=GK$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
pg_password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
bucket=walvault
run() { podman run --network host "$@"; }
# As deploy/kubernetes does: every walvault container reads the repository and the endpoint from
# a mounted walvault.toml (no secrets in it) and the S3 keys from its environment, which
# archive_command and the drill's restore_command inherit.
cat > "$work/walvault.toml" <<EOF
repo = "s3://$bucket/pg15"
[s3]
endpoint = "http://127.0.0.1:$s3_port"
region = "garage"
allow_http = true
EOF
chmod 0644 "$work/walvault.toml"
conf=(-v "$work/walvault.toml:/etc/walvault/walvault.toml:ro" -e AWS_ACCESS_KEY_ID="$key_id"
  -e AWS_SECRET_ACCESS_KEY="$secret")
as_pg_sql() { podman exec -u postgres "$1" psql -X -q -At -p "$2" -d postgres -v ON_ERROR_STOP=1 -c "$3"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2 t=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ $t -le $((limit * 2)) ] || fail "$what did not happen within $limit s"
    sleep 0.5
  done
}

# 1. The S3 server, with its key and bucket.
run -d --name "$p-garage" -v "$p-garage:/var/lib/garage" -e GARAGE_BIND=127.0.0.1 \
  -e GARAGE_S3_PORT="$s3_port" -e GARAGE_RPC_PORT="$rpc_port" -e GARAGE_ADMIN_PORT="$admin_port" \
  -e GARAGE_KEY_ID="$key_id" -e GARAGE_SECRET_KEY="$secret" -e GARAGE_BUCKET="$bucket" \
  walvault-garage:bookworm >/dev/null
garage_ready() { podman logs "$p-garage" 2>&1 | grep -q "bucket $bucket ready"; }
wait_for 90 "Garage's bucket" garage_ready
podman exec "$p-garage" garage -c /etc/garage.toml bucket info "$bucket" | grep -q "$key_id" ||
  fail "bucket $bucket does not list key $key_id"
checked "Garage container: S3 on 127.0.0.1:$s3_port, bucket $bucket, key $key_id allowed"

# 2. The repository, then PostgreSQL 15 archiving into it.
run --rm "${conf[@]}" walvault:bookworm sh -c 'archive-agent --version && restore-agent --version' >&2
run --rm "${conf[@]}" walvault:bookworm archive-agent init >&2
checked "archive-agent init in a container"
run -d --name "$p-pg" -v "$p-pgdata:/var/lib/postgresql/data" "${conf[@]}" \
  -e POSTGRES_PASSWORD="$pg_password" walvault:bookworm postgres -c port="$pg_port" \
  -c listen_addresses=127.0.0.1 -c archive_mode=on -c 'archive_command=archive-agent push %p' \
  -c archive_timeout=60 >/dev/null
wait_for 60 "PostgreSQL's start" podman exec -u postgres "$p-pg" pg_isready -q -p "$pg_port"
checked "PostgreSQL $(as_pg_sql "$p-pg" "$pg_port" 'show server_version') in the walvault container (port $pg_port, archive_command = $(as_pg_sql "$p-pg" "$pg_port" 'show archive_command'))"

# 3. The sidecar: the daemon on the same data volume, as postgres, backing up every 20 s.
pg_url="host=127.0.0.1 port=$pg_port user=postgres password=$pg_password dbname=postgres"
run -d --name "$p-daemon" --user postgres -v "$p-pgdata:/var/lib/postgresql/data" "${conf[@]}" \
  -e WALVAULT_PG_URL="$pg_url" walvault:bookworm archive-agent daemon \
  --pgdata /var/lib/postgresql/data/pgdata --backup-every 20s --max-wal-age 1m --metrics-addr "127.0.0.1:$metrics_port" >/dev/null
metrics() { python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics', timeout=5).read().decode())"; }
wait_for 30 "the daemon's metrics" metrics

# 4. A workload before the backup, so the restore has something to replay onto.
podman exec -u postgres "$p-pg" pgbench -q -i -s 2 -p "$pg_port" postgres >/dev/null 2>&1 ||
  fail "pgbench -i"
as_pg_sql "$p-pg" "$pg_port" "create table orders (id bigserial primary key, item text, qty int);
  insert into orders (item, qty) select 'item-' || g, g % 7 from generate_series(1, 5000) g;"
backup_done() { metrics | grep -Eq '^walvault_last_backup_timestamp_seconds [1-9]'; }
wait_for 120 "the daemon's scheduled backup" backup_done
info=$(run --rm "${conf[@]}" walvault:bookworm restore-agent info --json)
backups=$(python3 -c 'import json,sys; print(len(json.load(sys.stdin)["backups"]))' <<<"$info")
[ "$backups" -ge 1 ] || fail "the repository lists no backup after the daemon's"
checked "the daemon's scheduled backup: $backups backup(s) in the repository (restore-agent info --json)"
# The Kubernetes CronJob's backup: over the replication protocol, from a container without the
# data volume (no --pgdata, no PGDATA). A backup is named by the second it starts in: started in
# the second of the daemon's, it would be refused ("already exists; wait a second and retry").
sleep 1
run --rm "${conf[@]}" walvault:bookworm archive-agent backup --pg-url "$pg_url" >&2
info=$(run --rm "${conf[@]}" walvault:bookworm restore-agent info --json)
after=$(python3 -c 'import json,sys; print(len(json.load(sys.stdin)["backups"]))' <<<"$info")
[ "$after" -gt "$backups" ] || fail "archive-agent backup --pg-url stored no backup ($backups before, $after after)"
checked "archive-agent backup --pg-url (replication protocol, no data volume) in a container: $after backups"

# 5. Writes, the recorded moment, more writes after it.
pgbench() {
  local out
  out=$(podman exec -u postgres "$p-pg" pgbench -p "$pg_port" "$@" postgres 2>&1) || fail "pgbench $*: $out"
  grep -E '^number of transactions actually processed' <<<"$out" >&2 || true
}
pgbench -T 5 -c 2
as_pg_sql "$p-pg" "$pg_port" "insert into orders (item, qty) select 'more-' || g, g from generate_series(1, 2000) g;
  update orders set qty = qty + 1 where id % 3 = 0;"
checksum_sql="select count(*) || ' ' || md5(string_agg(o::text, ',' order by id)) from orders o"
moment=$(as_pg_sql "$p-pg" "$pg_port" "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
at_moment=$(as_pg_sql "$p-pg" "$pg_port" "$checksum_sql")
sleep 1
as_pg_sql "$p-pg" "$pg_port" "delete from orders where id % 5 = 0; insert into orders (item, qty) values ('after', 1);"
pgbench -T 3 -c 2
now=$(as_pg_sql "$p-pg" "$pg_port" "$checksum_sql")
[ "$now" != "$at_moment" ] || fail "the writes after the moment changed nothing"
switched=$(as_pg_sql "$p-pg" "$pg_port" "select pg_walfile_name(pg_switch_wal())")
archived() { [ "$(as_pg_sql "$p-pg" "$pg_port" "select last_archived_wal >= '$switched' from pg_stat_archiver")" = t ]; }
wait_for 60 "the archiving of $switched" archived
checked "moment $moment UTC recorded: orders = $at_moment; after it: $now; WAL archived through $switched"

# 6. Point-in-time restore into a fresh volume, in a fresh container, then PostgreSQL on it.
run --rm -v "$p-restore:/var/lib/postgresql/data" walvault:bookworm \
  install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data/pgdata
run --rm --user postgres -v "$p-restore:/var/lib/postgresql/data" "${conf[@]}" walvault:bookworm \
  restore-agent restore --pgdata /var/lib/postgresql/data/pgdata --target-time "$moment" >&2
run -d --name "$p-restored" -v "$p-restore:/var/lib/postgresql/data" "${conf[@]}" walvault:bookworm \
  postgres -c port="$restored_port" -c listen_addresses=127.0.0.1 -c archive_mode=off >/dev/null
promoted() { [ "$(as_pg_sql "$p-restored" "$restored_port" 'select pg_is_in_recovery()')" = f ]; }
wait_for 120 "the restored cluster's recovery" promoted
restored=$(as_pg_sql "$p-restored" "$restored_port" "$checksum_sql")
[ "$restored" = "$at_moment" ] ||
  fail "restored orders = $restored, at the moment it was $at_moment ($(podman logs --tail 20 "$p-restored" 2>&1))"
checked "restore --target-time '$moment' in a fresh container: orders = $restored, row for row as at the moment"

# 7. A drill in a container, to the same moment, with a check of its own.
mkdir -p "$work/drill"
echo "select count(*) = ${at_moment%% *} from orders" > "$work/drill/checks.sql"
chmod -R a+rX "$work/drill"
set +e
run --rm -v "$work/drill:/drill" "${conf[@]}" walvault:bookworm restore-agent drill \
  --target-time "$moment" --check-sql /drill/checks.sql --amcheck --json /drill/evidence.json >&2
drill_rc=$?
set -e
[ $drill_rc = 0 ] || fail "restore-agent drill exited $drill_rc"
evidence=$(python3 -c '
import json, sys
e = json.load(open(sys.argv[1]))
passed = [c["name"] for c in e["checks"] if c["passed"]]
ok = e["outcome"] == "passed" and len(passed) == len(e["checks"]) > 0
print("passed" if ok else "failed", "- outcome", e["outcome"], "- RTO %.1f s" % e["rto"]["measured_seconds"],
      "- %d segments replayed - %d checks passed: %s" % (e["segments_replayed"], len(passed), ", ".join(passed)))
' "$work/drill/evidence.json")
case $evidence in passed*) ;; *) fail "drill evidence: $evidence" ;; esac
checked "restore-agent drill --target-time '$moment' --check-sql --amcheck in a container: exit 0, $evidence"

say "PASSED in $((SECONDS - started)) s"
