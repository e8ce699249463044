"""Shared helpers for the kernel tests: make sure the native CPU kernels are what runs."""
from __future__ import annotations

import pytest
import torch

from gradwire import _build, ops


def require_native_cpu() -> None:
    """Load the C++ kernels; skip under GRADWIRE_FORCE_REFERENCE=1, FAIL if the build failed."""
    _build.load_native()
    ok, why = _build.STATUS["cpu"]
    if not ok:
        if _build.force_reference():
            pytest.skip(f"native kernels disabled: {why}")
        pytest.fail(f"native CPU kernels unavailable: {why}")
    for op in ops.SCHEMAS:
        assert ops.implementation(op, "cpu") == "native", op


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same NaN positions and identical bit patterns elsewhere (NaN payloads are unspecified:
    torch's vectorised float->bf16 cast and the scalar one write different NaN bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    iv = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return torch.equal(a[~nan_a].view(iv), b[~nan_b].view(iv))


def lognormal_sample(n: int, seed: int, sigma_log2: float = 4.0, dtype=torch.float32) -> torch.Tensor:
    """Neural-gradient-like data (lognormal magnitudes, random signs) plus every special value."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randn(n, generator=g, dtype=torch.float64) * sigma_log2 - 6)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).to(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-45,
                             3.4e38, -65504.0, 1.5, 0.75, 2.0**-20])
    k = min(n, specials.numel())
    x[:k] = specials[:k]
    return x.to(dtype)
