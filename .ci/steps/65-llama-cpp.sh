#!/usr/bin/env bash
# llama.cpp interop (issue 15; tests/llama/interop.py says what is checked): builds llama.cpp's
# llama + ggml libraries from the llama.cpp tree vendored in the llama-cpp-python sdist (pinned),
# compiles tests/llama/logits.c against them, and shows that llama.cpp loads a GGUF LoRA adapter
# written by `rankfuse convert` and computes the same logits as on the base `rankfuse merge`
# produced. Everything lives under target/llama-cpp (nothing cached outside the clone). Skips,
# saying why, only when the sdist or the Python tools cannot be downloaded; any other failure
# fails the step. RANKFUSE_CI_CONVERT_LORA=1 also runs llama.cpp's convert_lora_to_gguf.py,
# which imports torch, transformers and mistral_common (torch from PyPI is a multi-GB download
# with its CUDA wheels: off by default; with torch present the rest installs in ~75 s).
# The llama.cpp build is cut to what the check needs: the llama target only, -O1 (the model is
# tiny: compile time, not speed, matters), no llamafile sgemm, no OpenMP.
# Cost, measured on the 2-core dev machine (Zen 3, load 10-20 from other builds) before that cut:
# llama.cpp build 1040 s, whole step 1209 s on a fresh clone; the build is incremental in target/llama-cpp, so a
# rerun on the same clone costs ~1-2 min. The checks themselves take ~40 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_CPP_PYTHON_VERSION=0.3.16
NUMPY_VERSION=2.4.6
CMAKE_VERSION=4.4.5
t0=$(date +%s)
w="$(pwd)/target/llama-cpp"
mkdir -p "$w"
venv="$w/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" 2>/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  }
fi
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
sdist="$w/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  if ! "${pip[@]}" download --no-deps --no-binary llama-cpp-python -d "$w" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"; then
    echo "SKIP llama.cpp interop: cannot download the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    exit 0
  fi
fi
src="$w/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
[ -d "$src" ] || tar -xzf "$sdist" -C "$w"
# gguf: the package as vendored with this llama.cpp (gguf-py), so writer and reader agree.
if ! "${pip[@]}" install "numpy==$NUMPY_VERSION" "cmake==$CMAKE_VERSION" "$src/gguf-py"; then
  echo "SKIP llama.cpp interop: cannot download numpy/cmake from PyPI"
  exit 0
fi
b0=$(date +%s)
"$venv/bin/cmake" -S "$src" -B "$w/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
  -DGGML_LLAMAFILE=OFF -DGGML_OPENMP=OFF \
  "-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG" "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" >/dev/null
"$venv/bin/cmake" --build "$w/build" --target llama -j "$(nproc)" >/dev/null
echo "llama.cpp (llama + ggml, Release) built in $(( $(date +%s) - b0 ))s"
lib=$(dirname "$(find "$w/build" -name 'libllama.so' | head -1)")
cc -O1 -o "$w/logits" tests/llama/logits.c -I"$src/include" -I"$src/ggml/include" \
  -L"$lib" -lllama -Wl,-rpath,"$lib"
cargo build --quiet --bin rankfuse
extra=()
if [ "${RANKFUSE_CI_CONVERT_LORA:-0}" = 1 ]; then
  "${pip[@]}" install torch transformers mistral_common "numpy==$NUMPY_VERSION"
  extra=(--convert-lora "$src")
else
  echo "note: convert_lora_to_gguf.py check not run (needs torch + transformers; set RANKFUSE_CI_CONVERT_LORA=1)"
fi
LD_LIBRARY_PATH="$lib" "$venv/bin/python" tests/llama/interop.py --rankfuse target/debug/rankfuse \
  --logits "$w/logits" --work "$w/work" "${extra[@]}"
echo "llama.cpp interop step took $(( $(date +%s) - t0 ))s"
