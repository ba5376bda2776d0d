#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests; the end-to-end
# tests against real PostgreSQL 15 clusters three times (file:// repositories, s3:// repositories
# on a real S3 server: Garage on loopback, az:// repositories on Azurite); the fault tests; the
# version matrix (real PostgreSQL 13, 14, 15, 16, 17 and 18 servers end to end on file://); and
# every fuzz target replaying its committed seeds and the findings beside the checkout (random
# exploration is scripts/fuzz.sh, run on its own: docs/FUZZING.md); the shipped Prometheus
# alert rules through promtool (deploy/prometheus); the Kubernetes example against the Kubernetes
# schemas (deploy/kubernetes); and, with podman, the deployment for real: the container story
# (scripts/container-test.sh) and the Debian package installed in a clean container booting
# systemd (packaging/test-deb.sh). Installs PostgreSQL 15, the matrix's servers, Garage, Azurite,
# cargo-fuzz, promtool, kubernetes-validate, podman and mmdebstrap when missing. Prints how long
# each part took, and says plainly which parts it skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${WALVAULT_TEST_THREADS:-2}
timings=()
skipped=()
# Run a part that exits 77 when this machine cannot run it (no container runtime): say so, and
# go on.
skippable() {
  local rc=0
  "$@" || rc=$?
  if [ "$rc" = 77 ]; then
    echo "walvault: SKIPPED $* (podman cannot run containers on this machine)" >&2
    skipped+=("$*")
    return 0
  fi
  return "$rc"
}
part() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  timings+=("$(printf '%-44s %5d s' "$name" $((SECONDS - start)))")
}
part "dependencies" scripts/ensure-deps.sh
part "fmt" cargo fmt --all --check
part "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# The architecture's limits (docs/ARCHITECTURE.md): binary sizes, function and file lengths,
# typed errors, no import circles.
part "architecture" python3 scripts/arch-check.py
# The alert rules in deploy/prometheus: valid, and each alert firing and silent where its unit
# tests say (the metric names they use are checked against the daemon's by a unit test in
# shared/src/commands/daemon/metrics.rs).
part "alert rules (promtool)" scripts/check-alerts.sh
# The end-to-end tests drive the agent binaries: build them with the same profile first.
part "build" cargo build --release --workspace --bins --locked
# The fuzz targets (built with libFuzzer's instrumentation and AddressSanitizer) take some 12
# minutes of both cores from cold, and the parts below mostly wait on PostgreSQL, fsync, the
# stores and the containers: the targets are built beside them, at the lowest CPU and I/O
# priority, and the fuzz part at the end waits for that build (in its own log until then).
fuzz_build_log=$(mktemp)
# In its own process group (setsid): if the suite stops early, the trap stops the whole build,
# cargo and rustc with it.
setsid nice -n 19 ionice -c 3 scripts/fuzz-build.sh >"$fuzz_build_log" 2>&1 &
fuzz_build=$!
trap 'kill -- -"$fuzz_build" 2>/dev/null || true; rm -f "$fuzz_build_log"' EXIT
fuzz_built() {
  local rc=0
  wait "$fuzz_build" || rc=$?
  cat "$fuzz_build_log"
  if [ "$rc" != 0 ]; then
    echo "walvault: building the fuzz targets failed (exit $rc)" >&2
    return "$rc"
  fi
}
# The Kubernetes example (deploy/kubernetes), strictly against the Kubernetes schemas.
part "kubernetes manifests (strict)" scripts/validate-kubernetes.sh
# Deployment that has run: images built from Debian's packages (no registry), PostgreSQL archiving
# with the daemon as a sidecar, backups, a point-in-time restore checked row for row and a drill,
# all in containers; then the .deb installed in a clean container booting systemd.
part "containers (podman)" skippable env BIN_DIR=target/release scripts/container-test.sh --keep-images
part "Debian package (clean container, systemd)" skippable env BIN_DIR=target/release packaging/test-deb.sh
# Unit and property tests, end-to-end tests on file:// repositories, and the fault tests (each
# runs its own Garage, whatever the store below).
part "unit + e2e on file:// (PostgreSQL 15) + faults" \
  cargo test --release --workspace --locked -- --test-threads "$threads" --skip matrix_
# The version matrix: every supported release with a server here, on file://.
part "version matrix (PostgreSQL 13 to 18, file://)" \
  cargo test --release -p walvault-testkit --locked matrix_ -- --test-threads "$threads"
# The end-to-end tests again, every repository on S3, then on Azure Blob storage.
part "e2e on s3:// (Garage, PostgreSQL 15)" env WALVAULT_TEST_STORE=s3 \
  cargo test --release -p walvault-testkit --locked -- --test-threads "$threads" --skip fault_ --skip matrix_
part "e2e on az:// (Azurite, PostgreSQL 15)" env WALVAULT_TEST_STORE=azure \
  cargo test --release -p walvault-testkit --locked -- --test-threads "$threads" --skip fault_ --skip matrix_
# Hostile input: every committed seed and known finding through its fuzz target, once each (the
# same verdict on every machine; no time-bounded exploration here). The targets were built in the
# background (above); the replay's own build finds them up to date.
part "fuzz (waiting for the background build)" fuzz_built
part "fuzz" scripts/fuzz-replay.sh
echo "walvault: time per part" >&2
printf '  %s\n' "${timings[@]}" >&2
if [ ${#skipped[@]} -gt 0 ]; then
  echo "walvault: SKIPPED (not run on this machine):" >&2
  printf '  %s\n' "${skipped[@]}" >&2
fi
