"""C++ MVUE N:M selection: bit-identical to numerics.nm (values and indices); unbiased."""
from __future__ import annotations

import math

import pytest
import torch

from gradwire import ops
from gradwire.numerics import nm
from tests.kernels._native import bits_equal, lognormal_sample, require_native_cpu

ORACLE = {"mvue_12": nm.mvue_12_select, "mvue_24_exact": nm.mvue_24_exact_select,
          "mvue_24_approx": nm.mvue_24_approx_select}


@pytest.fixture(autouse=True)
def _native():
    require_native_cpu()


def _hard_blocks() -> torch.Tensor:
    """Blocks that exercise every regime and fall-back: zeros, one nonzero, dominant max
    ([1, 1, 1, 10], the case a widely copied implementation gets wrong), ties, NaN/Inf, float32
    overflow of the sum, subnormals."""
    big = 3e38
    rows = [[0, 0, 0, 0], [0, 0, 0, -2], [1, 1, 1, 10], [-1, 1, -1, 10], [3, 3, 3, 3],
            [1, 2, 3, 4], [0, 5, 0, 5], [float("nan"), 1, 2, 3], [1, float("-inf"), 2, 3],
            [big, big, 1, 1], [-big, 0, big, 0], [1e-45, 0, 0, 1e-45], [0, 0, -7, 0], [2, -0.0, 0, 1]]
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("scheme", list(ORACLE))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_nm_bit_exact(scheme, dtype):
    x = torch.cat([_hard_blocks().reshape(-1).repeat(50), lognormal_sample(4 * 5001, seed=3)]).to(dtype)
    x = x.reshape(-1, 4)  # dim -1: consecutive blocks of 4 (or pairs for 1:2)
    for seed, offset in ((0, 0), (123, 2**32 - 7)):
        got_v, got_i = ops.nm_select(x, scheme, seed=seed, offset=offset)
        ref_v, ref_i = ORACLE[scheme](x, seed=seed, offset=offset)
        assert torch.equal(got_i, ref_i), scheme
        assert bits_equal(got_v, ref_v), scheme


def test_nm_other_dim_and_errors():
    x = lognormal_sample(8 * 12, seed=4).reshape(8, 12)
    got = ops.nm_select(x, "mvue_24_exact", dim=0, seed=2)
    ref = nm.mvue_24_exact_select(x, dim=0, seed=2)
    assert torch.equal(got[1], ref[1]) and bits_equal(got[0], ref[0])
    with pytest.raises(ValueError, match="divisible"):
        ops.nm_select(torch.zeros(3, 6), "mvue_24_exact")
    with pytest.raises(ValueError, match="scheme"):
        ops.nm_select(torch.zeros(4), "mvue_13")
    with pytest.raises(TypeError, match="float32"):
        ops.nm_select(torch.zeros(4, dtype=torch.int64), "mvue_12")
    with pytest.raises(RuntimeError, match="multiple of the block"):
        torch.ops.gradwire.nm_select(torch.zeros(6), 1, 0, 0)


@pytest.mark.parametrize("scheme", ["mvue_24_exact", "mvue_24_approx"])
def test_nm_unbiased_on_dominant_block(scheme):
    # Block [1, 1, 1, 10] (regime a4 > a1+a2+a3 for the exact scheme). Each of n independent
    # counters gives one sample; the per-position sample mean must be within 6 standard errors
    # of the block, with the standard error estimated from the samples (n = 40000).
    n = 40_000
    x = torch.tensor([1.0, 1.0, 1.0, 10.0]).repeat(n, 1)
    v, i = ops.nm_select(x, scheme, seed=77)
    assert v.shape == (n, 1, 2) and i.shape == (n, 1, 2)  # one block of 4 per row, N = 2 slots
    dense = torch.zeros(n, 4, dtype=torch.float64).scatter_(1, i.reshape(n, 2).long(), v.reshape(n, 2).double())
    mean, sd = dense.mean(0), dense.std(0)
    for k, target in enumerate([1.0, 1.0, 1.0, 10.0]):
        assert abs(float(mean[k]) - target) <= 6 * float(sd[k]) / math.sqrt(n) + 1e-12, (k, mean)


@pytest.mark.parametrize("scheme", list(ORACLE))
def test_nm_bit_exact_small_integer_blocks(scheme):
    # The CPU kernel computes a batch of blocks as vector lanes (selects instead of branches):
    # blocks of small signed integers hit every tie, zero and fall-back path many times over,
    # across batch boundaries (2**15 + 3 blocks) and for every uniform draw.
    g = torch.Generator().manual_seed(7)
    x = (torch.randint(-3, 4, (4 * (2**15 + 3),), generator=g).float()
         * torch.randint(1, 3, (1,), generator=g).float())
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype).reshape(-1, 4)
        got_v, got_i = ops.nm_select(xd, scheme, seed=11, offset=2**33 + 5)
        ref_v, ref_i = ORACLE[scheme](xd, seed=11, offset=2**33 + 5)
        assert torch.equal(got_i, ref_i), (scheme, dtype)
        assert bits_equal(got_v, ref_v), (scheme, dtype)
