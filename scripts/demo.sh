#!/usr/bin/env bash
# The main job on the embedded default: archive a real workload from a throwaway PostgreSQL 15
# cluster into a file:// repository, restore it into a second cluster through restore_command,
# and check that the data matches. Installs PostgreSQL 15 when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh demo
cargo build --release --workspace --bins --locked
exec target/release/walvault-demo "$@"
