"""C++ stochastic pruning: bit-identical to numerics.pruning.stochastic_prune; unbiased."""
from __future__ import annotations

import math

import pytest
import torch

from gradwire import ops
from gradwire.numerics import pruning
from tests.kernels._native import bits_equal, lognormal_sample, require_native_cpu


@pytest.fixture(autouse=True)
def _native():
    require_native_cpu()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_prune_bit_exact(dtype):
    for n in (1, 9, 4097, 70001):
        x = lognormal_sample(n, seed=n, dtype=dtype)
        for alpha in (2.0**-6, 0.3, 1e3, 0.0, -1.0):
            got = ops.stochastic_prune(x, alpha, seed=17, offset=2**32 - 5)
            ref = pruning.stochastic_prune(x, alpha, seed=17, offset=2**32 - 5)
            assert bits_equal(got, ref), (n, alpha)


def test_prune_unbiased_and_sparsity():
    # All |x| = 0.25 < a = 1: each element independently becomes sign(x) * a with probability
    # |x| / a = 1/4, else 0. Mean: 0.25, per-element variance |x|(a - |x|) = 0.1875; kept
    # fraction: p = 0.25 with variance p(1-p)/n. Both within 6 standard errors.
    n = 200_000
    x = torch.full((n,), 0.25)
    y = ops.stochastic_prune(x, 1.0, seed=8)
    assert set(torch.unique(y).tolist()) == {0.0, 1.0}
    assert abs(float(y.double().mean()) - 0.25) < 6 * math.sqrt(0.1875 / n)
    kept = float((y != 0).double().mean())
    assert abs(kept - 0.25) < 6 * math.sqrt(0.25 * 0.75 / n)


def test_prune_shape_noncontiguous_and_errors():
    x = lognormal_sample(48 * 5, seed=2).reshape(48, 5).t()
    got = ops.stochastic_prune(x, 0.1, seed=1)
    assert got.shape == x.shape
    assert bits_equal(got, pruning.stochastic_prune(x.contiguous(), 0.1, seed=1))
    with pytest.raises(TypeError, match="float32"):
        ops.stochastic_prune(torch.zeros(3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="finite"):
        ops.stochastic_prune(torch.zeros(3), float("nan"))
    with pytest.raises(ValueError, match="offset"):
        ops.stochastic_prune(torch.zeros(3), 0.1, offset=-1)
