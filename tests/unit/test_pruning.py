"""Tests of gradwire.numerics.pruning: bit-exact semantics against a scalar re-implementation of
the module docstring, unbiasedness and sparsity of stochastic pruning (Monte Carlo vs exact
expectations), the lognormal threshold (prune_to_sparsity), the Gaussian (ATP) and top-k
baselines, chunking via offset, dtypes, non-finite data and bad input.

Statistical tolerances are 6 standard errors computed from the known variance of the quantity
(two-sided false-failure rate ~2e-9), and all data and random bits are seeded.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwire.numerics import lognormal, pruning, rng

# One intra-op thread (tests/conftest.py): on the shared 2-core CI box, 2 threads made the
# 200k-element quantize calls ~17x slower.
pytestmark = pytest.mark.usefixtures("single_thread")

F32 = np.float32


def _bits(v: torch.Tensor) -> torch.Tensor:
    return v.contiguous().view(torch.int32)


def _lognormal_data(n: int, mu_ln: float, sigma_ln: float, seed: int, zero_frac: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(mu_ln + sigma_ln * torch.randn(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).float()
    if zero_frac:
        x[torch.rand(n, generator=g) < zero_frac] = 0.0
    return x


def _expected_zeros(x: torch.Tensor, a: float) -> tuple[float, float]:
    """Exact E[#zeros] and Var[#zeros] of stochastic pruning at a: each nonzero |x| <= a is zeroed
    with probability 1 - |x|/a (independent Bernoullis), exact zeros stay zero."""
    ax = x.double().abs()
    p = torch.where(ax <= a, 1.0 - ax / a, 0.0)
    p = torch.where(ax == 0, 1.0, p)
    return p.sum().item(), (p * (1 - p)).sum().item()


# ------------------------------------------------------------------ bit-exact semantics
def _ref_prune(xs, a, us):
    """The module docstring, element by element, in numpy float32."""
    out = []
    for x, u in zip(xs, us):
        ax = abs(x)
        if not ax <= a:
            out.append(x)
            continue
        t = F32(a * u)
        out.append(F32(math.copysign(a, x)) if (ax >= t and ax > 0) else F32(0.0))
    return np.array(out, dtype=np.float32)


def test_matches_docstring_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g) * 0.7,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 0.5, float("inf"),
                                 float("-inf"), float("nan"), 1.0000001, 0.99999994])])
    a = F32(1.0)
    for seed, offset in ((0, 0), (123, 1000), (2**32 - 1, 2**33)):
        got = pruning.stochastic_prune(x, 1.0, seed=seed, offset=offset)
        us = rng.uniform(seed, torch.arange(offset, offset + x.numel(), dtype=torch.int64)).tolist()
        exp = torch.from_numpy(_ref_prune([F32(v) for v in x.tolist()], a, [F32(u) for u in us]))
        assert torch.equal(_bits(got), _bits(exp))
    # pinned facts of the rule: kept, rounded-up and pruned values are exactly x, +-a and +0.0
    out = pruning.stochastic_prune(x, 1.0, seed=7)
    fin = torch.isfinite(x)
    ok = (out == x) | (out.abs() == 1.0) | (_bits(out) == 0) | (~fin & (_bits(out) == _bits(x)))
    assert ok.all()


def test_offset_chunks_agree():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    full = pruning.stochastic_prune(x, 0.8, seed=5)
    parts = [pruning.stochastic_prune(x[i:i + 300], 0.8, seed=5, offset=i) for i in range(0, 1000, 300)]
    assert torch.equal(_bits(torch.cat(parts)), _bits(full))
    assert not torch.equal(full, pruning.stochastic_prune(x, 0.8, seed=6))


# ------------------------------------------------------------------ statistics
def test_unbiased_per_element():
    a = 1.0
    vals = torch.cat([torch.linspace(-1, 1, 41), torch.tensor([1.5, -3.0, 0.01, -0.99])])
    k = 20000
    out = pruning.stochastic_prune(vals.repeat(k, 1), a, seed=3).double()  # row r: counters fresh
    mean = out.mean(0)
    x = vals.double()
    # per-element variance |x| (a - |x|) for |x| <= a, 0 above; 6 SE
    var = torch.where(x.abs() <= a, x.abs() * (a - x.abs()), 0.0)
    assert ((mean - x).abs() <= 6 * (var / k).sqrt() + 1e-12).all(), (mean - x).abs().max()
    # the empirical variance agrees too: the outcome is two-point, so Var = a^2 p (1 - p) exactly;
    # the sample variance of a Bernoulli(p) * a has SE <= a^2 sqrt(p (1 - p) / k) -> 6 SE.
    emp = out.var(0)
    p = torch.where(x.abs() <= a, x.abs() / a, 1.0)
    assert ((emp - var).abs() <= 6 * a * a * (p * (1 - p) / k).sqrt() + 1e-9).all()


def test_achieved_sparsity_matches_exact_expectation():
    x = _lognormal_data(200000, -8.0, 2.0, seed=2, zero_frac=0.2)
    for alpha in (1e-4, 3e-3, 2e-2):
        a = pruning.effective_alpha(alpha, torch.float32)
        mean, var = _expected_zeros(x, a)
        zeros = (pruning.stochastic_prune(x, alpha, seed=9) == 0).sum().item()
        assert abs(zeros - mean) <= 6 * math.sqrt(var) + 1, (alpha, zeros, mean, math.sqrt(var))


def test_prune_to_sparsity_hits_target_on_lognormal_data():
    n = 200000
    for sparsity, zf in ((0.5, 0.0), (0.8, 0.3), (0.95, 0.0), (0.2, 0.3)):
        x = _lognormal_data(n, -12.0, 2.5, seed=4, zero_frac=zf)
        pruned, a = pruning.prune_to_sparsity(x, sparsity, seed=1)
        if sparsity <= zf:
            assert a == 0.0 and torch.equal(pruned, x)  # already sparse enough
            continue
        mean, var = _expected_zeros(x, a)
        got = (pruned == 0).sum().item()
        # Pruning noise around the exact expectation: 6 SD of the Bernoulli sum.
        assert abs(got - mean) <= 6 * math.sqrt(var) + 1
        # Expectation vs target: the threshold comes from a fit of n samples. Error budget:
        # sampling of the data (SD <= 0.5/sqrt(n)) plus the fit's errors propagated through
        # Eq. 8: se(mu) = sigma/sqrt(n_nz), se(sigma) = sigma/sqrt(2 n_nz); 6 SD in all.
        fit = lognormal.fit_lognormal(x)
        nnz = n * (1 - fit.zero_fraction)
        s_nz = (sparsity - fit.zero_fraction) / (1 - fit.zero_fraction)
        h = 1e-4
        d_mu = (lognormal.pruning_sparsity(a, fit.mu_ln + h, fit.sigma_ln)
                - lognormal.pruning_sparsity(a, fit.mu_ln - h, fit.sigma_ln)) / (2 * h)
        d_sg = (lognormal.pruning_sparsity(a, fit.mu_ln, fit.sigma_ln + h)
                - lognormal.pruning_sparsity(a, fit.mu_ln, fit.sigma_ln - h)) / (2 * h)
        sd = math.sqrt(0.25 / nnz + (d_mu * fit.sigma_ln) ** 2 / nnz + (d_sg * fit.sigma_ln) ** 2 / (2 * nnz))
        assert abs((mean / n - fit.zero_fraction) / (1 - fit.zero_fraction) - s_nz) <= 6 * sd, sparsity


def test_normal_threshold_monte_carlo_on_gaussian_data():
    """normal_sparsity (half-normal analogue of Eq. 6) vs simulation on Gaussian data."""
    n = 200000
    x = torch.randn(n, generator=torch.Generator().manual_seed(8)) * 3e-3
    for s in (0.3, 0.6, 0.9):
        a = pruning.normal_threshold(x, s)
        mean, _ = _expected_zeros(x, a)
        # data sampling (SD <= 0.5/sqrt(n)) + sigma estimate (var of |g|/E|g| is pi/2 - 1)
        c = a / (math.sqrt(math.pi / 2) * x.double().abs().mean().item())
        h = 1e-6
        dlog = (pruning.normal_sparsity(c * (1 + h)) - pruning.normal_sparsity(c * (1 - h))) / (2 * h)
        sd = math.sqrt(0.25 / n + dlog ** 2 * (math.pi / 2 - 1) / n)
        assert abs(mean / n - s) <= 6 * sd, (s, mean / n)
    assert pruning.normal_sparsity(0.0) == 0.0 and pruning.normal_sparsity(50.0) > 0.98
    cs = [pruning.normal_sparsity(c) for c in np.linspace(0.01, 20, 200)]
    assert all(b > a for a, b in zip(cs, cs[1:]))  # increasing: the root is unique


def test_baselines_miss_the_target_on_lognormal_data():
    """Fig. 5 (right) of paper 001: ATP (Gaussian) and top-k + stochastic pruning do not achieve
    the requested sparsity on lognormal gradients; the lognormal threshold does (test above)."""
    n = 100000
    x = _lognormal_data(n, -10.0, 2.0, seed=6)
    # Expected sparsities (exact expectation over the pruning noise). Sampling of the data moves a
    # fraction by SD <= 0.5/sqrt(n) = 0.0016, so gaps of 0.02 are > 12 SD: systematic, not noise.
    # Measured (sigma_ln = 2): S=0.5 -> ATP 0.771, top-k 0.331; S=0.8 -> 0.879, 0.632;
    # S=0.9 -> 0.928, 0.767.
    for s in (0.5, 0.8, 0.9):
        atp = _expected_zeros(x, pruning.normal_threshold(x, s))[0] / n
        topk = _expected_zeros(x, pruning.topk_threshold(x, s))[0] / n
        assert atp > s + 0.02 and topk < s - 0.1, (s, atp, topk)


def test_topk_threshold_is_the_exact_quantile():
    x = torch.tensor([0.5, -3.0, 2.0, 0.1, -0.2, 4.0, 1.0, -1.5, 0.0, 7.0])
    assert pruning.topk_threshold(x, 0.0) == 0.0
    assert pruning.topk_threshold(x, 0.3) == torch.tensor(0.2).item()  # 3rd smallest |x| (float32)
    assert pruning.topk_threshold(x, 0.9) == 4.0
    assert pruning.topk_threshold(x, 0.95) == 7.0
    assert pruning.topk_threshold(torch.tensor([1.0, float("nan"), 2.0, float("inf")]), 0.5) == 1.0
    y = torch.randn(10001, generator=torch.Generator().manual_seed(3))
    t = pruning.topk_threshold(y, 0.7)
    assert (y.abs() <= t).sum().item() == math.ceil(0.7 * 10001)  # distinct magnitudes


# ------------------------------------------------------------------ dtypes, edge cases, errors
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    x = (torch.randn(4000, generator=torch.Generator().manual_seed(2)) * 0.5).to(dtype)
    alpha = 0.3  # not representable in bf16/fp16: rounded to x.dtype first
    a = pruning.effective_alpha(alpha, dtype)
    assert a == torch.tensor(alpha).to(dtype).item() and a != alpha
    out = pruning.stochastic_prune(x, alpha, seed=4)
    assert out.dtype == dtype
    ref = pruning.stochastic_prune(x.float(), a, seed=4)  # same bits as the float32 path
    assert torch.equal(out.float(), ref)
    assert set(out[(x.float().abs() <= a)].float().abs().unique().tolist()) <= {0.0, a}


def test_nonfinite_pass_through_and_trivial_cases():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.1, -0.2])
    out = pruning.stochastic_prune(x, 1.0, seed=1)
    assert out[0].isnan() and out[1].item() == math.inf and out[2].item() == -math.inf
    assert torch.equal(pruning.stochastic_prune(x[3:], 0.0), x[3:])  # alpha <= 0: identity
    assert torch.equal(pruning.stochastic_prune(x[3:], -1.0), x[3:])
    assert pruning.stochastic_prune(torch.zeros(0, 3), 1.0).shape == (0, 3)
    s = pruning.stochastic_prune(torch.tensor(0.25), 1.0, seed=0)
    assert s.shape == () and s.item() in (0.0, 1.0)
    assert pruning.stochastic_prune(torch.tensor([0.5]), torch.tensor(1.0)).shape == (1,)
    assert pruning.stochastic_prune(torch.tensor([5.0, -5.0]), 1.0).tolist() == [5.0, -5.0]


def test_bad_inputs():
    x = torch.ones(4)
    with pytest.raises(TypeError):
        pruning.stochastic_prune(torch.ones(4, dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="float64"):
        pruning.stochastic_prune(torch.ones(4, dtype=torch.float64), 1.0)
    with pytest.raises(TypeError):
        pruning.stochastic_prune([1.0], 1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            pruning.stochastic_prune(x, bad)
    with pytest.raises(ValueError, match="overflows"):
        pruning.stochastic_prune(x.half(), 1e6)
    with pytest.raises(TypeError):
        pruning.stochastic_prune(x, "1.0")
    with pytest.raises(ValueError):
        pruning.stochastic_prune(x, torch.ones(2))
    with pytest.raises(ValueError):
        pruning.stochastic_prune(x, 1.0, seed=2**32)
    with pytest.raises(ValueError):
        pruning.stochastic_prune(x, 1.0, offset=-1)
    for s in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            pruning.prune_to_sparsity(x, s)
        with pytest.raises(ValueError):
            pruning.normal_threshold(x, s)
        with pytest.raises(ValueError):
            pruning.topk_threshold(x, s)
    with pytest.raises(ValueError, match="empty"):
        pruning.prune_to_sparsity(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match="finite"):
        pruning.topk_threshold(torch.tensor([float("nan")]), 0.5)
    assert pruning.normal_threshold(torch.zeros(8), 0.5) == 0.0


def test_prune_to_sparsity_all_zero_and_non_finite():
    # All zeros: already fully sparse, so alpha = 0 and the tensor comes back unchanged.
    z = torch.zeros(3, 5, dtype=torch.bfloat16)
    out, a = pruning.prune_to_sparsity(z, 0.9, seed=1)
    assert a == 0.0 and torch.equal(out, z) and out.dtype == torch.bfloat16
    # Zeros and non-finite only: the zeros already meet a low target; a higher one cannot be
    # met (no finite nonzero to fit), which is a clear error rather than a silent no-op.
    x = torch.tensor([0.0, 0.0, float("nan"), float("inf")])
    out, a = pruning.prune_to_sparsity(x, 0.5)
    assert a == 0.0 and torch.equal(out[:2], x[:2]) and out[2].isnan() and out[3].item() == math.inf
    with pytest.raises(ValueError, match="usable"):
        pruning.prune_to_sparsity(x, 0.75)
    # Integer input: TypeError like every other entry point.
    with pytest.raises(TypeError):
        pruning.prune_to_sparsity(torch.zeros(4, dtype=torch.int64), 0.5)
