#!/usr/bin/env bash
# Packaging: scripts/install.sh into a temporary prefix (soname, symlinks, static lib, headers,
# pkg-config file); the headers compiled as C11 and C++17 with -Wall -Wextra -Werror -pedantic,
# each included twice; the C++ wrapper's tests (bindings/cpp); the C and C++ examples built with
# `pkg-config --cflags --libs rankfuse` and run against the PEFT fixture, the C example also
# linked statically and run under valgrind.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
need=()
for tool in make cc c++ pkg-config readelf; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then # .ci/install.sh brings most; make and binutils come with build-essential
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential pkg-config >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

bash scripts/install.sh "$prefix"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -1)
test "$(pkg-config --modversion rankfuse)" = "$version"
test "$(readlink "$prefix/lib/librankfuse.so")" = "librankfuse.so.0"
test "$(readlink "$prefix/lib/librankfuse.so.0")" = "librankfuse.so.$version"
readelf -d "$prefix/lib/librankfuse.so.$version" | grep -q 'SONAME.*\[librankfuse\.so\.0\]'
test -f "$prefix/lib/librankfuse.a"
echo "install layout ok: $(pkg-config --cflags --libs rankfuse)"

# Headers: C11 and C++17, strict warnings, each included twice.
printf '#include <rankfuse.h>\n#include <rankfuse.h>\nint main(void) { return (int)rf_abi_version() - RF_ABI_VERSION; }\n' \
  > "$work/twice.c"
cc -std=c11 -Wall -Wextra -Werror -pedantic $(pkg-config --cflags rankfuse) "$work/twice.c" \
  -o "$work/twice_c" $(pkg-config --libs rankfuse)
"$work/twice_c"
printf '#include <rankfuse.h>\n#include <rankfuse.hpp>\n#include <rankfuse.h>\n#include <rankfuse.hpp>\nint main() { rankfuse::check_abi(); return rankfuse::version().empty(); }\n' \
  > "$work/twice.cpp"
c++ -std=c++17 -Wall -Wextra -Werror -pedantic $(pkg-config --cflags rankfuse) "$work/twice.cpp" \
  -o "$work/twice_cpp" $(pkg-config --libs rankfuse)
"$work/twice_cpp"
echo "headers ok: C11 and C++17, -Wall -Wextra -Werror -pedantic, included twice"

# The C++ wrapper's tests (bindings/cpp): every fixture module, mixed batch, errors.
c++ -std=c++17 -O1 -Wall -Wextra -Werror -pedantic $(pkg-config --cflags rankfuse) \
  bindings/cpp/test_rankfuse_hpp.cpp -o "$work/test_hpp" $(pkg-config --libs rankfuse)
"$work/test_hpp" "$repo/tests/fixtures/peft-tiny"

# The examples, copied out so the checkout stays clean; plain Makefiles using pkg-config.
run_example() { # dir binary
  local out
  out=$("$work/$1/$2" "$repo/tests/fixtures/peft-tiny")
  echo "$1/$2: $out"
  grep -q 'max |y - y_peft| = ' <<<"$out"
}
cp -r examples/c examples/cpp "$work/"
make -s -C "$work/c" example example-static CFLAGS="-O2 -Wall -Wextra -Werror -std=c11"
make -s -C "$work/cpp" example CXXFLAGS="-O2 -Wall -Wextra -Werror -std=c++17"
run_example c example
run_example cpp example
if ldd "$work/c/example-static" | grep -q librankfuse; then
  echo "example-static is linked against librankfuse.so" >&2
  exit 1
fi
run_example c example-static

if command -v valgrind >/dev/null; then
  valgrind -q --error-exitcode=3 --leak-check=full --show-possibly-lost=no --errors-for-leak-kinds=definite \
    "$work/c/example" "$repo/tests/fixtures/peft-tiny"
  echo "valgrind: no memory errors, no definite leaks in the C example"
else
  echo "SKIP valgrind run of the C example: valgrind is not installed (.ci/install.sh installs it)"
fi
