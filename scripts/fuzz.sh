#!/usr/bin/env bash
# Random exploration (docs/FUZZING.md): build the cargo-fuzz targets in fuzz/ and run each for
# SECONDS_PER_TARGET seconds (default 20), starting from its committed seeds (fuzz/seeds/<target>)
# and the findings beside the checkout (../shared/fuzz-findings/<target>-*) copied into a scratch
# corpus (fuzz/target/corpus/<target>), so the seeds never grow. A panic, a failed property, a
# hang, an oversized allocation or a leak fails the script, which prints the path of the input
# that caused it and how to keep it as a seed. Run on its own: the test suite only replays the
# seeds (scripts/fuzz-replay.sh), so that its verdict does not depend on the machine's speed or
# luck. Needs a nightly toolchain (rustup's `nightly`, or WALVAULT_FUZZ_TOOLCHAIN); installs
# cargo-fuzz when missing (scripts/fuzz-build.sh).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]          every target
#   WALVAULT_FUZZ_TARGETS="wal_decode wal_name" scripts/fuzz.sh 60
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-20}
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
  exit 2
fi
toolchain=${WALVAULT_FUZZ_TOOLCHAIN:-nightly}
findings=${WALVAULT_FUZZ_FINDINGS:-../shared/fuzz-findings}

started=$SECONDS
scripts/fuzz-build.sh
built=$SECONDS

targets=${WALVAULT_FUZZ_TARGETS:-$(cargo "+$toolchain" fuzz list --fuzz-dir fuzz)}
bin_dir=fuzz/target/$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')/release
failed=()
for t in $targets; do
  corpus=fuzz/target/corpus/$t
  artifacts=fuzz/target/artifacts/$t
  log=fuzz/target/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  rm -f "$artifacts"/*
  if [ -d "fuzz/seeds/$t" ]; then
    cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  fi
  cp -n "$findings/$t"-* "$corpus"/ 2>/dev/null || true
  # Records may span pages: WAL inputs are allowed a few pages.
  case $t in
    wal_decode) max_len=65536 ;;
    manifest) max_len=16384 ;;
    *) max_len=4096 ;;
  esac
  dict=()
  if [ -f "fuzz/dicts/$t.dict" ]; then
    dict=(-dict="fuzz/dicts/$t.dict")
  fi
  echo "fuzz: $t for ${secs} s"
  # -malloc_limit_mb: no single allocation may reach 512 MiB from inputs of a few KiB.
  if "$bin_dir/$t" "$corpus" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -max_len="$max_len" -artifact_prefix="$artifacts/" "${dict[@]}" \
    -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^stat::new_units_added' "$log" | sed "s/^/fuzz: $t /" || true
  else
    echo "fuzz: $t FAILED; last lines of $log:" >&2
    grep -vE '^#[0-9]+|^INFO: ' "$log" | tail -n 40 >&2
    for a in "$artifacts"/*; do
      [ -e "$a" ] || continue
      echo "fuzz: $t crashing input: $a (reproduce: $bin_dir/$t $a)" >&2
      echo "fuzz: keep it as a seed, committed with the fix: cp $a fuzz/seeds/$t/$t-$(sha1sum "$a" | cut -c1-8)" >&2
    done
    failed+=("$t")
  fi
done
echo "fuzz: done in $((SECONDS - started)) s (build $((built - started)) s)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failing targets: ${failed[*]}" >&2
  exit 1
fi
