#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests, and the
# end-to-end tests against real PostgreSQL 15 clusters. Installs PostgreSQL 15 when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests drive the agent binaries: build them with the same profile first.
cargo build --release --workspace --bins --locked
cargo test --release --workspace --locked -- --test-threads "${WALVAULT_TEST_THREADS:-2}"
