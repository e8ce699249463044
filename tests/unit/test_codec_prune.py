"""Prune codec: exact agreement with the numerics reference, sparsity and unbiasedness by
Monte Carlo, compact sizes, non-finite data, validation."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradwire.codec import PacketError
from gradwire.codec.header import build_packet, parse_packet
from gradwire.codec.prune import PRUNE_PARAMS, PruneCodec
from gradwire.numerics.fp import FPFormat, quantize
from gradwire.numerics.lognormal import LognormalFit
from gradwire.numerics.pruning import stochastic_prune
from gradwire.numerics.rng import derive_seed


def lognormal(n, sigma_ln=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (sign * torch.exp(sigma_ln * torch.randn(n, generator=g) - 3.0)).to(dtype)


def reference(codec: PruneCodec, x, seed, fit=None):
    """Composed from numerics: stochastic_prune, then FP quantisation of the kept entries."""
    a = codec.threshold(x, fit)
    y = stochastic_prune(x, a, seed=seed)
    if codec.kept_bits is None:
        return y
    h, _ = parse_packet(codec.encode(x, seed=seed, fit=fit))
    scale_exp = PRUNE_PARAMS.unpack(h.params)[7]
    fmt = FPFormat(codec.kept_exp_bits, codec.kept_bits - 1 - codec.kept_exp_bits)
    kept = (y != 0) & (y.float().abs() != a)
    q = quantize(y, fmt, codec.rounding, scale_exp=scale_exp, seed=derive_seed(seed, 1))
    return torch.where(kept, q, y)


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kept_bits", [8, 5, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_reference(kept_bits, dtype):
    x = lognormal(3000, dtype=dtype).reshape(3, 1000, 1)[:, :997]  # odd, non-contiguous
    c = PruneCodec(0.85, kept_bits=kept_bits)
    y = c.decode(c.encode(x, seed=11))
    assert y.dtype == dtype and y.shape == x.shape
    same(y, reference(c, x, 11))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 6), max_size=3), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       s=st.floats(0.0, 0.99), kept_bits=st.sampled_from([None, 3, 6, 8]), seed=st.integers(0, 2**32 - 1),
       rounding=st.sampled_from(["nearest", "stochastic"]))
def test_property_round_trip(shape, dtype, s, kept_bits, seed, rounding):
    g = torch.Generator().manual_seed(seed % 1000)
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(dtype)
    c = PruneCodec(s, kept_bits=kept_bits, rounding=rounding)
    p = c.encode(x, seed=seed)
    assert p.numel() <= c.max_packed_size(shape, dtype)
    same(c.decode(p), reference(c, x, seed))


def test_zero_and_empty_tensors():
    c = PruneCodec(0.9)
    for x in [torch.zeros(()), torch.tensor(3.0), torch.full((7,), 0.1), torch.zeros(0, 4), torch.zeros(5, 5)]:
        y = c.decode(c.encode(x))
        assert y.shape == x.shape
        same(y, reference(c, x, 0))


def test_sparsity_matches_the_operator_and_the_model():
    n = 1 << 16
    x = lognormal(n, sigma_ln=2.0, seed=1)
    c = PruneCodec(0.8, kept_bits=None)
    a = c.threshold(x)
    zeros = float((c.decode(c.encode(x, seed=5)) == 0).sum())
    # Operator: each |x| <= a is zeroed with probability p = 1 - |x|/a, independently.
    ax = x.abs().double()
    p = torch.where(ax <= a, 1 - ax / a, torch.zeros_like(ax))
    se = math.sqrt(float((p * (1 - p)).sum()))
    assert abs(zeros - float(p.sum())) <= 6 * se  # 6 standard errors: never flakes with a fixed seed
    # Model (Eq. 8 with the fitted mu/sigma): the expected sparsity is the target, up to the fit's
    # sampling error (O(1/sqrt(n)) relative; 0.01 absolute is ~10x that at n = 65536).
    assert abs(float(p.sum()) / n - 0.8) < 0.01


@pytest.mark.parametrize("kept_bits", [None, 8])
def test_unbiased(kept_bits):
    # Eight values (four below the threshold, four above), each repeated R times: the repeats draw
    # independent bits (counter = element index), so group means estimate E[decode] per value.
    fit = LognormalFit(mu_log2=0.0, sigma_log2=1.0, zero_fraction=0.0, nonfinite_count=0, numel=1)
    vals = torch.tensor([0.05, -0.3, 0.9, -2.2, 4.5, -7.0, 11.0, -40.0])
    R = 4096
    x = vals.repeat_interleave(R)
    c = PruneCodec(0.6, kept_bits=kept_bits)
    a = c.threshold(x, fit)
    assert 2.2 < a < 4.5  # the test needs values on both sides of the threshold
    y = c.decode(c.encode(x, seed=2, fit=fit)).reshape(8, R).double()
    v = vals.double().abs()
    var = torch.where(v <= a, v * (a - v), torch.zeros_like(v))
    if kept_bits:
        # stochastic rounding of a kept value: variance <= ulp**2 / 4; E4M3 ulp <= v * 2**-3
        var = var + torch.where(v > a, (v * 2.0**-3) ** 2 / 4, torch.zeros_like(v))
    tol = 6 * torch.sqrt(var / R) + 1e-6 * v  # 6 standard errors (+ float32 resolution)
    assert ((y.mean(1) - vals.double()).abs() <= tol).all()


def test_compact_sizes_meet_goals():
    x = lognormal(1 << 16, sigma_ln=2.0, seed=3)
    bits = {}
    for s in (0.8, 0.9):
        p = PruneCodec(s, kept_bits=8).encode(x, seed=0)
        bits[s] = p.numel() * 8 / x.numel()
    # 1 (bitmap) + 0.2 + 0.12 + 0.08 * 8 = 1.96 and 1 + 0.1 + 0.07 + 0.03 * 8 = 1.41 (module doc)
    assert bits[0.8] <= 2.1 and bits[0.9] <= 1.5, bits


@pytest.mark.parametrize("kept_bits", [None, 8])
def test_nonfinite_are_kept_nonfinite(kept_bits):
    x = lognormal(1000, seed=4)
    x[[3, 500, 999]] = torch.tensor([math.nan, math.inf, -math.inf])
    y = PruneCodec(0.9, kept_bits=kept_bits).decode(PruneCodec(0.9, kept_bits=kept_bits).encode(x))
    assert not torch.isfinite(y[[3, 500, 999]]).any()
    assert torch.isfinite(y[torch.isfinite(x)]).all()


def test_sizes_api():
    c = PruneCodec(0.5)
    with pytest.raises(TypeError, match="variable-size"):
        c.packed_size((10,), torch.float32)
    x = lognormal(999, seed=6)
    for s in (0.0, 0.5):
        c = PruneCodec(s, kept_bits=8)
        assert c.encode(x).numel() <= c.max_packed_size((999,), torch.float32)


def test_config_errors_and_mismatch():
    with pytest.raises(ValueError, match="sparsity"):
        PruneCodec(1.0)
    with pytest.raises(ValueError, match="kept_bits"):
        PruneCodec(0.5, kept_bits=9)
    with pytest.raises(ValueError, match="rounding"):
        PruneCodec(0.5, rounding="up")
    x = lognormal(100)
    with pytest.raises(PacketError, match="kept_bits.*receiver is configured"):
        PruneCodec(0.5, kept_bits=6).decode(PruneCodec(0.5, kept_bits=8).encode(x))
    with pytest.raises(PacketError, match="kept_bits"):
        PruneCodec(0.5, kept_bits=8).decode(PruneCodec(0.5, kept_bits=None).encode(x))


def test_forged_counts_rejected():
    # A packet with valid checksums but inconsistent content must still be rejected.
    c = PruneCodec(0.5, kept_bits=None)
    x = lognormal(64, seed=7)
    h, payload = parse_packet(c.encode(x))
    fields = list(PRUNE_PARAMS.unpack(h.params))
    for k, v in [(-2, fields[-2] + 1), (-1, fields[-2] + 1), (-2, 10**15)]:
        forged = list(fields)
        forged[k] = v
        p = build_packet(c.codec_id, h.src_dtype, h.shape, PRUNE_PARAMS.pack(*forged), payload)
        with pytest.raises(PacketError):
            c.decode(p)
    # flip one bitmap bit and re-checksum: the popcount no longer matches the header
    bad = payload.clone()
    bad[0] ^= 1
    with pytest.raises(PacketError, match="bitmaps"):
        c.decode(build_packet(c.codec_id, h.src_dtype, h.shape, h.params, bad))
