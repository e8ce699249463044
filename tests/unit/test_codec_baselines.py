"""Baseline codecs: identity, bf16, FP8 E4M3/E5M2 with per-tensor amax scaling."""
import math

import pytest
import torch

from gradwire.codec import BF16Codec, FP8E4M3Codec, FP8E5M2Codec, IdentityCodec, PacketError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7, 5), (2, 3, 4)]


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_is_bit_exact(shape, dtype):
    x = _data(shape, dtype)
    if x.numel() > 2:
        x.view(-1)[0], x.view(-1)[1] = math.nan, -math.inf
    c = IdentityCodec()
    p = c.encode(x)
    assert p.dtype == torch.uint8 and p.dim() == 1 and p.numel() == c.packed_size(shape, dtype)
    y = c.decode(p)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8) if y.dim() else y.reshape(1).view(torch.uint8),
                       x.view(torch.uint8) if x.dim() else x.reshape(1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_equals_cast(shape, dtype):
    x = _data(shape, dtype, 1)
    c = BF16Codec()
    p = c.encode(x)
    assert p.numel() == c.packed_size(shape, dtype)
    torch.testing.assert_close(c.decode(p), x.to(torch.bfloat16).to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(c.decode(p, dtype=torch.float32), x.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [FP8E4M3Codec, FP8E5M2Codec])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_matches_formula(cls, shape, dtype):
    x = _data(shape, dtype, 2)
    c = cls()
    p = c.encode(x)
    assert p.numel() == c.packed_size(shape, dtype)
    y = c.decode(p, dtype=torch.float32)
    s = c.scale_for(x)
    torch.testing.assert_close(y, c.quantize(x, s).float() / s, rtol=0, atol=0)
    if x.numel():
        # Independent check: amax maps onto fp8 max; every value is within half an ulp of
        # relative error 2**-(man_bits+1) where it is a normal number of the scaled format.
        fmax = torch.finfo(c.fp8_dtype).max
        xf = x.float()
        assert float((xf.abs().max() * s)) == pytest.approx(fmax, rel=1e-6)
        man = 3 if cls is FP8E4M3Codec else 2
        normal = xf.abs() * s >= torch.finfo(c.fp8_dtype).smallest_normal
        rel = ((y - xf).abs() / xf.abs())[normal]
        assert float(rel.max()) <= 2.0 ** -(man + 1) * (1 + 1e-6)


@pytest.mark.parametrize("cls", [FP8E4M3Codec, FP8E5M2Codec, BF16Codec, IdentityCodec])
def test_nonfinite_arrive_nonfinite(cls):
    x = torch.tensor([1.0, math.inf, -math.inf, math.nan, -3.0, 1e-3])
    y = cls().decode(cls().encode(x))
    assert not torch.isfinite(y[1:4]).any()
    assert torch.isfinite(y[[0, 4, 5]]).all()
    if cls is not FP8E4M3Codec:  # e4m3fn has no infinity: inf arrives as NaN
        assert y[1] == math.inf and y[2] == -math.inf


def test_fp8_degenerate_scales():
    c = FP8E4M3Codec()
    assert c.scale_for(torch.zeros(5)) == 1.0
    assert c.scale_for(torch.tensor([math.nan, math.inf])) == 1.0
    tiny = torch.tensor([1e-44, -1e-45])  # 448 / 1e-44 overflows float32: the scale is capped
    s = c.scale_for(tiny)
    assert math.isfinite(s)
    assert torch.isfinite(c.decode(c.encode(tiny))).all()


def test_bad_input_and_mismatch():
    c = FP8E4M3Codec()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        c.encode(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        c.encode(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        c.encode([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        c.decode(c.encode(torch.ones(3)), dtype=torch.int32)
    with pytest.raises(PacketError, match="codec_id"):
        FP8E5M2Codec().decode(c.encode(torch.ones(3)))
    with pytest.raises(PacketError, match="codec_id"):
        IdentityCodec().decode(BF16Codec().encode(torch.ones(3)))


def test_cast_codecs_send_one_nan_pattern():
    """Packets do not depend on the NaN bits a cast happens to write (CPU and CUDA casts differ):
    every NaN crosses as the positive quiet NaN of the wire dtype."""
    from gradwire.codec import build_codec

    a = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    b = a.clone()
    b.view(torch.int32)[2] = -4194303  # 0xFFC00001: a negative NaN with a payload
    for cfg in ({"name": "bf16"}, {"name": "nm", "n": 1, "m": 2}, {"name": "nm", "n": 2, "m": 4}):
        codec = build_codec(cfg)
        x16 = a.to(torch.float16) if cfg["name"] == "nm" else a
        y16 = b.to(torch.float16) if cfg["name"] == "nm" else b
        assert torch.equal(codec.encode(x16, seed=1), codec.encode(y16, seed=1)), cfg
