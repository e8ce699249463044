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


# ---- positions: bitmap or Rice-coded gaps (module doc, "Positions") ----

from gradwire.codec.prune import FLAG_RICE, K_SHIFT, MAX_RICE_K, rice_decode, rice_encode, rice_gaps, rice_size  # noqa: E402


def flag_of(p):
    return PRUNE_PARAMS.unpack(parse_packet(p)[0].params)[1]


def masked(mask, seed=0):
    """A float tensor whose nonzeros are exactly ``mask``: with sparsity 0 (threshold 0) the
    codec prunes nothing, so the packet's positions are the mask's."""
    g = torch.Generator().manual_seed(seed)
    v = torch.exp(torch.randn(mask.shape, generator=g)) * torch.where(torch.rand(mask.shape, generator=g) < 0.5, -1.0, 1.0)
    return torch.where(mask, v, torch.zeros(()))


@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=300), k=st.integers(0, MAX_RICE_K), lead=st.integers(0, 2000))
def test_rice_streams_round_trip_for_every_k(bits, k, lead):
    # any k codes the gaps correctly; only the size depends on k (lead: a long first gap)
    mask = torch.tensor([False] * lead + bits, dtype=torch.bool)
    gaps = rice_gaps(mask)
    assert gaps.numel() == int(mask.sum()) + 1 and int(gaps.sum()) == mask.numel() - int(mask.sum())
    qbits = int((gaps >> k).sum()) + gaps.numel()
    stream = rice_encode(gaps, k, qbits)
    qbytes = (qbits + 7) // 8
    assert stream.numel() == qbytes + ((gaps.numel() * k + 7) // 8)
    back = rice_decode(stream[:qbytes], stream[qbytes:], gaps.numel(), k, int(gaps.sum()))
    assert torch.equal(back, gaps)
    pos = torch.cumsum(back[:-1] + 1, 0) - 1
    assert torch.equal(pos, torch.nonzero(mask).reshape(-1))
    # rice_size is the exact minimum over k of these stream sizes
    size, best_k, best_q = rice_size(gaps)
    assert size <= stream.numel() and best_q == int((gaps >> best_k).sum()) + gaps.numel()


@pytest.mark.parametrize("positions", ["bitmap", "rice", "auto"])
@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 7), max_size=3), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       s=st.floats(0.0, 0.99), kept_bits=st.sampled_from([None, 4, 8]), seed=st.integers(0, 2**32 - 1))
def test_property_round_trip_each_encoding(positions, shape, dtype, s, kept_bits, seed):
    g = torch.Generator().manual_seed(seed % 1000)
    x = (torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))).to(dtype)
    c = PruneCodec(s, kept_bits=kept_bits, positions=positions)
    p = c.encode(x, seed=seed)
    if positions != "auto":
        assert bool(flag_of(p) & FLAG_RICE) == (positions == "rice")
    assert p.numel() <= c.max_packed_size(shape, dtype)
    same(c.decode(p), reference(c, x, seed))
    # any receiver decodes either encoding: positions is the sender's choice only
    same(PruneCodec(s, kept_bits=kept_bits, positions="bitmap").decode(p), reference(c, x, seed))


MASKS = {
    "empty": torch.zeros(0, dtype=torch.bool),
    "0-d zero": torch.zeros((), dtype=torch.bool),
    "0-d nonzero": torch.ones((), dtype=torch.bool),
    "all zero": torch.zeros(1000, dtype=torch.bool),
    "all kept": torch.ones(257, dtype=torch.bool),
    "one nonzero": torch.arange(999) == 321,
    "first only": torch.arange(999) == 0,
    "last only": torch.arange(5000) == 4999,
    "first and last": (torch.arange(70) == 0) | (torch.arange(70) == 69),
    "huge gaps": torch.arange(131080) % 65537 == 3,  # q >> 1 even at k = 8
}


