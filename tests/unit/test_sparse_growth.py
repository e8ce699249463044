"""Sampling for DST: Eq. 7 (GraBo) distribution, rejection of active pairs, ER init, schedule.

Statistical tests are seeded (counter-based RNG), so they are deterministic; their thresholds
are chosen so that a correct sampler would fail with probability below 1e-6 on a fresh seed.
"""
import math

import pytest
import torch
from scipy import stats

from gradwire.sparse import growth
from gradwire.sparse.growth import (cosine_prune_fraction, erdos_renyi_topology,
                                    fan_in_normal_init, invert_cdf, layer_densities,
                                    sample_inactive_subset, sample_pairs, sample_units, uniform64)
from gradwire.sparse.sparse_linear import SparseLinear

P_MIN = 1e-6  # chi-square p-value below which we reject


# Small GEMMs gain nothing from threads on the shared 2-core runner (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _grabo_marginals():
    """Eq. 7 marginals from a real batch: f = sum_i |h_i|, g = sum_i |delta_i| (with zeros)."""
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(32, 8, generator=g))  # ReLU inputs: some units have tiny mass
    h[:, 3] = 0.0                                       # a dead input unit: never sampled
    delta = torch.randn(32, 6, generator=g) * torch.tensor([1, 2, 3, 0.5, 4, 1.5])
    return h.abs().sum(0), delta.abs().sum(0)


