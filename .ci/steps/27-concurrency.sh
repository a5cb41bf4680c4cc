#!/usr/bin/env bash
# Concurrency checks beyond `cargo test` (docs/reliability.md, "Thread safety"):
#  1. loom: every interleaving of a reader, a publisher and a retirer on the adapter store
#     (loom/, its own small crate compiling src/store.rs with loom's Mutex/Condvar/Arc);
#  2. ThreadSanitizer over tests/store.rs, tests/soak.rs (2 s) and tests/concurrency.rs, on
#     stable Rust through RUSTC_BOOTSTRAP=1. Everything but std is instrumented (no rust-src
#     here for -Zbuild-std): see docs/reliability.md for what that leaves unchecked. Separate
#     target dirs under target/; library and tests only (no CLI).
set -euo pipefail
t0=$(date +%s)
RUSTFLAGS="--cfg loom" cargo test --quiet --manifest-path loom/Cargo.toml --target-dir target/loom
t1=$(date +%s)
echo "loom: clean in $(( t1 - t0 ))s"
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=thread -Cunsafe-allow-abi-mismatch=sanitizer" \
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
RANKFUSE_SOAK_SECONDS=2 \
  cargo test --quiet --no-default-features --target x86_64-unknown-linux-gnu \
    --target-dir target/tsan --test store --test soak --test concurrency
echo "tsan: clean in $(( $(date +%s) - t1 ))s"
