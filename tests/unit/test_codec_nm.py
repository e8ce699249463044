"""N:M codec: exact agreement with numerics.nm, sizes, unbiasedness of MVUE through the wire."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradwire.codec import PacketError
from gradwire.codec.header import header_size, parse_packet
from gradwire.codec.nm import NM_PARAMS, NMCodec
from gradwire.numerics import nm
from gradwire.numerics.fp import FPFormat, decode_codes, encode_codes
from gradwire.numerics.rng import derive_seed

PATTERNS = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx"), (2, 4, "greedy"), (3, 8, "greedy"),
            (8, 16, "greedy")]


def data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.exp(1.5 * torch.randn(shape, generator=g))).to(dtype)


def reference(c: NMCodec, x, seed, dtype=None):
    """Composed from numerics: the select function, value quantisation, scatter_blocks."""
    values, indices = c.select(x, seed)
    if c.value_bits is None:
        values = values.to(x.dtype).float()
    else:
        h, _ = parse_packet(c.encode(x, seed=seed))
        _, _, _, _, _, e, m, _, _, _, scale_exp = NM_PARAMS.unpack(h.params)
        fmt = FPFormat(e, m)
        codes = encode_codes(values, fmt, c.rounding, scale_exp=scale_exp, seed=derive_seed(seed, 1))
        values = decode_codes(codes, fmt, scale_exp=scale_exp)
    return nm.scatter_blocks(values, indices.to(torch.uint8), c.m, x.shape, c.dim, dtype or x.dtype)


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n,m,method", PATTERNS)
@pytest.mark.parametrize("value_bits", [None, 8, 5])
def test_equals_reference(n, m, method, value_bits):
    x = data((3, 5, 32), seed=n * 10 + m)
    c = NMCodec(n, m, method, value_bits=value_bits)
    p = c.encode(x, seed=9)
    assert p.numel() == c.packed_size(x.shape, x.dtype)
    same(c.decode(p), reference(c, x, 9))
    # the dense numerics wrappers agree too, when values are raw
    if value_bits is None and method != "greedy":
        dense = {(1, 2, "mvue"): nm.mvue_12, (2, 4, "mvue"): nm.mvue_24_exact,
                 (2, 4, "mvue_approx"): nm.mvue_24_approx}[(n, m, method)]
        same(c.decode(p), dense(x, seed=9))


@settings(max_examples=40, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), lead=st.lists(st.integers(0, 3), max_size=2), blocks=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), value_bits=st.sampled_from([None, 4, 8]),
       seed=st.integers(0, 2**32 - 1), dim_first=st.booleans(), value_scale=st.sampled_from(["amax", "optimal"]))
def test_property_round_trip(pattern, lead, blocks, dtype, value_bits, seed, dim_first, value_scale):
    n, m, method = pattern
    shape = tuple(lead) + (blocks * m,)
    dim = -1
    if dim_first:
        shape, dim = (blocks * m,) + tuple(lead), 0
    x = data(shape, seed=seed % 997, dtype=dtype)
    c = NMCodec(n, m, method, value_bits=value_bits, dim=dim, value_scale=value_scale)
    p = c.encode(x, seed=seed)
    assert p.numel() == c.packed_size(shape, dtype)
    same(c.decode(p), reference(c, x, seed))
    same(c.decode(p, dtype=torch.float32), reference(c, x, seed, torch.float32))


def test_sizes_exploit_structure():
    shape, hdr = (64, 1024), header_size((64, 1024), NM_PARAMS.size)
    numel = 64 * 1024
    # 2:4: one of C(4,2) = 6 index pairs -> 3 bits per block, + 2 FP8 values = 19 bits / 4 elements
    assert NMCodec(2, 4, value_bits=8).packed_size(shape, torch.float32) == hdr + numel // 4 * 19 // 8
    # 1:2: 1 bit + one FP8 value per pair
    assert NMCodec(1, 2, value_bits=8).packed_size(shape, torch.float32) == hdr + numel // 2 * 9 // 8
    # raw values in the source dtype
    assert NMCodec(2, 4).packed_size(shape, torch.bfloat16) == hdr + numel // 4 * 3 // 8 + numel // 2 * 2
    # 8:16 has C(16,8) = 12870 > 256 sets: per-slot 4-bit indices
    assert NMCodec(8, 16, "greedy").packed_size(shape, torch.float32) == hdr + numel // 16 * 32 // 8 + numel // 2 * 4
    bits = 8 * NMCodec(2, 4, value_bits=8).packed_size(shape, torch.float32) / numel
    assert bits <= 5.0  # the goal for 2:4 with FP8 values


@pytest.mark.parametrize("method", ["mvue", "mvue_approx"])
def test_mvue_unbiased_through_the_codec(method):
    # Blocks in all regimes (a4 <= sum of others; a4 > sum; zeros), each repeated R times along the
    # leading dim: block counters differ, so the repeats are independent draws.
    blocks = torch.tensor([[1.0, -2.0, 3.0, 0.5], [1.0, 1.0, -1.0, 10.0], [0.0, 4.0, 0.0, -1.0], [0.3, 0.0, 0.0, 0.0]])
    R = 4096
    x = blocks.repeat(R, 1)
    c = NMCodec(2, 4, method)
    y = c.decode(c.encode(x, seed=4)).reshape(R, 4, 4).double()
    mean = y.mean(0)
    if method == "mvue":
        var = nm.mvue_24_exact_variance(blocks.abs())  # total variance per block (closed form)
    else:
        var = nm.mvue_24_approx_variance(blocks.abs())
    # per-element variance <= block total; 6 standard errors
    tol = 6 * torch.sqrt(var / R)[:, None] + 1e-6
    assert ((mean - blocks.double()).abs() <= tol).all(), (mean, blocks)


def test_value_scale_amax_keeps_the_largest_value():
    x = data((16, 64), seed=2)
    c = NMCodec(2, 4, value_bits=8)
    h, _ = parse_packet(c.encode(x, seed=1))
    _, _, _, _, _, e, m, _, _, _, scale_exp = NM_PARAMS.unpack(h.params)
    vmax = float(c.select(x, 1)[0].abs().max())
    assert vmax * 2.0**scale_exp <= FPFormat(e, m).max_value < vmax * 2.0 ** (scale_exp + 1)


def test_nonfinite_arrive_nonfinite():
    x = data((4, 8), seed=1)
    x[0, 1], x[2, 6], x[3, 0] = math.nan, math.inf, -math.inf
    for n, m, method in PATTERNS[:4]:
        for vb in (None, 8):
            y = NMCodec(n, m, method, value_bits=vb).decode(NMCodec(n, m, method, value_bits=vb).encode(x))
            assert not torch.isfinite(y[0, 0:2]).all() and not torch.isfinite(y[2, 4:8]).all()
            assert not torch.isfinite(y[3, 0:2]).all()


def test_bad_input_and_config():
    with pytest.raises(ValueError, match="divisible"):
        NMCodec(2, 4).encode(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="0-d"):
        NMCodec(2, 4).encode(torch.tensor(1.0))
    with pytest.raises(ValueError, match="divisible"):
        NMCodec(2, 4).packed_size((3, 6), torch.float32)
    with pytest.raises(ValueError, match="mvue_approx"):
        NMCodec(1, 2, "mvue_approx")
    with pytest.raises(ValueError, match="method"):
        NMCodec(2, 4, "random")
    with pytest.raises(ValueError, match="n must be"):
        NMCodec(4, 4, "greedy")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        NMCodec(2, 4).encode(torch.zeros(4, dtype=torch.float64))
    x = data((2, 8))
    with pytest.raises(PacketError, match=r"mismatch on \['n', 'm'\].*'n': 1.*'n': 2"):
        NMCodec(2, 4).decode(NMCodec(1, 2).encode(x))
    with pytest.raises(PacketError, match="value_bits"):
        NMCodec(2, 4, value_bits=8).decode(NMCodec(2, 4).encode(x))
    with pytest.raises(PacketError, match="dim"):
        NMCodec(2, 4, dim=0).decode(NMCodec(2, 4, dim=1).encode(data((8, 8))))
