"""FP codec: exact agreement with numerics.fp.quantize, sizes, split/scale choice, unbiasedness."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradwire.codec import PacketError
from gradwire.codec.fp import DEFAULT_SIGMA_LOG2, FORMAT_PARAMS, FPCodec
from gradwire.codec.header import header_size, parse_packet
from gradwire.numerics.fp import FPFormat, quantize
from gradwire.numerics.fp_error import optimal_format, optimal_scale_exp
from gradwire.numerics.lognormal import LognormalFit, fit_lognormal, optimal_split

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def lognormal(shape, sigma_ln=2.0, mu_ln=-4.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (sign * torch.exp(mu_ln + sigma_ln * torch.randn(shape, generator=g))).to(dtype)


def sent_format(packet):
    h, _ = parse_packet(packet)
    e, m, _, _, _, scale_exp = FORMAT_PARAMS.unpack(h.params)
    return FPFormat(e, m), scale_exp


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def auto_exp_bits(bits, sigma_log2, rounding):
    """The documented automatic split: optimal_format at sigma rounded to 1/32 binade, mu = 0."""
    return optimal_format(bits, 0.0, max(1 / 16, round(sigma_log2 * 32) / 32), rounding)[0].exp_bits


def capped(fmt, opt, amax):
    """min(optimal, floor(log2(max_value / amax))), computed independently of the codec."""
    return min(opt, math.floor(math.log2(fmt.max_value / amax)))


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_numerics_reference(bits, rounding, dtype):
    x = lognormal((7, 33), seed=bits, dtype=dtype)
    fit = fit_lognormal(x)
    amax = float(x.float().abs().max())
    # default: optimal_format split, analytic optimal scale capped at amax
    c = FPCodec(bits, rounding=rounding)
    p = c.encode(x, seed=123)
    fmt, scale_exp = sent_format(p)
    assert fmt.exp_bits == auto_exp_bits(bits, fit.sigma_log2, rounding)
    assert scale_exp == capped(fmt, optimal_scale_exp(fmt, fit.mu_log2, fit.sigma_log2, rounding), amax)
    same(c.decode(p), quantize(x, fmt, rounding, scale_exp=scale_exp, seed=123))
    same(c.decode(p, dtype=torch.float32), quantize(x.float(), fmt, rounding, scale_exp=scale_exp, seed=123))
    assert p.numel() == c.packed_size(x.shape, dtype) == header_size((7, 33), FORMAT_PARAMS.size) + math.ceil(231 * bits / 8)
    # the paper's choices: Eq. 4 split for the fitted sigma, uncapped analytic optimal scale
    c = FPCodec(bits, rounding=rounding, scale="optimal", split="eq4")
    p = c.encode(x, seed=123)
    fmt, scale_exp = sent_format(p)
    assert (fmt.exp_bits, fmt.man_bits) == optimal_split(bits, fit.sigma_log2)
    assert scale_exp == optimal_scale_exp(fmt, fit.mu_log2, fit.sigma_log2, rounding)
    same(c.decode(p), quantize(x, fmt, rounding, scale_exp=scale_exp, seed=123))


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 7), max_size=4), dtype=st.sampled_from(DTYPES), bits=st.integers(2, 8),
       data=st.data(), rounding=st.sampled_from(["nearest", "stochastic"]), seed=st.integers(0, 2**32 - 1),
       sigma=st.floats(0.1, 5.0), mu=st.floats(-20, 5))
def test_property_round_trip(shape, dtype, bits, data, rounding, seed, sigma, mu):
    exp_bits = data.draw(st.one_of(st.none(), st.integers(1, min(7, bits - 1))))
    x = lognormal(shape, sigma_ln=sigma, mu_ln=mu, seed=seed % 1000, dtype=dtype)
    c = FPCodec(bits, exp_bits=exp_bits, rounding=rounding)
    p = c.encode(x, seed=seed)
    assert p.numel() == c.packed_size(shape, dtype)
    fmt, scale_exp = sent_format(p)
    if exp_bits is not None:
        assert fmt.exp_bits == exp_bits
    y = c.decode(p)
    assert y.shape == x.shape and y.dtype == dtype
    same(y, quantize(x, fmt, rounding, scale_exp=scale_exp, seed=seed))


def test_fit_argument_drives_the_choice():
    x = lognormal(1000, seed=1)
    fit = LognormalFit(mu_log2=-30.0, sigma_log2=1.0, zero_fraction=0.0, nonfinite_count=0, numel=1000)
    c = FPCodec(6, scale="optimal", split="eq4")
    fmt, scale_exp = sent_format(c.encode(x, fit=fit))
    assert (fmt.exp_bits, fmt.man_bits) == optimal_split(6, 1.0)
    assert scale_exp == optimal_scale_exp(fmt, -30.0, 1.0, "stochastic")
    # default: the fit picks the split and the uncapped optimum; x's amax caps it (here it binds)
    fmt, scale_exp = sent_format(FPCodec(6).encode(x, fit=fit))
    assert fmt.exp_bits == auto_exp_bits(6, 1.0, "stochastic")
    opt = optimal_scale_exp(fmt, -30.0, 1.0, "stochastic")
    assert scale_exp == capped(fmt, opt, float(x.abs().max())) < opt
    # an unusable fit (no finite nonzero entries seen) falls back to fitting x
    bad = LognormalFit(math.nan, math.nan, 1.0, 0, 10)
    assert sent_format(c.encode(x, fit=bad)) == sent_format(c.encode(x))


def test_degenerate_tensors():
    c = FPCodec(6)
    for x in [torch.zeros(()), torch.zeros(0), torch.zeros(3, 0, 2), torch.zeros(5), torch.full((4,), math.nan)]:
        p = c.encode(x)
        fmt, scale_exp = sent_format(p)
        assert scale_exp == 0 and fmt.exp_bits == auto_exp_bits(6, DEFAULT_SIGMA_LOG2, "stochastic")
        same(c.decode(p), quantize(x, fmt, "stochastic", scale_exp=0))


def test_constant_magnitude_tensors():
    # sigma = 0 is floored (the analytic functions need sigma > 0): the scale still centres mu
    for x in [torch.tensor(0.37), torch.full((9,), -2.0e-5), torch.tensor([3.0, -3.0])]:
        c = FPCodec(4)
        p = c.encode(x)
        fmt, scale_exp = sent_format(p)
        opt = optimal_scale_exp(fmt, fit_lognormal(x).mu_log2, 1 / 16, "stochastic")
        assert scale_exp == capped(fmt, opt, float(x.abs().max()))
        y = c.decode(p)
        same(y, quantize(x, fmt, "stochastic", scale_exp=scale_exp))
        assert (y == 0).sum() == 0  # no flush to zero


def test_stochastic_rounding_unbiased_through_the_codec():
    # Eight values repeated R times; a fixed fit pins format and scale, counters differ per repeat.
    fit = LognormalFit(mu_log2=0.0, sigma_log2=2.0, zero_fraction=0.0, nonfinite_count=0, numel=1)
    vals = torch.tensor([0.013, -0.27, 0.61, -1.3, 2.9, -5.1, 9.7, 0.0007])
    R = 4096
    c = FPCodec(5, rounding="stochastic")
    p = c.encode(vals.repeat_interleave(R), seed=8, fit=fit)
    fmt, scale_exp = sent_format(p)
    y = c.decode(p).reshape(8, R).double()
    # bracketing grid points lo <= v <= hi (grid scaled by 2**-scale_exp); Var = (hi - v)(v - lo)
    grid = torch.tensor(fmt.grid(), dtype=torch.float64) * 2.0**-scale_exp
    v = vals.double().abs()
    assert (v < grid[-1]).all()  # no saturation in this test
    hi = grid[torch.searchsorted(grid, v)]
    lo = grid[torch.searchsorted(grid, v, right=True) - 1]
    var = (hi - v) * (v - lo)
    tol = 6 * torch.sqrt(var / R) + 2.0**-24 * (hi - lo)  # 6 SE + the 24-bit resolution of u
    assert ((y.mean(1) - vals.double()).abs() <= tol).all()
    assert (var > 0).sum() >= 6  # most values really fall between grid points


def test_nonfinite_arrive_nonfinite():
    x = lognormal(100, seed=2)
    x[[0, 50, 99]] = torch.tensor([math.nan, math.inf, -math.inf])
    for bits in (4, 6, 8):
        y = FPCodec(bits).decode(FPCodec(bits).encode(x))
        assert torch.isnan(y[[0, 50, 99]]).all()
        assert torch.isfinite(y[1:50]).all()


def test_header_overhead_below_one_percent_at_64k():
    for bits in (4, 6, 8):
        c = FPCodec(bits)
        for shape in [(65536,), (256, 256), (16, 64, 64), (2, 2, 128, 128)]:
            size = c.packed_size(shape, torch.bfloat16)
            payload = 65536 * bits // 8
            assert (size - payload) / size < 0.01
    assert FPCodec(6).packed_size((4, 1024), torch.float32) - 4 * 1024 * 6 // 8 == header_size((4, 1024), 8) == 24 + 1 + 2 + 8 + 4


def test_receiver_checks():
    x = lognormal(64, seed=3)
    # a bits-only receiver accepts any split of its width
    p = FPCodec(6, exp_bits=2).encode(x)
    same(FPCodec(6).decode(p), FPCodec(6, exp_bits=2).decode(p))
    with pytest.raises(PacketError, match=r"mismatch on \['bits'\].*'bits': 5.*'bits': 6"):
        FPCodec(6).decode(FPCodec(5).encode(x))
    with pytest.raises(PacketError, match="exp_bits"):
        FPCodec(6, exp_bits=3).decode(p)
    with pytest.raises(PacketError, match="rounding"):
        FPCodec(6, rounding="nearest").decode(FPCodec(6).encode(x))


def test_bad_config_and_input():
    for kw in [dict(bits=9), dict(bits=1), dict(bits=6, exp_bits=6), dict(bits=6, exp_bits=0), dict(bits=6.0)]:
        with pytest.raises(ValueError, match="bits"):
            FPCodec(**kw)
    with pytest.raises(ValueError, match="rounding"):
        FPCodec(6, rounding="floor")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        FPCodec(6).encode(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        FPCodec(6).encode(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        FPCodec(6).decode(FPCodec(6).encode(torch.ones(2)), dtype=torch.int8)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_amax_scale_never_saturates(bits):
    x = lognormal(4000, sigma_ln=3.0, seed=bits)
    c = FPCodec(bits, scale="amax")
    p = c.encode(x, seed=1)
    fmt, scale_exp = sent_format(p)
    amax = float(x.abs().max())
    # the largest power of two that keeps amax within max_value
    assert amax * 2.0**scale_exp <= fmt.max_value < amax * 2.0 ** (scale_exp + 1)
    same(c.decode(p), quantize(x, fmt, "stochastic", scale_exp=scale_exp, seed=1))
    # a receiver does not care how the sender chose its scale
    same(FPCodec(bits).decode(p), c.decode(p))
    with pytest.raises(ValueError, match="scale"):
        FPCodec(bits, scale="max")
