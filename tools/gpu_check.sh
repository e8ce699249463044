#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for whoever next has one:
#   bash tools/gpu_check.sh
# 1. builds the CUDA extension (JIT, cached) and runs the kernel tests, CUDA ones included;
# 2. runs a small encode/decode/pack/stats workload under compute-sanitizer memcheck;
# 3. runs bench/kernels.py --device cuda, writing bench/results/kernels_cuda_<gpu>.json
#    (commit that file).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
python -m gradwire.ops
python -m pytest -q -p no:cacheprovider tests/kernels
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
"$SAN" --tool memcheck --error-exitcode 1 --leak-check full python - <<'PY'
import torch
from gradwire import ops
from gradwire.numerics.fp import FPFormat
for n in (1, 7, 8, 9, 4099, 1 << 16):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(n + 1, device="cuda").to(dt)[1:]  # misaligned on purpose
        for fmt in (FPFormat(4, 1), FPFormat(3, 0), FPFormat(5, 2)):
            p, s = ops.fp_encode(x, fmt, "stochastic", scale_exp=3, seed=1)
            ops.fp_decode(p, n, fmt, scale_exp=3, dtype=dt)
        c = torch.randint(0, 32, (n,), device="cuda", dtype=torch.uint8)
        ops.unpack_bits(ops.pack_bits(c, 5), 5, n)
        ops.moment_stats(x)
        ops.stochastic_prune(x, 0.5, seed=2)
        if n % 4 == 0:
            for scheme in ops.NM_SCHEMES:
                ops.nm_select(x, scheme, seed=3)
torch.cuda.synchronize()
print("memcheck workload done")
PY
python bench/kernels.py --device cuda
