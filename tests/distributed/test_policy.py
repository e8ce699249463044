"""BoundaryPolicy (single process): warm-up, refresh schedule, decode, counters, heterogeneous
sparsity, validation."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from gradwire.codec.registry import build_codec
from gradwire.numerics.lognormal import fit_from_stats, merge_stats, moment_stats
from gradwire.policy import BoundaryPolicy, PolicyConfig, allocate_heterogeneous


def _grad(seed, n=4096, sigma=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).sign() * torch.exp(sigma * torch.randn(n, generator=g) - 5)


def test_warmup_then_refresh_schedule():
    p = BoundaryPolicy(codec={"name": "fp8_e4m3"}, warmup_steps=2, refresh_every=3, sample_every=1)
    xs = [_grad(s) for s in range(8)]
    packets = [p.encode(x, s) for s, x in enumerate(xs[:2])]
    ident = build_codec({"name": "identity"})
    for x, pk in zip(xs[:2], packets):  # warm-up: uncompressed, exact
        assert pk.numel() == ident.packed_size(x.shape, x.dtype) == p.packed_size(x.shape, x.dtype, 0)
        assert torch.equal(p.decode(pk), x)
    assert p.fit is None
    pk = p.encode(xs[2], 2)  # first refresh: the fit of the warm-up statistics, exactly
    # the policy fits the statistics its codecs report from the encode pass (fused native kernels
    # may differ from the reference moment_stats in the last bits of the float64 sums)
    fp8 = build_codec({"name": "fp8_e4m3"})

    def st(codec, x):
        return codec.encode_with_stats(x)[1]

    want = fit_from_stats(merge_stats(st(ident, xs[0]), st(ident, xs[1])))
    assert p.fit == want
    assert pk.numel() == build_codec({"name": "fp8_e4m3"}).packed_size(xs[2].shape, xs[2].dtype)
    assert pk.numel() == p.packed_size(xs[2].shape, xs[2].dtype, 2)
    assert torch.equal(p.decode(pk), build_codec({"name": "fp8_e4m3"}).decode(pk))
    p.encode(xs[3], 3)
    p.encode(xs[4], 4)
    assert p.fit == want  # no refresh before step 2 + 3
    p.encode(xs[5], 5)
    assert p.fit == fit_from_stats(merge_stats(merge_stats(st(fp8, xs[2]), st(fp8, xs[3])), st(fp8, xs[4])))
    t = p.telemetry()
    assert t["steps"] == 6 and t["warmup_steps"] == 2 and t["refreshes"] == 2
    assert t["raw_bytes"] == 6 * 4096 * 4
    assert t["sent_bytes"] == 2 * ident.packed_size((4096,), torch.float32) + \
        4 * build_codec({"name": "fp8_e4m3"}).packed_size((4096,), torch.float32)
    assert t["samples"] == 6 and 0.99 < t["cosine"] <= 1.0 and 0 < t["rel_error"] < 0.1


def test_stats_every_gathers_only_on_its_steps():
    # warm-up 1, refresh every 4, statistics every 2: steps 0 (warm-up), 1, 3 | refresh at 5 | 5, 7
    p = BoundaryPolicy(codec={"name": "fp", "bits": 6}, warmup_steps=1, refresh_every=4, stats_every=2)
    assert [s for s in range(9) if p.collects_stats(s)] == [0, 1, 3, 5, 7]
    seen = []
    codec = p.codec
    real = codec.encode_with_stats

    def spy(x, **kw):
        seen.append(x)
        return real(x, **kw)

    codec.encode_with_stats = spy
    xs = [_grad(s, sigma=1.0 + 0.25 * s) for s in range(9)]
    packets = [p.encode(x, s) for s, x in enumerate(xs[:2])]
    fit_after_step_1 = p.fit
    packets += [p.encode(x, s) for s, x in enumerate(xs[2:], start=2)]
    assert [[i for i, y in enumerate(xs) if y is x] for x in seen] == [[1], [3], [5], [7]]  # 0: identity
    ident, fp = build_codec({"name": "identity"}), build_codec({"name": "fp", "bits": 6})

    def st(c, x):
        return c.encode_with_stats(x)[1]

    # the refresh at step 1 fits step 0; the one at step 5 fits steps 1 and 3 (not 2 or 4)
    first = fit_from_stats(st(ident, xs[0]))
    second = fit_from_stats(merge_stats(st(fp, xs[1]), st(fp, xs[3])))
    assert fit_after_step_1 == first and p.fit == second and first != second
    # packets of non-gathering steps are the same bytes as the codec's own encode
    assert torch.equal(packets[6], fp.encode(xs[6], seed=p.seed(6), fit=second))
    with pytest.raises(ValueError, match="stats_every .* must be <= refresh_every"):
        PolicyConfig(refresh_every=3, stats_every=4)
    with pytest.raises(ValueError, match="stats_every"):
        PolicyConfig(stats_every=0)


def test_seed_schedule_and_sampled_error_match_direct_computation():
    p = BoundaryPolicy(PolicyConfig(codec={"name": "bf16"}, base_seed=9, boundary_id=4, sample_every=2))
    x = _grad(1)
    pk = p.encode(x, 2)
    y = build_codec({"name": "bf16"}).decode(pk, dtype=torch.float32).double()
    xd = x.double()
    t = p.telemetry()
    assert math.isclose(t["rel_error"], ((y - xd).norm() / xd.norm()).item(), rel_tol=1e-12)
    assert math.isclose(t["cosine"], ((xd @ y) / (xd.norm() * y.norm())).item(), rel_tol=1e-12)
    p.encode(x, 3)  # not a sampling step
    assert p.telemetry()["samples"] == 1


def test_nonfinite_arrives_nonfinite():
    p = BoundaryPolicy(codec={"name": "fp8_e4m3"})
    x = _grad(2)
    x[5], x[7] = float("inf"), float("nan")
    y = p.decode(p.encode(x, 0))
    assert not torch.isfinite(y[5]) and torch.isnan(y[7])


def test_heterogeneous_sparsity_meets_budget():
    pytest.importorskip("gradwire.codec.prune")
    pols = [BoundaryPolicy(codec={"name": "prune", "sparsity": 0.8}, refresh_every=1, boundary_id=i)
            for i in range(3)]
    sizes, sigmas = [4096, 2048, 8192], [1.0, 2.0, 3.0]
    for i, (p, n, s) in enumerate(zip(pols, sizes, sigmas)):
        p.encode(_grad(i, n, s), 0)
        p.encode(_grad(10 + i, n, s), 1)  # refresh at step 1 from step-0 statistics
    budget = 0.8
    sp = allocate_heterogeneous(pols, budget)
    # element-weighted mean equals the budget (allocate_sparsity solves it by root finding)
    assert abs(sum(s * n for s, n in zip(sp, sizes)) / sum(sizes) - budget) < 1e-6
    assert len(set(round(s, 6) for s in sp)) == 3  # different sigmas -> different sparsities
    assert [p.codec.config()["sparsity"] for p in pols] == sp


def test_validation_and_pickling():
    for kw in ({"warmup_steps": -1}, {"refresh_every": 0}, {"sample_every": 1.5}, {"base_seed": -2}):
        with pytest.raises(ValueError):
            PolicyConfig(**kw)
    with pytest.raises(TypeError):
        PolicyConfig(codec=42)
    p = BoundaryPolicy(codec={"name": "bf16"})
    with pytest.raises(ValueError, match="step"):
        p.encode(torch.ones(3), -1)
    with pytest.raises(TypeError, match="prune"):
        p.set_sparsity(0.5)
    q = pickle.loads(pickle.dumps(p))
    assert q.codec.config() == p.codec.config()


def test_observe_keeps_statistics_on_their_device():
    """``observe`` must not read the statistics back to the host (on CUDA that would synchronise
    every encode): statistics on the ``meta`` device (which cannot be copied to the host at all)
    stay there; the host read happens at the refresh, where the sums are validated."""
    p = BoundaryPolicy(codec={"name": "fp8_e4m3"}, warmup_steps=1, refresh_every=2)
    for _ in range(3):
        p.observe(torch.zeros(5, dtype=torch.float32, device="meta"))
    assert p._pending.device.type == "meta" and p._pending.dtype == torch.float64
    with pytest.raises(ValueError, match="shape"):
        p.observe(torch.zeros(4, dtype=torch.float64))
    # on CPU the accumulated sums are exactly merge_stats of the parts, and the fit follows
    q = BoundaryPolicy(codec={"name": "fp8_e4m3"}, warmup_steps=2, refresh_every=2)
    a, b = moment_stats(_grad(1)), moment_stats(_grad(2))
    q.observe(a)
    q.observe(b)
    assert torch.equal(q._pending, merge_stats(a, b))
    q.encode(_grad(3), 2)
    assert q.fit == fit_from_stats(merge_stats(a, b))
