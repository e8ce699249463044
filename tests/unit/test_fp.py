"""Tests of gradwire.numerics.fp: tables, bit-exact rounding, unbiased stochastic rounding, edges."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwire.numerics import rng
from gradwire.numerics.fp import FPFormat, Rounding, decode_codes, encode_codes, quantize

# One intra-op thread (tests/conftest.py): on the shared 2-core CI box, 2 threads made the
# 200k-element quantize calls ~17x slower.
pytestmark = pytest.mark.usefixtures("single_thread")

ALL_FORMATS = [
    FPFormat(e, bits - 1 - e, subnormals=sub)
    for bits in range(2, 9)
    for e in range(1, bits)
    for sub in (True, False)
]
NAN = float("nan")


def _ids(fmts):
    return [f.name for f in fmts]


# ---------------------------------------------------------------- pinned tables (torchao style)
FP4_E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                  NAN, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]  # fmt: skip
_FP6_E3M2_POS = [
    0.0, 0.0625, 0.125, 0.1875,  # subnormals: M * 2**(1 - 3 - 2)
    0.25, 0.3125, 0.375, 0.4375,
    0.5, 0.625, 0.75, 0.875,
    1.0, 1.25, 1.5, 1.75,
    2.0, 2.5, 3.0, 3.5,
    4.0, 5.0, 6.0, 7.0,
    8.0, 10.0, 12.0, 14.0,
    16.0, 20.0, 24.0, 28.0,  # top exponent field is finite (no inf/NaN codes)
]
FP6_E3M2_TABLE = _FP6_E3M2_POS + [NAN] + [-v for v in _FP6_E3M2_POS[1:]]
# 1-3-0 without subnormals: the format of Eq. (2) of paper 001 shifted by the IEEE bias.
FP4_E3M0_NOSUB_TABLE = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0,
                        NAN, -0.25, -0.5, -1.0, -2.0, -4.0, -8.0, -16.0]  # fmt: skip


@pytest.mark.parametrize(
    "fmt,table",
    [(FPFormat(2, 1), FP4_E2M1_TABLE), (FPFormat(3, 2), FP6_E3M2_TABLE),
     (FPFormat(3, 0, subnormals=False), FP4_E3M0_NOSUB_TABLE)],  # fmt: skip
    ids=["fp4_e2m1", "fp6_e3m2", "fp4_e3m0_nosub"],
)
def test_pinned_code_tables(fmt, table):
    expected = torch.tensor(table, dtype=torch.float32)
    torch.testing.assert_close(fmt.code_table(), expected, rtol=0, atol=0, equal_nan=True)
    assert fmt.max_value == max(v for v in table if not math.isnan(v))
    assert fmt.min_positive == min(v for v in table if v > 0)


def test_format_properties_fp8():
    e4m3 = FPFormat(4, 3)
    assert (e4m3.bits, e4m3.bias, e4m3.nonfinite_code, e4m3.max_code) == (8, 7, 0x80, 0x7F)
    assert e4m3.max_value == 480.0 and e4m3.min_normal == 2.0**-6 and e4m3.min_positive == 2.0**-9
    e5m2 = FPFormat(5, 2)
    assert e5m2.max_value == 1.75 * 2**16 and e5m2.min_positive == 2.0**-16
    nosub = FPFormat(5, 2, subnormals=False)
    assert nosub.min_positive == nosub.min_normal == 2.0**-14
    assert FPFormat(4, 3, bias=10).max_value == 480.0 / 8


@pytest.mark.parametrize(
    "kwargs,err",
    [(dict(exp_bits=0, man_bits=3), ValueError), (dict(exp_bits=8, man_bits=0), ValueError),
     (dict(exp_bits=4, man_bits=4), ValueError), (dict(exp_bits=2, man_bits=-1), ValueError),
     (dict(exp_bits=2.0, man_bits=1), TypeError), (dict(exp_bits=2, man_bits=1, bias=0.5), TypeError),
     (dict(exp_bits=7, man_bits=0, bias=-1), ValueError),  # max above float32
     (dict(exp_bits=4, man_bits=3, bias=150), ValueError),  # grid below 2**-149
     (dict(exp_bits=2, man_bits=1, subnormals=1), TypeError)],  # fmt: skip
)
def test_format_validation(kwargs, err):
    with pytest.raises(err):
        FPFormat(**kwargs)


# ---------------------------------------------------------------- every code round-trips
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids(ALL_FORMATS))
def test_all_codes_round_trip(fmt):
    codes = torch.arange(2**fmt.bits, dtype=torch.int32).to(torch.uint8)
    values = decode_codes(codes, fmt)
    torch.testing.assert_close(values, fmt.code_table(), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(values[fmt.nonfinite_code]) and torch.isfinite(values).sum() == 2**fmt.bits - 1
    # Exponent-field-0 codes with M != 0 decode to zero without subnormals (never produced).
    dead = torch.zeros(2**fmt.bits, dtype=torch.bool)
    if not fmt.subnormals:
        m_mask = (1 << fmt.man_bits) - 1
        dead = ((codes.long() & m_mask) != 0) & ((codes.long() & (fmt.max_code ^ m_mask)) == 0)
    expected = torch.where(dead, 0, codes.long()).to(torch.uint8)
    for rounding in Rounding:
        back = encode_codes(values, fmt, rounding, seed=7)
        assert torch.equal(back, expected)
    # Positive codes increase strictly with value (apart from the dead codes), negatives mirror.
    pos = values[: fmt.nonfinite_code][~dead[: fmt.nonfinite_code]]
    assert bool((pos[1:] > pos[:-1]).all())
    assert torch.equal(values[fmt.nonfinite_code + 1 :], -values[1 : fmt.nonfinite_code])


# ---------------------------------------------------------------- independent float64 oracle
def _reference_codes(x32: np.ndarray, fmt: FPFormat, scale_exp: int, u: np.ndarray | None):
    """Brute force over the sorted grid in float64. Every gap of the grid is a power of two and
    x * 2**scale_exp is exact in float64, so frac is exact here too."""
    grid = np.array(fmt.grid())
    code_of = {}
    for c in range(fmt.nonfinite_code):
        code_of.setdefault(float(fmt.code_table()[c]), c)
    grid_codes = np.array([code_of[v] for v in grid])
    y = np.abs(x32.astype(np.float64)) * 2.0**scale_exp
    i = np.clip(np.searchsorted(grid, y, side="right") - 1, 0, len(grid) - 2)
    lo, hi = grid[i], grid[i + 1]
    frac = (y - lo) / (hi - lo)
    if u is None:
        up = (frac > 0.5) | ((frac == 0.5) & (grid_codes[i] % 2 == 1))
    else:
        up = u.astype(np.float64) < frac
    mag = np.where(up, grid_codes[i + 1], grid_codes[i])
    mag = np.where(y >= fmt.max_value, fmt.max_code, mag)
    code = np.where(np.signbit(x32) & (mag != 0), mag | fmt.nonfinite_code, mag)
    return np.where(np.isfinite(x32), code, fmt.nonfinite_code).astype(np.uint8)


def _probe_values(fmt: FPFormat, gen: torch.Generator, n: int = 4000) -> torch.Tensor:
    """Random magnitudes spanning the format's range +-8 binades, plus grid points, exact
    midpoints (ties), float32 subnormals, zeros and non-finite values."""
    lo_e, hi_e = math.log2(fmt.min_positive) - 8, math.log2(fmt.max_value) + 8
    e = torch.rand(n, generator=gen, dtype=torch.float64) * (hi_e - lo_e) + lo_e
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    rand_vals = (sign * torch.exp2(e)).float()
    grid = torch.tensor(fmt.grid(), dtype=torch.float64)
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32: one more mantissa bit than the format
    special = torch.tensor([0.0, -0.0, NAN, float("inf"), -float("inf"), 1e-45, -3e-45, 3.4e38])
    return torch.cat([rand_vals, grid.float(), -grid.float(), mids.float(), -mids.float(), special])


@pytest.mark.parametrize("fmt", ALL_FORMATS + [FPFormat(4, 3, bias=3), FPFormat(2, 3, bias=-2),
                                               FPFormat(3, 2, bias=12, subnormals=False)],
                         ids=_ids(ALL_FORMATS) + ["e4m3_b3", "e2m3_b-2", "e3m2_b12_nosub"])
def test_encode_matches_float64_oracle(fmt):
    gen = torch.Generator().manual_seed(fmt.bits * 100 + fmt.exp_bits * 10 + fmt.subnormals)
    x = _probe_values(fmt, gen)
    for scale_exp in (0, 3, -5):
        xs = x * 2.0**-scale_exp  # so the scaled values probe the same range
        got = encode_codes(xs, fmt, Rounding.NEAREST_EVEN, scale_exp=scale_exp).numpy()
        np.testing.assert_array_equal(got, _reference_codes(xs.numpy(), fmt, scale_exp, None))
        seed, offset = 1234 + scale_exp, 99
        u = rng.uniform_like(seed, xs, offset=offset).numpy()
        got = encode_codes(xs, fmt, "stochastic", scale_exp=scale_exp, seed=seed, offset=offset)
        np.testing.assert_array_equal(got.numpy(), _reference_codes(xs.numpy(), fmt, scale_exp, u))


def test_encode_handles_tiny_fractions_exactly(monkeypatch):
    # Far below min_positive the fraction is below 2**-24: only u == 0 may round up. The real
    # hash gives u == 0 once in 2**24 draws, so substitute the uniforms (0 at even counters,
    # 2**-24 at odd ones) to pin the decision rule "up iff u < frac" at its edge.
    def fake_uniform_like(seed, x, offset=0):
        idx = torch.arange(offset, offset + x.numel()).reshape(x.shape)
        return (idx % 2).to(torch.float32) * 2.0**-24

    monkeypatch.setattr(rng, "uniform_like", fake_uniform_like)
    fmt = FPFormat(4, 3)  # min_positive 2**-9
    # fracs (x / 2**-9): 2**-131 (x a float32 subnormal), 2**-25, 2**-24, 2**-23.
    x = torch.tensor([2.0**-140, 2.0**-140, -(2.0**-140), 2.0**-34,
                      2.0**-33, 2.0**-33, 2.0**-32, 2.0**-32])  # fmt: skip
    codes = encode_codes(x, fmt, Rounding.STOCHASTIC, seed=5)
    assert codes.tolist() == [1, 0, 0x81, 0, 1, 0, 1, 1]


# ---------------------------------------------------------------- torch's float8 casts
@pytest.mark.parametrize(
    "fmt,dtype,limit",
    [(FPFormat(4, 3), torch.float8_e4m3fn, 448.0), (FPFormat(5, 2), torch.float8_e5m2, 57344.0)],
    ids=["e4m3fn", "e5m2"],
)
def test_nearest_even_matches_torch_float8(fmt, dtype, limit):
    gen = torch.Generator().manual_seed(3)
    n = 100_000
    x = (torch.randn(n, generator=gen, dtype=torch.float64)
         * torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 44 - 26)).float()  # fmt: skip
    grid = torch.tensor(fmt.grid(), dtype=torch.float64)
    ties = ((grid[1:] + grid[:-1]) / 2).float()  # all midpoints: ties must go to the even code
    x = torch.cat([x, ties, -ties, grid.float()])
    x = x[x.abs() <= limit]  # beyond, torch saturates/overflows differently (reserved codes)
    ours = quantize(x, fmt)
    theirs = x.to(dtype).float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # Our codes equal torch's bit patterns except that -0 is not ours (it is the NaN code).
    bits = x.to(dtype).view(torch.uint8)
    expected = torch.where(bits == 0x80, 0, bits)
    assert torch.equal(encode_codes(x, fmt), expected)


def test_nearest_even_ties_and_zero_cases():
    fmt = FPFormat(2, 1)  # grid 0, .5, 1, 1.5, 2, 3, 4, 6
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, 0.2500001])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -1.0, 0.5])
    torch.testing.assert_close(quantize(x, fmt), expected, rtol=0, atol=0)
    # m == 0: ties go to the even *code* (1-3-0: codes 3 -> 1.0, 4 -> 2.0, 5 -> 4.0).
    fmt = FPFormat(3, 0)
    torch.testing.assert_close(quantize(torch.tensor([1.5, 3.0, 0.375]), fmt),
                               torch.tensor([2.0, 2.0, 0.5]), rtol=0, atol=0)  # fmt: skip


# ---------------------------------------------------------------- stochastic rounding statistics
@pytest.mark.parametrize("fmt", [FPFormat(4, 3), FPFormat(2, 1), FPFormat(3, 0, subnormals=False)],
                         ids=["e4m3", "e2m1", "e3m0_nosub"])  # fmt: skip
def test_stochastic_rounding_unbiased_and_mean_abs_error(fmt):
    grid = fmt.grid()
    g1 = grid[1]
    values = [g1 * 0.3, g1 * 0.01, g1 * 0.999, grid[1] + (grid[2] - grid[1]) * 0.37,  # low end
              1.0 + 0.1, 1.0 / 3.0, grid[-2] + (grid[-1] - grid[-2]) * 0.8, grid[-1] * 0.9]  # fmt: skip
    n = 50_000
    values = torch.tensor(values, dtype=torch.float32)  # the values actually rounded
    # One call: row k uses counters k*n .. k*n + n-1, so every draw is a fresh uniform.
    qs = quantize(values[:, None].expand(-1, n), fmt, Rounding.STOCHASTIC, seed=11).double()
    for v, q in zip(values.tolist(), qs):
        i = max(j for j in range(len(grid)) if grid[j] <= v)
        lo, hi = grid[i], grid[min(i + 1, len(grid) - 1)]
        assert set(torch.unique(q).tolist()) <= {lo, hi}
        var = (hi - v) * (v - lo)  # Bernoulli variance of Q, per draw
        # Tolerance: 6 standard errors of the mean of n draws, plus the 2**-24 resolution of u
        # (P(up) is frac rounded up to a multiple of 2**-24).
        tol = 6 * math.sqrt(var / n) + (hi - lo) * 2.0**-24
        assert abs(q.mean().item() - v) <= tol, (v, q.mean().item(), tol)
        # Sample variance agrees with (hi - v)(v - lo): 6 SE of a variance of a Bernoulli.
        p = (v - lo) / (hi - lo)
        # s2 = (hi-lo)**2 p^(1-p^) n/(n-1); with d = p^ - p <= 6 SE: |p^(1-p^) - p(1-p)| <=
        # |1-2p| |d| + d**2 (the second-order term matters at p = 1/2).
        d = 6 * math.sqrt(p * (1 - p) / n)
        tol_var = (hi - lo) ** 2 * (abs(1 - 2 * p) * d + d * d) + var / n
        assert abs(q.var().item() - var) <= tol_var
        # E|Q - v| = 2 (hi - v)(v - lo) / (hi - lo), closed form; |Q - v| is two-valued.
        abs_err = (q - v).abs()
        closed = 2 * var / (hi - lo)
        se = math.sqrt(p * (1 - p) * ((hi - v) - (v - lo)) ** 2 / n)
        assert abs(abs_err.mean().item() - closed) <= 6 * se + (hi - lo) * 2.0**-23


def test_stochastic_rounding_counter_semantics():
    fmt = FPFormat(3, 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=gen)
    full = encode_codes(x, fmt, Rounding.STOCHASTIC, seed=42)
    assert torch.equal(full, encode_codes(x, fmt, Rounding.STOCHASTIC, seed=42))  # deterministic
    assert not torch.equal(full, encode_codes(x, fmt, Rounding.STOCHASTIC, seed=43))
    # Chunked encoding with offset = start index reproduces the whole (flat row-major counters).
    chunks = [encode_codes(x[r], fmt, Rounding.STOCHASTIC, seed=42, offset=r * 50) for r in range(6)]
    assert torch.equal(torch.stack(chunks), full)
    # Non-contiguous input: counters follow the logical row-major order, not memory order.
    xt = x.t()
    assert torch.equal(encode_codes(xt, fmt, "stochastic", seed=42),
                       encode_codes(xt.contiguous(), fmt, "stochastic", seed=42))  # fmt: skip


# ---------------------------------------------------------------- edges and bad input
def test_saturation_zero_and_nonfinite():
    fmt = FPFormat(3, 2)  # max 28, nonfinite code 0x20
    x = torch.tensor([28.0, 29.0, 1e30, -1e30, 0.0, -0.0, NAN, float("inf"), -float("inf"), -1e-30])
    for rounding in Rounding:
        codes = encode_codes(x, fmt, rounding, seed=3)
        assert codes.tolist() == [31, 31, 31, 63, 0, 0, 32, 32, 32, 0]
        q = quantize(x, fmt, rounding, seed=3)
        assert q[:4].tolist() == [28.0, 28.0, 28.0, -28.0] and q[4:6].tolist() == [0.0, 0.0]
        assert not torch.signbit(q[5]) and torch.isnan(q[6:9]).all()
    # No finite value ever produces the reserved code, whatever its sign or size.
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(10_000, generator=gen) * torch.exp2(torch.randn(10_000, generator=gen) * 20)
    assert not (encode_codes(y, fmt, "stochastic") == fmt.nonfinite_code).any()


def test_flush_without_subnormals():
    fmt = FPFormat(3, 2, subnormals=False)  # min_normal 0.25, no values in between
    x = torch.tensor([0.124, 0.125, 0.126, 0.2, 0.25, -0.2])
    torch.testing.assert_close(quantize(x, fmt), torch.tensor([0.0, 0.0, 0.25, 0.25, 0.25, -0.25]),
                               rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_input_dtypes(dtype):
    fmt = FPFormat(4, 3)
    gen = torch.Generator().manual_seed(2)
    x32 = (torch.randn(1000, generator=gen) * 10).to(dtype).float()  # values exact in dtype
    x = x32.to(dtype)
    assert torch.equal(encode_codes(x, fmt), encode_codes(x32, fmt))
    q = quantize(x, fmt, "stochastic", seed=9)
    assert q.dtype == dtype
    assert torch.equal(q.float(), quantize(x32, fmt, "stochastic", seed=9))


def test_float64_beyond_float32_range_saturates():
    fmt = FPFormat(5, 2)
    x = torch.tensor([1e300, -1e300, float("inf")], dtype=torch.float64)
    assert encode_codes(x, fmt).tolist() == [127, 255, 128]


def test_chunked_encoding_matches_single_pass(monkeypatch):
    # Large inputs are encoded in chunks; counters must continue across chunk boundaries.
    import gradwire.numerics.fp as fp_module

    fmt = FPFormat(3, 2)
    x = torch.randn(7, 301, generator=torch.Generator().manual_seed(8))
    whole = {r: encode_codes(x, fmt, r, seed=4, offset=11) for r in Rounding}
    monkeypatch.setattr(fp_module, "_CHUNK", 256)
    for r in Rounding:
        assert torch.equal(encode_codes(x, fmt, r, seed=4, offset=11), whole[r])


def test_numpy_integer_arguments():
    fmt = FPFormat(np.int64(4), np.int32(3))
    assert fmt == FPFormat(4, 3) and type(fmt.exp_bits) is int and hash(fmt) == hash(FPFormat(4, 3))
    x = torch.linspace(-3, 3, 101)
    assert torch.equal(encode_codes(x, fmt, "stochastic", scale_exp=np.int64(2), offset=np.int64(5)),
                       encode_codes(x, fmt, "stochastic", scale_exp=2, offset=5))  # fmt: skip


def test_zero_dim_and_empty():
    fmt = FPFormat(2, 1)
    c = encode_codes(torch.tensor(1.4), fmt)
    assert c.shape == () and c.dtype == torch.uint8 and int(c) == 3
    assert quantize(torch.tensor(1.4), fmt).item() == 1.5
    e = torch.empty(0, 3)
    assert encode_codes(e, fmt, "stochastic").shape == (0, 3)
    assert decode_codes(torch.empty(0, 3, dtype=torch.uint8), fmt).shape == (0, 3)
    assert quantize(e, fmt).shape == (0, 3)


def test_scale_exp_is_exact_power_of_two():
    fmt = FPFormat(4, 3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5000, generator=gen) * 1e-3
    for s in (-3, 0, 5, 12):
        codes = encode_codes(x, fmt, scale_exp=s)
        assert torch.equal(codes, encode_codes(x * 2.0**s, fmt))
        torch.testing.assert_close(decode_codes(codes, fmt, scale_exp=s),
                                   decode_codes(codes, fmt) * 2.0**-s, rtol=0, atol=0)  # fmt: skip
    # Scales outside the float32 range of 2**s are still exact: 2**-140 is a float32 subnormal.
    tiny = torch.tensor([2.0**-140, 3 * 2.0**-141, -2.0**-149])
    assert quantize(tiny, fmt, scale_exp=140).tolist() == tiny.tolist()
    assert encode_codes(tiny, fmt, scale_exp=149).tolist() == [0x7F, 0x7F, 0xB8]  # 2**9, 3*2**8 saturate; -1.0
    assert encode_codes(torch.tensor([1.0, -1.0]), fmt, scale_exp=300).tolist() == [0x7F, 0xFF]
    assert encode_codes(torch.tensor([1e30]), fmt, scale_exp=-300).tolist() == [0]
    assert encode_codes(torch.tensor([1e30]), fmt, scale_exp=-10**9).tolist() == [0]  # clamped
    assert decode_codes(torch.tensor([0x38], dtype=torch.uint8), fmt, scale_exp=-200).item() == math.inf


@pytest.mark.parametrize(
    "call,err",
    [(lambda: encode_codes(torch.arange(4), FPFormat(2, 1)), TypeError),
     (lambda: encode_codes(torch.ones(2, dtype=torch.bool), FPFormat(2, 1)), TypeError),
     (lambda: encode_codes(torch.ones(2, dtype=torch.complex64), FPFormat(2, 1)), TypeError),
     (lambda: encode_codes([1.0], FPFormat(2, 1)), TypeError),
     (lambda: encode_codes(torch.ones(2), (2, 1)), TypeError),
     (lambda: encode_codes(torch.ones(2), FPFormat(2, 1), "up"), ValueError),
     (lambda: encode_codes(torch.ones(2), FPFormat(2, 1), scale_exp=1.5), TypeError),
     (lambda: encode_codes(torch.ones(2), FPFormat(2, 1), seed=-1), ValueError),
     (lambda: encode_codes(torch.ones(2), FPFormat(2, 1), offset=-1), ValueError),
     (lambda: decode_codes(torch.ones(2), FPFormat(2, 1)), TypeError),
     (lambda: decode_codes(torch.tensor([16], dtype=torch.uint8), FPFormat(2, 1)), ValueError)],  # fmt: skip
)
def test_bad_input_errors(call, err):
    with pytest.raises(err):
        call()
