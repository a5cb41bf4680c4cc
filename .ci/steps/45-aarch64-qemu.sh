#!/usr/bin/env bash
# aarch64: the NEON and portable CPU kernels against the f64 reference, under qemu-user
# (self-check, every tile shape through the driver, tests/kernels.rs, and the block-quantized W
# paths of tests/quant_linear.rs: in place, Q4_0 / Q8_0 packs, Q8 activations). The library's other code
# is target-independent Rust and runs natively in `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1; then
    echo "aarch64 (qemu): skipped: rustup could not install the aarch64 standard library"
    exit 0
fi
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# No debug info: halves the cross build; no CLI: the kernels need none of its crates.
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
t=aarch64-unknown-linux-gnu
# Dependencies at opt-level 1 (the kernels under test are rankfuse's own, still at 2): the cross
# build of faer/gemm dominates the step.
deps='profile.dev.package."*".opt-level=1'
cargo test --config "$deps" --target $t --no-default-features --lib backend::cpu
cargo test --config "$deps" --target $t --no-default-features --test kernels --test quant_linear
