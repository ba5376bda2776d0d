#!/usr/bin/env bash
# Build the cargo-fuzz targets in fuzz/ (docs/FUZZING.md), for scripts/fuzz-replay.sh (the test
# suite's replay of committed seeds and findings) and scripts/fuzz.sh (random exploration). Needs a
# nightly toolchain (rustup's `nightly`, or WALVAULT_FUZZ_TOOLCHAIN); installs cargo-fuzz when
# missing. The binaries land in fuzz/target/<host>/release/<target>.
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain=${WALVAULT_FUZZ_TOOLCHAIN:-nightly}
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
  echo "fuzz: the $toolchain toolchain is missing (libFuzzer instrumentation needs nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz --version 0.13.2
fi

started=$SECONDS
# The lock file pins what the targets are built with; a dependency added to shared/ since it was
# written makes cargo extend it (commit the change), which is not a reason to skip fuzzing.
if ! cargo "+$toolchain" fetch --locked --manifest-path fuzz/Cargo.toml >/dev/null 2>&1; then
  echo "fuzz: fuzz/Cargo.lock is out of date with shared/Cargo.toml; cargo updates it (commit it)" >&2
fi
cargo "+$toolchain" fuzz build --fuzz-dir fuzz
echo "fuzz: targets built in $((SECONDS - started)) s"
