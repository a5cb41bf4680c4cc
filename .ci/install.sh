#!/usr/bin/env bash
# Installs CI's tools. Idempotent: skips what is already there at the pinned version.
set -euo pipefail
CBINDGEN_VERSION=0.29.4
need_apt=()
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! cbindgen --version 2>/dev/null | grep -q "$CBINDGEN_VERSION"; then
  cargo install cbindgen --version "$CBINDGEN_VERSION" --locked --quiet
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
