#!/usr/bin/env bash
# The C smoke program, linked against the shared library
# (release, or the dev profile when RANKFUSE_INSTALL_PROFILE=dev as in CI), under valgrind: zero errors
# and no definite/indirect leaks. (Thread-pool stacks still exiting can show as "possibly lost";
# those are not counted.)
set -euo pipefail
# The library as scripts/install.sh installs it (soname, symlinks); its build is shared with the
# other C, Go and Python steps.
prefix=$(mktemp -d)
bash scripts/install.sh "$prefix" >/dev/null
lib="$prefix/lib"
out=$(mktemp -d)
cc -std=c11 -O1 -g -Wall -Wextra -Werror -Iinclude -o "$out/smoke" tests/c/smoke.c -L"$lib" -lrankfuse -lm \
   -Wl,-rpath,"$lib"
valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
   --show-leak-kinds=definite,indirect "$out/smoke" tests/fixtures/peft-tiny 2>&1 | tail -25
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "valgrind run failed (exit $rc)"; exit 1; fi
echo "valgrind: clean"

# LoRA, KRAdapter and EigenLoRAx modules created, trained, saved, reloaded and served from C.
cc -std=c11 -O1 -g -Wall -Wextra -Werror -Iinclude -o "$out/kinds" tests/c/kinds.c -L"$lib" -lrankfuse -lm \
   -Wl,-rpath,"$lib"
mkdir -p "$out/kinds-work"
valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
   --show-leak-kinds=definite,indirect "$out/kinds" "$out/kinds-work" 2>&1 | tail -12
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "valgrind run of kinds failed (exit $rc)"; exit 1; fi
echo "valgrind (kinds): clean"
