#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests, the end-to-end
# tests against real PostgreSQL 15 clusters three times (file:// repositories, s3:// repositories on
# a real S3 server: Garage on loopback, az:// repositories on Azurite), the fault tests, and every
# fuzz target for a bounded time. Installs PostgreSQL 15, Garage, Azurite and cargo-fuzz when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${WALVAULT_TEST_THREADS:-2}
scripts/ensure-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests drive the agent binaries: build them with the same profile first.
cargo build --release --workspace --bins --locked
# Unit and property tests, end-to-end tests on file:// repositories, and the fault tests (each
# runs its own Garage, whatever the store below).
cargo test --release --workspace --locked -- --test-threads "$threads"
# The end-to-end tests again, every repository on S3, then on Azure Blob storage.
WALVAULT_TEST_STORE=s3 cargo test --release -p walvault-testkit --locked -- --test-threads "$threads" --skip fault_ --skip matrix_
WALVAULT_TEST_STORE=azure cargo test --release -p walvault-testkit --locked -- --test-threads "$threads" --skip fault_ --skip matrix_
# Hostile input: each fuzz target for a bounded time.
scripts/fuzz.sh "${WALVAULT_FUZZ_SECONDS:-20}"
