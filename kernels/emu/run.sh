#!/usr/bin/env bash
# Runs kernels on a CPU emulation of the CUDA execution model (kernels/emu/cuda_emu.h) against
# double-precision references: the training / algebra kernels (emu_test.cpp) and the
# block-quantized linear kernels with the shrink and decode epilogue (quant_test.cpp).
# Needs only g++ (C++20). Exit status 0 = every check passed. This checks the kernels' logic
# (indexing, tiles, splits, masks, operation order, block layouts); it is not a GPU run.
# The two programs are compiled and run side by side: the emulator spends most of its time
# starting and synchronizing threads, so two of them overlap well even on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/rankfuse-kernel-emu
g++ -std=c++20 -O1 -ffp-contract=off -pthread -w -I.. emu_test.cpp -o "$out" &
c1=$!
g++ -std=c++20 -O1 -ffp-contract=off -pthread -w -I.. quant_test.cpp -o "$out-quant" &
c2=$!
wait $c1
"$out" > "$out.log" 2>&1 &
r1=$!
wait $c2
rc2=0
"$out-quant" || rc2=$?
rc1=0
wait $r1 || rc1=$?
cat "$out.log"
if [ "$rc1" -ne 0 ] || [ "$rc2" -ne 0 ]; then
  echo "kernel emulation failed (emu_test: $rc1, quant_test: $rc2)"
  exit 1
fi