def test_sample_pairs_follows_eq7_joint_distribution():
    f, g = _grabo_marginals()
    n = 200_000
    rows, cols = sample_pairs(f, g, n, seed=11)
    counts = torch.bincount(rows * 8 + cols, minlength=48).double()
    p = (g[:, None] / g.sum() * (f[None, :] / f.sum())).reshape(-1).double()
    assert counts[p == 0].sum() == 0  # the dead unit is never drawn
    live = p > 0
    chi2 = float(((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum())
    pval = stats.chi2.sf(chi2, int(live.sum()) - 1)
    assert pval > P_MIN, (chi2, pval)
    # Power check: the same counts are rejected against the uniform law (Eq. 1, Random/SET).
    q = live.double() / live.sum()
    chi2_u = float(((counts[live] - n * q[live]) ** 2 / (n * q[live])).sum())
    assert stats.chi2.sf(chi2_u, int(live.sum()) - 1) < P_MIN


def test_sample_units_marginal_and_errors():
    w = torch.tensor([1.0, 0.0, 3.0, 6.0])
    n = 100_000
    idx = sample_units(w, n, seed=5)
    counts = torch.bincount(idx, minlength=4).double()
    assert counts[1] == 0
    p = w.double() / w.sum()
    # Each count is Binomial(n, p): 6 standard errors.
    se = torch.sqrt(n * p * (1 - p))
    assert bool(((counts - n * p).abs() <= 6 * se + 1e-9).all()), counts
    for bad in (torch.tensor([1.0, -1.0]), torch.zeros(3), torch.tensor([1.0, math.nan]),
                torch.empty(0)):
        with pytest.raises(ValueError):
            sample_units(bad, 10, seed=0)


def test_uniform64_is_uniform_and_fine_grained():
    u = uniform64(3, 100_000)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert stats.kstest(u.numpy(), "uniform").pvalue > P_MIN
    # 48 bits: almost no value lies on the coarse 24-bit grid.
    assert float((u * 2**24 == torch.floor(u * 2**24)).double().mean()) < 1e-3


def test_inactive_subset_excludes_active_and_follows_conditional_law():
    f, g = _grabo_marginals()
    g_ = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 8, generator=g_) < 0.5
    layer = SparseLinear.from_dense(torch.ones(6, 8), mask)
    # One pair per seed: its law must be f x g restricted to inactive pairs, renormalised.
    n = 3000
    firsts = []
    for s in range(n):
        r, c = sample_inactive_subset(f, g, 1, layer.is_active, seed=s)
        firsts.append(int(r[0]) * 8 + int(c[0]))
    counts = torch.bincount(torch.tensor(firsts), minlength=48).double()
    p = (g[:, None] * f[None, :]).reshape(-1).double() * (~mask).reshape(-1)
    p = p / p.sum()
    assert counts[p == 0].sum() == 0  # never an active pair, never a dead unit
    live = p > 0
    chi2 = float(((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum())
    assert stats.chi2.sf(chi2, int(live.sum()) - 1) > P_MIN
    # A large subset: distinct, inactive, full size when enough mass is available.
    r, c = sample_inactive_subset(torch.ones(8), torch.ones(6), 20, layer.is_active, seed=0)
    assert r.numel() == 20 and torch.unique(r * 8 + c).numel() == 20
    assert not bool(layer.is_active(r, c).any())


def test_invert_cdf_is_searchsorted_bit_exact():
    # Enough draws for the guide table to be used (K = 1024 cells for 50 units), zero-weight
    # units (repeated CDF values), and draws exactly on CDF values and on grid points j / K.
    w = torch.rand(50, generator=torch.Generator().manual_seed(7), dtype=torch.float64) ** 4
    w[::5] = 0.0
    cdf = torch.cumsum(w, 0) / w.sum()
    u = torch.cat([uniform64(9, 20_000), cdf[:-1], torch.arange(1024, dtype=torch.float64) / 1024,
                   torch.tensor([0.0, 1 - 2.0**-48, 1.0], dtype=torch.float64)])
    assert torch.equal(invert_cdf(cdf, u), torch.searchsorted(cdf, u, right=True))
    assert torch.equal(invert_cdf(cdf, u[:10]), torch.searchsorted(cdf, u[:10], right=True))


def test_inactive_subset_is_independent_of_round_size(monkeypatch):
    # The subset is the first `size` distinct inactive pairs of the draw sequence, so cutting
    # the sequence into many small rounds must give the same set; it comes back sorted.
    f, g = _grabo_marginals()
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(2)) < 0.3
    layer = SparseLinear.from_dense(torch.ones(6, 8), mask)
    want = {}
    for size in (1, 5, 17):
        for seed in range(20):
            r, c = sample_inactive_subset(f, g, size, layer.is_active, seed=seed)
            lin = r * 8 + c
            assert bool((lin[1:] > lin[:-1]).all()) and not bool(layer.is_active(r, c).any())
            want[size, seed] = lin
    monkeypatch.setattr(growth, "_ROUND_CAP", 3)
    for (size, seed), lin in want.items():
        r, c = sample_inactive_subset(f, g, size, layer.is_active, seed=seed, max_rounds=10**4)
        assert torch.equal(r * 8 + c, lin), (size, seed)


def test_erdos_renyi_topology_exact_and_uniform():
    out_f, in_f, nnz, n_seeds = 6, 5, 10, 600
    counts = torch.zeros(out_f * in_f)
    for s in range(n_seeds):
        r, c = erdos_renyi_topology(out_f, in_f, nnz, seed=s)
        lin = r * in_f + c
        assert lin.numel() == nnz and torch.unique(lin).numel() == nnz
        assert bool((r < out_f).all() and (c < in_f).all() and (lin >= 0).all())
        counts[lin] += 1
    # Each connection is included with probability nnz/total: 6 binomial standard errors.
    p = nnz / (out_f * in_f)
    assert float((counts - n_seeds * p).abs().max()) <= 6 * math.sqrt(n_seeds * p * (1 - p))
    r, c = erdos_renyi_topology(100_000, 100_000, 1000, seed=1)  # no dense mask needed
    assert torch.unique(r * 100_000 + c).numel() == 1000
    with pytest.raises(ValueError):
        erdos_renyi_topology(2, 2, 5, seed=0)


def test_fan_in_normal_init_variance():
    # Fan-in classes 1, 4, 16, 64 (2000 units each): Var = gain^2 / fan_in.
    fans = [1, 4, 16, 64]
    reps = 2000
    # One output unit per (fan-in class, repetition), each with exactly that many inputs.
    rows = torch.cat([torch.arange(reps).repeat_interleave(f) + i * reps
                      for i, f in enumerate(fans)])
    w = fan_in_normal_init(rows, 4 * reps, seed=2, gain=1.5, dtype=torch.float64)
    for i, f in enumerate(fans):
        v = w[rows // reps == i]
        n = v.numel()
        target = 1.5**2 / f
        # Sample variance of a normal: standard error target * sqrt(2 / (n - 1)); 6 SE.
        assert abs(float(v.var()) - target) <= 6 * target * math.sqrt(2 / (n - 1))
        assert abs(float(v.mean())) <= 6 * math.sqrt(target / n)


def test_layer_densities():
    shapes = [(256, 64), (256, 256), (10, 256)]
    sizes = torch.tensor([o * i for o, i in shapes], dtype=torch.float64)
    assert layer_densities(shapes, 0.1) == [0.1] * 3
    d = torch.tensor(layer_densities(shapes, 0.1, "erdos_renyi"), dtype=torch.float64)
    assert abs(float((d * sizes).sum() / sizes.sum()) - 0.1) < 1e-12
    assert d[2] > d[1]  # narrow layer gets higher density
    d = layer_densities([(4, 4), (1000, 1000)], 0.5, "erdos_renyi")
    assert d[0] == 1.0 and 0 < d[1] < 1  # capped at dense, the rest rescaled
    with pytest.raises(ValueError):
        layer_densities(shapes, 0.0)
    with pytest.raises(ValueError):
        layer_densities(shapes, 0.1, "bogus")


def test_cosine_prune_fraction():
    assert cosine_prune_fraction(0, 0.2, 100) == pytest.approx(0.2)
    assert cosine_prune_fraction(50, 0.2, 100) == pytest.approx(0.1)
    assert cosine_prune_fraction(100, 0.2, 100) == 0.0
    assert cosine_prune_fraction(150, 0.2, 100) == 0.0
