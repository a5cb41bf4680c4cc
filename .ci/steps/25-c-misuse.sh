#!/usr/bin/env bash
# tests/c/misuse.c (C ABI misuse: NULLs, wrong struct_size, bad slots/ranks/shapes/dtypes,
# hostile files from tests/corpus/) against the shared library
# (release, or the dev profile when RANKFUSE_INSTALL_PROFILE=dev as in CI), twice:
#  1. built with -fsanitize=address,undefined, LeakSanitizer on: no memory error, no UB in the C
#     side, no leak on any error path (Rust allocations go through the same intercepted malloc);
#  2. built without sanitizers, under valgrind: zero errors, no definite/indirect leaks.
# No suppressions are used.
set -euo pipefail
# The library as scripts/install.sh installs it (soname, symlinks); its build is shared with the
# other C, Go and Python steps.
prefix=$(mktemp -d)
bash scripts/install.sh "$prefix" >/dev/null
lib="$prefix/lib"
out=$(mktemp -d)
trap 'rm -rf "$out" "$prefix"' EXIT
cc -std=c11 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
   -Wall -Wextra -Werror -Iinclude -o "$out/misuse-asan" tests/c/misuse.c -L"$lib" -lrankfuse -lm \
   -Wl,-rpath,"$lib"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$out/misuse-asan" "$PWD"
echo "asan+ubsan+lsan: clean"
cc -std=c11 -O1 -g -Wall -Wextra -Werror -Iinclude -o "$out/misuse" tests/c/misuse.c -L"$lib" -lrankfuse -lm \
   -Wl,-rpath,"$lib"
valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
   --show-leak-kinds=definite,indirect "$out/misuse" "$PWD" 2>&1 | tail -15
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "valgrind run failed (exit $rc)"; exit 1; fi
echo "valgrind: clean"
