#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc alone (no GPU, no torch headers) for sm_80 and sm_90, so
# the CUDA code never rots on CPU-only CI. Usage: bash tools/check_cuda.sh [nvcc]
set -euo pipefail
NVCC="${1:-${NVCC:-nvcc}}"
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for cu in csrc/cuda/*.cu; do
  echo "nvcc $cu (sm_80, sm_90)"
  "$NVCC" -O3 -std=c++17 --fmad=false -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$cu" -o "$out/$(basename "$cu").o"
done
echo "all CUDA sources compile"
