#!/usr/bin/env bash
# CUDA kernels without a GPU: regenerate the PTX with the pinned NVRTC and require it to match
# kernels/ptx/, assemble every PTX with ptxas for sm_70/72/75/80/86/87/89/90 and require
# kernels/REPORT.md (registers, shared memory, spills) to match, fail on any ptxas error or spill.
# Then kernels/emu/run.sh (the training / algebra and block-quantized linear kernels on a CPU
# emulator), the CUDA backend's host tests (launch geometry, PTX symbol table, no-device path)
# and clippy with feature cuda.
# Installs the pinned wheels itself (kernels/build-ptx.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)

kernels/build-ptx.sh target/ptx-check
if ! diff -r kernels/ptx target/ptx-check >/dev/null; then
  echo "kernels/ptx is stale: regenerate with kernels/build-ptx.sh"
  diff -r kernels/ptx target/ptx-check | head -40
  exit 1
fi
echo "PTX is current"
grep -h '^\.version' kernels/ptx/*.ptx | sort -u | while read -r _ v; do
  # CUDA 12.2 drivers (JetPack 6) load PTX ISA up to 8.2.
  if [ "$(printf '%s\n8.2\n' "$v" | sort -V | tail -1)" != "8.2" ]; then
    echo "PTX ISA $v is newer than 8.2: CUDA 12.2 drivers cannot load it"; exit 1
  fi
done

VENV=${RANKFUSE_CUDA_VENV:-target/cuda-venv}
NV=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.dirname(nvidia.__file__))")
python3 kernels/ptxas_report.py "$NV/cuda_nvcc/bin/ptxas" kernels/ptx target/REPORT.md.check
if ! cmp -s kernels/REPORT.md target/REPORT.md.check; then
  echo "kernels/REPORT.md is stale: regenerate with"
  echo "  python3 kernels/ptxas_report.py $NV/cuda_nvcc/bin/ptxas kernels/ptx kernels/REPORT.md"
  diff -u kernels/REPORT.md target/REPORT.md.check | head -40
  exit 1
fi
if ! grep -q "Total spill bytes over all kernels and targets: 0\." kernels/REPORT.md; then
  echo "ptxas reports register spills (kernels/REPORT.md)"; exit 1
fi
echo "ptxas report is current, no spills ($(( $(date +%s) - start ))s)"

# The training / algebra kernels and the block-quantized linear kernels executed on a CPU
# emulation of the CUDA execution model against f64 references (logic only: indexing, tiles,
# splits, masks, AdamW and dequantization bit-exactness); ~1-2 minutes.
command -v g++ >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; }
kernels/emu/run.sh
echo "kernel emulation passed ($(( $(date +%s) - start ))s)"

cargo test --features cuda --test cuda 2>&1
cargo test --features cuda --test cuda_train 2>&1
cargo test --features cuda --lib backend::cuda 2>&1
cargo clippy --features cuda --all-targets -- -D warnings
echo "cuda step done in $(( $(date +%s) - start ))s"
