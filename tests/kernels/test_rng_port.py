"""csrc/common/rng.h (via the gradwire::rng_u32 test op) is bit-exact with numerics/rng.py."""
from __future__ import annotations

import torch

from gradwire import ops
from gradwire.numerics import rng
from tests.kernels._native import require_native_cpu


def test_cpp_rng_matches_python_bit_exactly():
    require_native_cpu()
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([
        torch.arange(0, 4096, dtype=torch.int64),  # consecutive element counters
        torch.randint(0, 2**62, (4096,), generator=g, dtype=torch.int64),  # hi32 != 0 path
        torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1], dtype=torch.int64),
    ])
    for seed in (0, 1, 12345, 2**31, 2**32 - 1):
        native = torch.ops.gradwire.rng_u32(seed, idx)
        torch.testing.assert_close(native, rng.random_u32(seed, idx), rtol=0, atol=0)
        torch.testing.assert_close(native, ops.REFERENCES["rng_u32"](seed, idx), rtol=0, atol=0)
