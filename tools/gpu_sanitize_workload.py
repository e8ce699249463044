"""A short GPU workload for compute-sanitizer: every CUDA kernel of gradwire, at sizes that hit
the vector path, the partial-group tails and misaligned inputs.

    compute-sanitizer --tool memcheck python tools/gpu_sanitize_workload.py            # everything
    compute-sanitizer --tool racecheck python tools/gpu_sanitize_workload.py --shared  # the kernels
                                                                  # that use shared memory

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (tools/gpu_check.sh does): with torch's caching
allocator an out-of-bounds access that lands inside another cached block is invisible to memcheck.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradwire import _build, ops  # noqa: E402
from gradwire.numerics.fp import FPFormat  # noqa: E402

SIZES = (1, 7, 8, 9, 31, 33, 4099, 1 << 16)
FORMATS = (FPFormat(4, 1), FPFormat(3, 0), FPFormat(5, 2), FPFormat(2, 5))


def shared_memory_kernels(x: torch.Tensor, n: int) -> None:
    """fp_encode with statistics (block reduction), moment_stats, the decode's shared table."""
    for fmt in FORMATS:
        p, _ = ops.fp_encode(x, fmt, "stochastic", scale_exp=3, seed=1)
        ops.fp_decode(p, n, fmt, scale_exp=3, dtype=x.dtype)
    ops.moment_stats(x)
    c = torch.randint(0, 32, (n,), device="cuda", dtype=torch.uint8)
    ops.unpack_bits(ops.pack_bits(c, 5), 5, n)


def everything(x: torch.Tensor, n: int) -> None:
    shared_memory_kernels(x, n)
    for fmt in FORMATS:
        ops.fp_encode(x, fmt, "nearest", scale_exp=-2, with_stats=False)
    ops.stochastic_prune(x, 0.5, seed=2)
    if n % 4 == 0:
        for scheme in ops.NM_SCHEMES:
            ops.nm_select(x, scheme, seed=3)
    torch.ops.gradwire.rng_u32(5, torch.arange(n, device="cuda"))


def codecs() -> None:
    """Every registry codec through encode and decode on the GPU (small tensors)."""
    from gradwire.codec import build_codec

    for cfg in ({"name": "fp", "bits": 6}, {"name": "fp", "bits": 4}, {"name": "prune", "sparsity": 0.8},
                {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, {"name": "nm", "n": 1, "m": 2},
                {"name": "bf16"}, {"name": "fp8_e4m3"}):
        c = build_codec(cfg)
        for shape in ((3, 40), (1, 8), (4099, 8)):
            x = torch.randn(shape, device="cuda") * torch.exp2(3 * torch.randn(shape, device="cuda"))
            c.decode(c.encode(x.to(torch.bfloat16), seed=4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", action="store_true", help="only the kernels that use shared memory")
    args = ap.parse_args()
    _build.load_native()
    if ops.implementation("fp_encode", "cuda") != "native":
        raise SystemExit(f"CUDA kernels not loaded: {_build.STATUS['cuda'][1]}")
    run = shared_memory_kernels if args.shared else everything
    for n in SIZES:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(n + 1, device="cuda").to(dt)[1:]  # misaligned on purpose
            run(x, n)
            run(x.clone(), n)  # aligned copy: the vector-load path
    if not args.shared:
        codecs()
    torch.cuda.synchronize()
    print("sanitizer workload done")


if __name__ == "__main__":
    main()
