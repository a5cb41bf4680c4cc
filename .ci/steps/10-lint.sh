#!/usr/bin/env bash
# Formatting, clippy (all targets, warnings are errors), and the committed header is current.
set -euo pipefail
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cbindgen --config cbindgen.toml --crate rankfuse --output target/rankfuse.h.check 2>/dev/null
if ! cmp -s target/rankfuse.h.check include/rankfuse.h; then
  echo "include/rankfuse.h is stale: regenerate with"
  echo "  cbindgen --config cbindgen.toml --crate rankfuse --output include/rankfuse.h"
  diff -u include/rankfuse.h target/rankfuse.h.check | head -50
  exit 1
fi
echo "header is current"
