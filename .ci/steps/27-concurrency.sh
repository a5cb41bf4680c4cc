#!/usr/bin/env bash
# Concurrency checks beyond `cargo test` (docs/reliability.md, "Thread safety"): loom, every
# interleaving of a reader, a publisher and a retirer on the adapter store (loom/, its own small
# crate compiling src/store.rs with loom's Mutex/Condvar/Arc). ThreadSanitizer is not run here:
# without an instrumented std (-Zbuild-std needs rust-src) it reports std-Mutex-ordered accesses
# as races (see docs/reliability.md).
set -euo pipefail
t0=$(date +%s)
RUSTFLAGS="--cfg loom" cargo test --quiet --manifest-path loom/Cargo.toml --target-dir target/loom
echo "loom: clean in $(( $(date +%s) - t0 ))s"
