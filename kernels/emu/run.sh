#!/usr/bin/env bash
# Runs kernels on a CPU emulation of the CUDA execution model (kernels/emu/cuda_emu.h) against
# double-precision references: the training / algebra kernels (emu_test.cpp) and the
# block-quantized linear kernels with the shrink and decode epilogue (quant_test.cpp).
# Needs only g++ (C++20). Exit status 0 = every check passed. This checks the kernels' logic
# (indexing, tiles, splits, masks, operation order, block layouts); it is not a GPU run.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/rankfuse-kernel-emu
g++ -std=c++20 -O1 -ffp-contract=off -pthread -w -I.. emu_test.cpp -o "$out" &
g++ -std=c++20 -O1 -ffp-contract=off -pthread -w -I.. quant_test.cpp -o "$out-quant"
wait $!
"$out"
"$out-quant"
