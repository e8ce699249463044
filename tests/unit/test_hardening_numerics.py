"""Wide-range and near-overflow gradients (issue 16, findings 3 and 4): every codec encodes any
finite tensor of float32/bf16/fp16 (log2 spreads up to the dtype's full range, values at its max
and min normal) without an exception, and a finite input element never decodes to inf. Values
beyond the output dtype's range saturate at its largest finite value: that bias is only at the
saturation edge (checked against the unsaturated reference)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwire.codec import build_codec
from gradwire.numerics import fp_error
from gradwire.numerics.fp import FPFormat, decode_codes, encode_codes, saturating_cast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CODECS = [
    {"name": "fp", "bits": 3}, {"name": "fp", "bits": 4}, {"name": "fp", "bits": 6}, {"name": "fp", "bits": 8},
    {"name": "fp", "bits": 6, "split": "eq4"}, {"name": "fp", "bits": 6, "rounding": "nearest"},
    {"name": "fp", "bits": 6, "scale": "optimal"},
    {"name": "prune", "sparsity": 0.5}, {"name": "prune", "sparsity": 0.9, "kept_bits": None},
    {"name": "nm", "n": 1, "m": 2}, {"name": "nm", "n": 2, "m": 4, "value_bits": 6},
    {"name": "nm", "n": 2, "m": 4, "method": "mvue_approx", "value_bits": 8},
    {"name": "bf16"}, {"name": "fp8_e4m3"}, {"name": "fp8_e5m2"},
]
IDS = [f"{c['name']}{i}" for i, c in enumerate(CODECS)]


def _edge_tensors(dtype):
    """Tensors at the dtype's max and min normal, and log-uniform magnitudes over spreads up to
    its whole finite range (subnormals included), with random signs; seeded."""
    fi = torch.finfo(dtype)
    lo, hi = math.log2(fi.smallest_normal) - (fi.bits - 1 if dtype != torch.float32 else 23), math.log2(fi.max)
    g = torch.Generator().manual_seed(16)
    out = [torch.tensor([fi.max, -fi.max, fi.max, fi.max * 0.99, fi.max * 0.9, 1.0, -fi.max, 0.5]),
           torch.tensor([fi.smallest_normal, -fi.smallest_normal, 1.0, fi.smallest_normal * 3, 0.0, 2.0, -1.0, 4.0]),
           torch.tensor([1.0, 1e-40, 1.0, 1e-40, 3.0, 1e-30, 7.0, 1e-20])]  # finding 3's tensor, widened
    for spread in (47, 64, 100, hi - lo):
        top = min(hi, lo + spread)
        e = lo + (top - lo) * torch.rand(1024, generator=g, dtype=torch.float64)
        sign = torch.where(torch.rand(1024, generator=g) < 0.5, -1.0, 1.0).double()
        out.append((sign * torch.exp2(e)).clamp(-fi.max, fi.max))
    return [t.to(dtype) for t in out]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CODECS, ids=IDS)
def test_no_exception_and_no_inf_from_finite_input(cfg, dtype):
    codec = build_codec(cfg)
    for i, x in enumerate(_edge_tensors(dtype)):
        x = x.reshape(-1, 8)
        assert torch.isfinite(x).all()
        for seed in (0, 1):
            y = codec.decode(codec.encode(x, seed=seed))
            assert y.dtype == dtype and y.shape == x.shape
            assert torch.isfinite(y).all(), (cfg, dtype, i, x[~torch.isfinite(y)], y[~torch.isfinite(y)])


@pytest.mark.parametrize("cfg", [{"name": "fp", "bits": 6}, {"name": "nm", "n": 1, "m": 2, "value_bits": 6}])
def test_finding3_tensor_encodes(cfg):
    # OverflowError: math range error (fp_error._partial_moment) before the fix
    x = torch.tensor([1.0, 1e-40])
    y = build_codec(cfg).decode(build_codec(cfg).encode(x))
    assert torch.isfinite(y).all() and y.shape == x.shape


def test_finding4_examples():
    x = torch.tensor([61000, 63000, 64000, 65000, 65504.0], dtype=torch.float16)
    fp6 = build_codec({"name": "fp", "bits": 6})
    for seed in range(8):
        y = fp6.decode(fp6.encode(x, seed=seed))
        assert torch.isfinite(y).all() and (y.float().abs() <= 65504).all()
    f32 = torch.finfo(torch.float32).max
    for bits in (4, 6, 8):
        c = build_codec({"name": "fp", "bits": bits})
        assert torch.isfinite(c.decode(c.encode(torch.tensor([f32, -f32, 1.0])))).all()
    bf = build_codec("bf16")
    assert bf.decode(bf.encode(torch.tensor([65504.0], dtype=torch.float16))).item() == 65504
    nm = build_codec({"name": "nm", "n": 1, "m": 2})
    y = nm.decode(nm.encode(torch.tensor([40000.0, 40000.0, -33000.0, -1000.0], dtype=torch.float16)))
    assert torch.isfinite(y).all() and y[0] == 65504


def test_non_finite_input_still_arrives_non_finite():
    for cfg in CODECS:
        c = build_codec(cfg)
        for dtype in DTYPES:
            x = torch.tensor([1.0, float("inf"), -float("inf"), float("nan"), 2.0, 3.0, 4.0, 5.0]).to(dtype)
            y = c.decode(c.encode(x.reshape(2, 4), seed=2)).reshape(-1)
            keep = torch.ones(8, dtype=torch.bool)
            if cfg["name"] == "nm":  # one non-finite element per block survives (architecture.md)
                keep = torch.tensor([False, True, False, False, False, False, False, False])
            assert not torch.isfinite(y[1:4][keep[1:4]]).any(), (cfg, dtype, y)


def test_saturation_bias_only_at_the_edge():
    """fp6 on fp16: the decode equals the unsaturated reference (codes decoded in float32, then
    cast) wherever that is finite in fp16, and is exactly 65504 where it overflowed."""
    codec = build_codec({"name": "fp", "bits": 6})
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(4096, generator=g) * 65504, torch.linspace(60000, 65504, 512)]).to(torch.float16)
    fmt, e = codec.choose(x)
    for seed in range(4):
        y = codec.decode(codec.encode(x, seed=seed)).float()
        raw = decode_codes(encode_codes(x, fmt, codec.rounding, scale_exp=e, seed=seed), fmt, scale_exp=e)
        unsat = raw.to(torch.float16).float()
        over = ~torch.isfinite(unsat)
        assert over.any()  # the test reaches the edge
        assert torch.equal(y[~over], unsat[~over])
        assert (y[over] == 65504).all() and (raw[over] > 65504).all()


def test_saturating_cast_contract():
    y = torch.tensor([1e5, -1e5, 65504.0, float("inf"), -float("inf"), float("nan"), 1.0])
    out = saturating_cast(y, torch.float16)
    assert out[:3].tolist() == [65504, -65504, 65504] and out[3] == math.inf and out[4] == -math.inf
    assert math.isnan(out[5]) and out[6] == 1
    out = saturating_cast(y, torch.float16, inf_is_overflow=True)
    assert out[3] == 65504 and out[4] == -65504 and math.isnan(out[5])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_expected_error_is_finite_over_the_whole_range(rounding):
    for bits in (3, 6, 8):
        for sigma in (20.0, 40.0, 47.0, 66.0, 100.0, 200.0):
            fmt, k = fp_error.optimal_format(bits, 0.0, sigma, rounding)
            err = fp_error.expected_relative_error(fmt, 0.0, sigma, k, rounding)
            assert math.isfinite(err) and 0 <= err <= 2, (bits, sigma, err)


def test_log_space_moment_matches_the_direct_form():
    """Where both forms are finite the log-space evaluation agrees with the direct one (float64
    rounding), so switching to it above the overflow threshold does not move the function."""
    g = np.array([2.0**-10, 0.5, 1.0, 3.0, 2.0**20])
    for k in (-1, 0, 1):
        for m, s in ((0.0, 5.0), (-20.0, 20.0), (3.0, 30.0)):
            direct = math.exp(k * m + 0.5 * k * k * s * s) * fp_error._phi_between(
                (np.log(g[:-1]) - m) / s - k * s, (np.log(g[1:]) - m) / s - k * s)
            logd = np.exp(k * m + 0.5 * k * k * s * s + fp_error._log_phi_between(
                (np.log(g[:-1]) - m) / s - k * s, (np.log(g[1:]) - m) / s - k * s))
            nz = direct > 1e-300
            np.testing.assert_allclose(logd[nz], direct[nz], rtol=1e-9)
