#!/usr/bin/env bash
# Python binding (bindings/python): pytest in a venv (numpy and pytest pinned) against the
# library installed into a temporary prefix (RANKFUSE_LIB). Fails on any pytest exit code
# other than 0, including 5 (no tests collected).
set -euo pipefail
cd "$(dirname "$0")/../.."
NUMPY_VERSION=2.4.6
PYTEST_VERSION=9.2.0
venv="$(pwd)/target/ci-venv-python"
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  "numpy==$NUMPY_VERSION" "pytest==$PYTEST_VERSION"
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
bash scripts/install.sh "$prefix" >/dev/null
export RANKFUSE_LIB="$prefix/lib/librankfuse.so.0"
cd bindings/python
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider -ra tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
