#!/usr/bin/env bash
# Regenerates kernels/ptx/*.ptx from kernels/*.cu with a pinned NVRTC (pip wheel, no nvcc).
#   kernels/build-ptx.sh [OUT_DIR]      (default: kernels/ptx)
# The wheels go into a virtualenv (RANKFUSE_CUDA_VENV, default target/cuda-venv); installing is
# skipped when the pinned versions are already there. NVRTC 12.2 emits PTX ISA 8.2, which CUDA
# 12.2+ drivers (JetPack 6 on Orin, datacenter drivers) load and JIT for their GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVRTC_VERSION=12.2.140
NVCC_VERSION=12.2.140
ARCHS=(compute_70 compute_80 compute_90)
VENV=${RANKFUSE_CUDA_VENV:-target/cuda-venv}
OUT=${1:-kernels/ptx}

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('nvidia-cuda-nvrtc-cu12') == '$NVRTC_VERSION' and m.version('nvidia-cuda-nvcc-cu12') == '$NVCC_VERSION' else 1)" 2>/dev/null; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION" "nvidia-cuda-nvcc-cu12==$NVCC_VERSION"
fi
NV=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.dirname(nvidia.__file__) if nvidia.__file__ else list(nvidia.__path__)[0])")
export RANKFUSE_PTXAS="$NV/cuda_nvcc/bin/ptxas"
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
"$VENV/bin/python" kernels/nvrtc_ptx.py "$NV/cuda_nvrtc/lib/libnvrtc.so.12" "$OUT.tmp" "${ARCHS[@]}"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
