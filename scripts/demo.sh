#!/usr/bin/env bash
# The story walvault exists for, on a throwaway PostgreSQL 15 cluster and a file:// repository:
# a walvault base backup, a DROP TABLE accident, restore-agent find naming it, the printed restore
# bringing the table back with exactly its rows, and a restore drill. Installs PostgreSQL 15 (and
# nothing else: no Garage, no Azurite) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh demo
cargo build --release --workspace --bins --locked
exec target/release/walvault-demo "$@"
