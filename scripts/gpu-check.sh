#!/usr/bin/env bash
# One prepared command for a machine with an NVIDIA GPU (the CUDA backend's checks that need one):
#   1. nvidia-smi, 2. the GPU tests (tests/cuda/main.rs: every kernel path vs the f64 reference, the
#   PEFT fixtures; tests/cuda_train.rs: LoRA backward, device AdamW / clip, KRAdapter, EigenLoRAx
#   vs the CPU), which must not skip, 3. examples/cuda_bench (fused / base-only, decode
#   bandwidth vs device copy bandwidth, mixed batches) writing JSON.
# Results go under $OUT (default target/gpu-check). Budget: under 5 minutes on an H200 when
# cargo builds there (16 cores); with --prebuilt it only runs binaries made here by
#   scripts/gpu-check.sh --prepare      (builds target/gpu-bin/{cuda-tests,cuda-train-tests,cuda_bench})
# Usage: scripts/gpu-check.sh [--prepare | --prebuilt] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=build
quick=()
for a in "$@"; do
  case "$a" in
    --prepare) mode=prepare ;;
    --prebuilt) mode=prebuilt ;;
    --quick) quick=(--quick) ;;
    *) echo "unknown argument $a"; exit 2 ;;
  esac
done

if [ "$mode" = prepare ]; then
  mkdir -p target/gpu-bin
  cargo build --release --features cuda --example cuda_bench
  cp target/release/examples/cuda_bench target/gpu-bin/
  bin=$(cargo test --release --features cuda --test cuda --no-run 2>&1 | sed -n 's/.*Executable tests\/cuda\/main.rs (\(.*\))/\1/p' | tail -1)
  cp "$bin" target/gpu-bin/cuda-tests
  bin=$(cargo test --release --features cuda --test cuda_train --no-run 2>&1 | sed -n 's/.*Executable tests\/cuda_train.rs (\(.*\))/\1/p' | tail -1)
  cp "$bin" target/gpu-bin/cuda-train-tests
  echo "prepared target/gpu-bin (carry it to the GPU machine, run with --prebuilt)"
  exit 0
fi

OUT=${OUT:-target/gpu-check}
mkdir -p "$OUT"
start=$(date +%s)
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
export RANKFUSE_REPO=$PWD

if [ "$mode" = build ]; then
  cargo build --release --features cuda --example cuda_bench --tests 2>&1 | tail -3
  tests=(cargo test --release --features cuda --test cuda -- --test-threads=1 --nocapture)
  train_tests=(cargo test --release --features cuda --test cuda_train -- --test-threads=1 --nocapture)
  bench=(target/release/examples/cuda_bench)
else
  tests=(target/gpu-bin/cuda-tests --test-threads=1 --nocapture)
  train_tests=(target/gpu-bin/cuda-train-tests --test-threads=1 --nocapture)
  bench=(target/gpu-bin/cuda_bench)
fi
echo "== GPU tests ($(( $(date +%s) - start ))s)"
"${tests[@]}" 2>&1 | tee "$OUT/gpu-tests.log"
echo "== GPU training / algebra tests ($(( $(date +%s) - start ))s)"
"${train_tests[@]}" 2>&1 | tee -a "$OUT/gpu-tests.log"
if grep -q "skipped: no CUDA device" "$OUT/gpu-tests.log"; then
  echo "GPU tests skipped: no usable CUDA device"; exit 1
fi
echo "== bench ($(( $(date +%s) - start ))s)"
"${bench[@]}" "${quick[@]}" --json "$OUT/cuda-bench.json" 2>&1 | tee "$OUT/bench.log"
echo "== done in $(( $(date +%s) - start ))s; results in $OUT"