@pytest.mark.parametrize("positions", ["bitmap", "rice", "auto"])
@pytest.mark.parametrize("name", list(MASKS))
def test_edge_position_patterns(name, positions):
    mask = MASKS[name]
    x = masked(mask)
    for kept_bits in (8, None):
        c = PruneCodec(0.0, kept_bits=kept_bits, positions=positions)
        p = c.encode(x, seed=1)
        y = c.decode(p)
        assert y.shape == x.shape
        assert torch.equal(y != 0, mask)
        same(y, reference(c, x, 1))


def test_chosen_encoding_is_the_smaller_and_never_beats_nothing():
    # auto == min(bitmap, rice) byte for byte in size, and never larger than the bitmap
    for s, sigma, n in [(0.0, 2.0, 4096), (0.3, 2.0, 4096), (0.8, 2.0, 4096), (0.9, 3.0, 4096), (0.99, 2.0, 4096),
                        (0.8, 2.0, 16), (0.9, 2.0, 3)]:
        x = lognormal(n, sigma_ln=sigma, seed=n)
        size = {pos: PruneCodec(s, positions=pos).encode(x, seed=4).numel() for pos in ("auto", "bitmap", "rice")}
        assert size["auto"] == min(size["bitmap"], size["rice"]) <= size["bitmap"], (s, n, size)
    # and the choice matters where the issue needs it: density 0.2 and 0.1 go to Rice
    x = lognormal(1 << 14, seed=8)
    for s in (0.8, 0.9):
        assert flag_of(PruneCodec(s, positions="auto").encode(x)) & FLAG_RICE
        assert flag_of(PruneCodec(s).encode(x)) & FLAG_RICE  # the default is "auto"
    assert not flag_of(PruneCodec(0.2, positions="auto").encode(x)) & FLAG_RICE  # density 0.8: bitmap wins


def test_rice_size_matches_analytic_model():
    # iid positions at density d: the gaps before each nonzero are Geometric(d) (P(g >= j) =
    # (1-d)**j), so q = g >> k is geometric too, with E[q] = t / (1 - t), t = (1-d)**(2**k), and
    # Var[q] = t / (1 - t)**2. Monte Carlo over n = 2**16 elements, 6 standard errors of the mean.
    n = 1 << 16
    g = torch.Generator().manual_seed(0)
    for d in (0.05, 0.1, 0.2, 0.3):
        mask = torch.rand(n, generator=g) < d
        gaps = rice_gaps(mask)[:-1]  # the closing gap is truncated by n, not geometric
        for k in range(6):
            t = (1 - d) ** (2**k)
            q = (gaps >> k).double()
            se = math.sqrt(t) / (1 - t) / math.sqrt(q.numel())
            assert abs(float(q.mean()) - t / (1 - t)) <= 6 * se, (d, k)
        # The best Rice code is close to the positions' entropy H(d) (measured: 0.003..0.017
        # bits/element above it at these d); it cannot beat H(d) beyond the sampling error of the
        # empirical code length (std ~ sqrt(n d (1-d)) log2((1-d)/d) / n < 0.004, 6 se < 0.025).
        size, _, _ = rice_size(rice_gaps(mask))
        h = -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
        assert h - 0.025 <= size * 8 / n <= h + 0.04, (d, size * 8 / n, h)


@pytest.mark.parametrize("sigma", [2.0, 3.0, 4.0])
def test_compact_sizes_meet_goals_on_heavier_tails(sigma):
    # bench/codec_bytes.py's data: 65536 elements, mu_ln = -8, seed = sigma
    g = torch.Generator().manual_seed(int(sigma))
    n = 1 << 16
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = (sign * torch.exp(-8.0 + sigma * torch.randn(n, generator=g))).reshape(256, -1)
    bits = {s: PruneCodec(s, kept_bits=8, positions="auto").encode(x, seed=0).numel() * 8 / n for s in (0.8, 0.9)}
    assert bits[0.8] <= 2.1 and bits[0.9] <= 1.5, bits


