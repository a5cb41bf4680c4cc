#!/usr/bin/env bash
# Runs the training / algebra kernels on a CPU emulation of the CUDA execution model
# (kernels/emu/cuda_emu.h) against double-precision references (kernels/emu/emu_test.cpp).
# Needs only g++ (C++20). Exit status 0 = every check passed. This checks the kernels' logic
# (indexing, tiles, splits, masks, operation order); it is not a GPU run.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/rankfuse-kernel-emu
g++ -std=c++20 -O1 -ffp-contract=off -pthread -w -I.. emu_test.cpp -o "$out"
"$out"
