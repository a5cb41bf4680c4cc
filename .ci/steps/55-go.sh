#!/usr/bin/env bash
# Go binding (bindings/go): gofmt, go vet and go test against the library installed into a
# temporary prefix and found with pkg-config. Installs Debian's golang-go (Go 1.19) if no go.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v go >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
fi
go version
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
bash scripts/install.sh "$prefix" >/dev/null
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
# A build cache of this run's own: a shared one can hold cgo link flags that name an earlier
# run's (deleted) temporary prefix, and CI caches nothing outside the clone.
export GOCACHE="$prefix/go-cache"
export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd bindings/go
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
  echo "gofmt would change: $unformatted" >&2
  exit 1
fi
go vet ./...
# cgocheck=2 checks every pointer store for the cgo pointer-passing rules.
GODEBUG=cgocheck=2 go test -count=1 -v ./...