# Packets written before Rice positions existed (git 6746b10; x below, seed 3): still decoded, and a
# bitmap packet is written byte for byte as before.
OLD_X = [0.5, -0.01, 3.0, 0.0, -7.5, 0.2, 0.03, -1.25, 0.0, 0.6]
OLD_PACKETS = [
    (8, 0.5, "4757504b01060001011d3a000800000000000000ac1b07510a7bddf83e01040307000101060005000000000000000000"
             "000000000000e26c8d769502006074ffea62", [0.5, 0.0, 3.0, 0.0, -7.5, 0.0, 0.0, -1.25, 0.0, 0.625]),
    (None, 0.5, "4757504b01060001011d3a001700000000000000c7eb24e00a7bddf83e0000000000000000000500000000000000000000"
                "0000000000a45bf0839502000000003f000040400000f0c00000a0bf9a99193f",
     [0.5, 0.0, 3.0, 0.0, -7.5, 0.0, 0.0, -1.25, 0.0, 0.6]),
]


@pytest.mark.parametrize("kept_bits,s,hexpacket,expected", OLD_PACKETS)
def test_old_bitmap_packets_still_decode(kept_bits, s, hexpacket, expected):
    old = torch.tensor(list(bytes.fromhex(hexpacket)), dtype=torch.uint8)
    c = PruneCodec(s, kept_bits=kept_bits, positions="bitmap")
    same(c.decode(old), torch.tensor(expected))
    assert torch.equal(c.encode(torch.tensor(OLD_X), seed=3), old)


def forge(c, p, params=None, payload=None, shape=None):
    h, pl = parse_packet(p)
    return build_packet(c.codec_id, h.src_dtype, h.shape if shape is None else shape,
                        h.params if params is None else params, pl if payload is None else payload)


def test_forged_rice_packets_rejected():
    c = PruneCodec(0.8, positions="rice")
    x = lognormal(500, seed=9)
    p = c.encode(x, seed=2)
    h, payload = parse_packet(p)
    f = list(PRUNE_PARAMS.unpack(h.params))
    k = f[1] >> K_SHIFT
    assert f[1] & FLAG_RICE and k > 0
    cases = {
        "bad flag bits": (f[1] | 4, None, None),
        "k too large": ((f[1] & 15) | (9 << K_SHIFT), None, None),
        "k off by one": (f[1] + (1 << K_SHIFT), None, None),
        "rice flag cleared": (f[1] & ~FLAG_RICE, None, None),
        "payload truncated": (None, payload[:-1], None),
        "payload extended": (None, torch.cat([payload, torch.zeros(1, dtype=torch.uint8)]), None),
        "numel larger": (None, None, (501,)),
        "numel smaller": (None, None, (499,)),
        "huge numel": (None, None, (2**40, 2**20)),
    }
    for name, (flag, pl, shape) in cases.items():
        params = None if flag is None else PRUNE_PARAMS.pack(f[0], flag, *f[2:])
        with pytest.raises(PacketError):
            c.decode(forge(c, p, params, pl, shape))
    with pytest.raises(PacketError, match="rice streams"):  # before allocating 2**60 elements
        c.decode(forge(c, p, shape=(2**40, 2**20)))
    # nnz forged up / down: the code count no longer matches (or the sections no longer fit)
    for nnz in (f[-2] + 1, f[-2] - 1):
        with pytest.raises(PacketError):
            c.decode(forge(c, p, PRUNE_PARAMS.pack(*f[:-2], nnz, min(f[-1], nnz))))


def test_rice_positions_past_numel_rejected():
    # A well-formed Rice stream whose gaps sum to more than numel - nnz: one nonzero, coded at
    # position 9 of a 10-element tensor, sent with shape (9,) and a re-built payload.
    c = PruneCodec(0.0, kept_bits=None, positions="rice")
    x = masked(torch.arange(10) == 9)
    p = c.encode(x)
    with pytest.raises(PacketError, match="rice"):
        c.decode(forge(c, p, shape=(9,)))
    # and a zero tensor claiming one more trailing zero than it codes
    p = c.encode(torch.zeros(64))
    with pytest.raises(PacketError, match="rice"):
        c.decode(forge(c, p, shape=(65,)))
