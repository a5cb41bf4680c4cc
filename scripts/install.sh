#!/usr/bin/env bash
# Installs rankfuse for C/C++ (and cgo) users:
#   PREFIX/lib/librankfuse.so.X.Y.Z   (soname librankfuse.so.X) + librankfuse.so.X, librankfuse.so links
#   PREFIX/lib/librankfuse.a
#   PREFIX/include/rankfuse.h, rankfuse.hpp
#   PREFIX/lib/pkgconfig/rankfuse.pc
# Usage: scripts/install.sh PREFIX      (DESTDIR=/staging is honoured, as in `make install`)
# Builds with `cargo rustc --release --lib` so the soname is set by a link argument of the cdylib
# only (no build.rs, no global RUSTFLAGS); a later plain `cargo build --release` recompiles the
# rankfuse crate alone (not its dependencies) without the soname.
# RANKFUSE_INSTALL_PROFILE=dev installs the dev-profile library instead (opt-level 2, debug
# assertions on): CI uses it so the dependencies `cargo test` built serve again, instead of
# building every dependency a second time in release.
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
case "$1" in
  /*) PREFIX="$1" ;;
  *) PREFIX="$(pwd)/$1" ;;
esac
PREFIX="${PREFIX%/}"
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -1)
MAJOR=${VERSION%%.*}
SONAME="librankfuse.so.${MAJOR}"
REAL="librankfuse.so.${VERSION}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

case "${RANKFUSE_INSTALL_PROFILE:-release}" in
  release) PROFILE_ARGS=(--release); OUTDIR="${TARGET_DIR}/release" ;;
  dev) PROFILE_ARGS=(); OUTDIR="${TARGET_DIR}/debug" ;;
  *) echo "RANKFUSE_INSTALL_PROFILE must be release or dev" >&2; exit 2 ;;
esac
cargo rustc "${PROFILE_ARGS[@]}" --lib -- -C "link-arg=-Wl,-soname,${SONAME}"

built="${OUTDIR}/librankfuse.so"
if command -v readelf >/dev/null && ! readelf -d "$built" | grep -q "SONAME.*\[${SONAME}\]"; then
  echo "error: $built has no soname ${SONAME}" >&2
  exit 1
fi

dest="${DESTDIR:-}${PREFIX}"
install -d "$dest/lib/pkgconfig" "$dest/include"
install -m 0755 "$built" "$dest/lib/${REAL}"
ln -sfn "${REAL}" "$dest/lib/${SONAME}"
ln -sfn "${SONAME}" "$dest/lib/librankfuse.so"
install -m 0644 "${OUTDIR}/librankfuse.a" "$dest/lib/librankfuse.a"
install -m 0644 include/rankfuse.h include/rankfuse.hpp "$dest/include/"

# Libs.private: what the Rust staticlib needs from the system (rustc --print native-static-libs
# lists -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc; the C driver adds libc and libgcc itself).
cat > "$dest/lib/pkgconfig/rankfuse.pc" <<PC
prefix=${PREFIX}
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: rankfuse
Description: Runtime for low-rank adapters (LoRA) on frozen base weights, C ABI
Version: ${VERSION}
Libs: -L\${libdir} -lrankfuse
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC

echo "installed rankfuse ${VERSION} into ${dest} (soname ${SONAME})"
