#!/usr/bin/env bash
# Fuzzing smoke run (cargo-fuzz / libFuzzer with AddressSanitizer, on stable Rust through
# RUSTC_BOOTSTRAP=1): builds the fuzz/ targets, replays every committed seed and regression
# input (fuzz/seeds/<target>, fuzz/regressions/<target>: each was a crash once), then fuzzes each
# target for a short fixed time. Any crash, leak, timeout (>10 s per input) or >2 GiB RSS fails
# the step; the input is left in fuzz/artifacts/<target>/. Long runs: see docs/reliability.md.
set -euo pipefail
CARGO_FUZZ_VERSION=0.13.1
SECS=${RANKFUSE_FUZZ_SECS:-8}
if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
t0=$(date +%s)
cargo fuzz build >/dev/null 2>&1 || cargo fuzz build
echo "fuzz targets built in $(( $(date +%s) - t0 ))s"
for t in $(cargo fuzz list); do
  work=$(mktemp -d)
  dirs=("$work" "fuzz/seeds/$t")
  [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
  dict=()
  [ "$t" != linear_args ] && dict=(-dict=fuzz/dicts/safetensors.dict)
  if ! cargo fuzz run "$t" "${dirs[@]}" -- -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
         -print_final_stats=1 "${dict[@]}" >"$work/log" 2>&1; then
    tail -60 "$work/log"
    echo "fuzz target $t FAILED"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$work/log" | tail -1 | grep -o 'cov: [0-9]* ft: [0-9]*' || echo '?')
  echo "fuzz $t: ${SECS}s, $runs executions, $cov, no crash"
  rm -rf "$work"
done
