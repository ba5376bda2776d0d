#!/bin/sh
# Entry point of the walvault-garage image (docker/build-images.sh): a one-node Garage S3 server for
# the compose and container examples. Writes /etc/garage.toml from the environment, starts the
# server and, when GARAGE_KEY_ID, GARAGE_SECRET_KEY and GARAGE_BUCKET are set, assigns the layout,
# imports the key and creates the bucket (each step only when not done yet, so a restart on the
# same volume keeps the data). Environment: GARAGE_BIND (0.0.0.0), GARAGE_S3_PORT (3900),
# GARAGE_RPC_PORT (3901), GARAGE_ADMIN_PORT (3903), GARAGE_REGION (garage), GARAGE_RPC_SECRET
# (64 hex digits; generated once and kept in the metadata directory when unset).
set -eu
dir=/var/lib/garage
bind=${GARAGE_BIND:-0.0.0.0}
rpc_port=${GARAGE_RPC_PORT:-3901}
mkdir -p "$dir/meta" "$dir/data"
secret=${GARAGE_RPC_SECRET:-}
if [ -z "$secret" ]; then
  [ -s "$dir/meta/rpc_secret" ] || od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$dir/meta/rpc_secret"
  secret=$(cat "$dir/meta/rpc_secret")
fi
umask 077
cat > /etc/garage.toml <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "$bind:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$secret"

[s3_api]
s3_region = "${GARAGE_REGION:-garage}"
api_bind_addr = "$bind:${GARAGE_S3_PORT:-3900}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "$bind:${GARAGE_ADMIN_PORT:-3903}"
TOML
# With arguments, run them instead of the server (`garage -c /etc/garage.toml status`, sh).
if [ $# -gt 0 ]; then
  exec "$@"
fi
garage -c /etc/garage.toml server &
server=$!
trap 'kill -TERM $server' TERM INT
g() { garage -c /etc/garage.toml "$@"; }
if [ -n "${GARAGE_KEY_ID:-}" ] && [ -n "${GARAGE_SECRET_KEY:-}" ] && [ -n "${GARAGE_BUCKET:-}" ]; then
  tries=0
  until node=$(g node id -q 2>/dev/null); do
    tries=$((tries + 1))
    [ $tries -lt 300 ] || { echo "garage-entrypoint: the server did not answer within 60 s" >&2; exit 1; }
    sleep 0.2
  done
  # The layout as the server shows it, once it answers (a failed `layout show` is not "no role":
  # taken for one, the node would never get its role and no bucket could ever be created).
  tries=0
  until layout=$(g layout show 2>/dev/null); do
    tries=$((tries + 1))
    [ $tries -lt 300 ] || { echo "garage-entrypoint: the layout could not be read within 60 s" >&2; exit 1; }
    sleep 0.2
  done
  if echo "$layout" | grep -q 'No nodes currently have a role'; then
    g layout assign -z dc1 -c 1G "${node%%@*}" >/dev/null
    g layout apply --version 1 >/dev/null
  fi
  g key info "$GARAGE_KEY_ID" >/dev/null 2>&1 ||
    g key import --yes -n walvault "$GARAGE_KEY_ID" "$GARAGE_SECRET_KEY" >/dev/null
  # The layout takes a moment to apply: retry until the bucket can be created.
  tries=0
  until g bucket info "$GARAGE_BUCKET" >/dev/null 2>&1 || g bucket create "$GARAGE_BUCKET" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ $tries -lt 300 ] || { echo "garage-entrypoint: could not create bucket $GARAGE_BUCKET" >&2; exit 1; }
    sleep 0.2
  done
  g bucket allow --read --write --owner "$GARAGE_BUCKET" --key "$GARAGE_KEY_ID" >/dev/null
  echo "garage-entrypoint: bucket $GARAGE_BUCKET ready for key $GARAGE_KEY_ID" >&2
fi
wait $server
