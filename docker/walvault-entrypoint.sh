#!/bin/sh
# Entry point of the walvault image (docker/build-images.sh and docker/Dockerfile): `postgres ARGS`
# initialises $PGDATA on first start (as the postgres user, with data checksums, password
# authentication from POSTGRES_PASSWORD for TCP and replication connections) and runs the server as
# postgres with ARGS (`-c archive_command=...`); any other command runs as given (the daemon, backup,
# restore, drill). The environment (WALVAULT_*, AWS_*) is passed on, so archive_command sees it.
set -eu
# Any other command as given, PGDATA untouched: without it `archive-agent backup` goes over the
# replication protocol.
if [ "${1:-}" != postgres ]; then
  exec "$@"
fi
shift
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
export PGDATA
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA" "$(dirname "$PGDATA")"
  chmod 0700 "$PGDATA"
  # The socket directory: containers get an empty /run, hiding the one the package made.
  install -d -o postgres -g postgres -m 2775 /var/run/postgresql
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD: the password of the postgres role for TCP connections}"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_pg initdb --data-checksums --username=postgres --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  # TCP clients (the sidecar's --pg-url, a backup over the replication protocol) use a password.
  printf '%s\n' "host all all all scram-sha-256" "host replication all all scram-sha-256" \
    >> "$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.auto.conf"
fi
exec runuser -u postgres -- postgres -D "$PGDATA" "$@"
