#!/usr/bin/env bash
# The fuzz part of the test suite (docs/FUZZING.md, "One commit, one verdict"): build the
# cargo-fuzz targets, then run every committed seed (fuzz/seeds/<target>/*) and every finding
# beside the checkout (../shared/fuzz-findings/<target>-<hash>, skipped when that folder is absent)
# through its target once, deterministically: no mutation, no time budget, so a commit gets the
# same verdict on every machine. Fails when an input fails its target (a panic, a failed property,
# a hang of 10 s, an allocation of 512 MiB, 2 GiB resident, a leak), or when a finding's name
# names no target. Random exploration is scripts/fuzz.sh, run on its own.
#
#   scripts/fuzz-replay.sh                         every target
#   WALVAULT_FUZZ_TARGETS="wal_decode" scripts/fuzz-replay.sh
#   WALVAULT_FUZZ_FINDINGS=/elsewhere scripts/fuzz-replay.sh
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain=${WALVAULT_FUZZ_TOOLCHAIN:-nightly}
findings=${WALVAULT_FUZZ_FINDINGS:-../shared/fuzz-findings}
started=$SECONDS
scripts/fuzz-build.sh
built=$SECONDS

all=$(cargo "+$toolchain" fuzz list --fuzz-dir fuzz)
targets=${WALVAULT_FUZZ_TARGETS:-$all}
bin_dir=fuzz/target/$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')/release
failed=()
# A finding is named <target>-<hash>: one naming no target would never be replayed.
if [ -d "$findings" ]; then
  for f in "$findings"/*; do
    [ -f "$f" ] || continue
    name=$(basename "$f")
    if ! grep -qxF -- "${name%-*}" <<<"$all"; then
      echo "fuzz: finding $f names no fuzz target (expected <target>-<hash>)" >&2
      failed+=("$name")
    fi
  done
else
  echo "fuzz: no findings folder at $findings, replaying the committed seeds only"
fi
mkdir -p fuzz/target/logs
for t in $targets; do
  inputs=()
  if [ -d "fuzz/seeds/$t" ]; then
    while IFS= read -r -d '' f; do inputs+=("$f"); done < <(find "fuzz/seeds/$t" -type f -print0 | sort -z)
  fi
  if [ -d "$findings" ]; then
    for f in "$findings/$t"-*; do
      [ -f "$f" ] && inputs+=("$f")
    done
  fi
  if [ ${#inputs[@]} -eq 0 ]; then
    echo "fuzz: $t has no seeds to replay"
    continue
  fi
  log=fuzz/target/logs/replay-$t.log
  # Files (not directories) as arguments: libFuzzer runs each once, and mutates nothing.
  if "$bin_dir/$t" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 "${inputs[@]}" >"$log" 2>&1; then
    echo "fuzz: $t: ${#inputs[@]} inputs pass"
  else
    bad=$(sed -n 's/^Running: //p' "$log" | tail -n 1)
    echo "fuzz: $t FAILED on ${bad:-?} (whole output: $log):" >&2
    # The panic (a failed property names itself) or the sanitizer's verdict, not the backtrace.
    { grep -A1 'panicked at' "$log" || true; grep -E 'ERROR: |^SUMMARY: ' "$log" || true; } | head -n 20 >&2
    echo "fuzz: reproduce: $bin_dir/$t $bad" >&2
    failed+=("$t")
  fi
done
echo "fuzz: replayed in $((SECONDS - started)) s (build $((built - started)) s)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failing: ${failed[*]}" >&2
  exit 1
fi
