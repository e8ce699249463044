"""CUDA kernels: bit-identical to the reference (numerics.fp / numerics.rng / the packing contract).

Skipped with a reason on machines without a GPU; on a GPU, run `bash tools/gpu_check.sh`, which
runs these tests, compute-sanitizer memcheck and the benchmark in one go.
"""
from __future__ import annotations

import pytest
import torch

from gradwire import _build, ops
from gradwire.numerics import lognormal, rng
from gradwire.numerics.fp import FPFormat, Rounding, decode_codes, encode_codes
from tests.kernels._native import bits_equal, lognormal_sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA kernels untested here "
                       "(they are compiled for sm_80/sm_90 by test_nvcc_compiles.py)"),
]

FORMATS = [FPFormat(4, 1), FPFormat(3, 0), FPFormat(5, 2), FPFormat(4, 3), FPFormat(2, 5),
           FPFormat(4, 1, subnormals=False), FPFormat(5, 2, bias=20)]


@pytest.fixture(autouse=True)
def _native_cuda():
    _build.load_native()
    ok, why = _build.STATUS["cuda"]
    if not ok:
        pytest.fail(f"a GPU is present but the CUDA kernels did not load: {why}")
    assert ops.implementation("fp_encode", "cuda") == "native"


def test_rng_bit_exact():
    idx = torch.cat([torch.arange(5000), torch.randint(0, 2**62, (5000,))]).cuda()
    for seed in (0, 77, 2**32 - 1):
        torch.testing.assert_close(torch.ops.gradwire.rng_u32(seed, idx).cpu(),
                                   rng.random_u32(seed, idx.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_bit_exact(bits):
    for n in (0, 1, 7, 9, 1001, 2**20 + 3):
        c = torch.randint(0, 1 << bits, (n,), dtype=torch.int64).to(torch.uint8)
        p = ops.pack_bits(c.cuda(), bits)
        assert torch.equal(p.cpu(), ops.REFERENCES["pack_bits"](c, bits))
        assert torch.equal(ops.unpack_bits(p, bits, n).cpu(), c)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_fp_encode_decode_bit_exact(fmt, dtype):
    x = lognormal_sample(2**20 + 5, seed=fmt.bits, dtype=dtype)
    for rounding in Rounding:
        for s in (0, 6, -300):
            packed, stats = ops.fp_encode(x.cuda(), fmt, rounding, scale_exp=s, seed=3, offset=9)
            codes = encode_codes(x, fmt, rounding, scale_exp=s, seed=3, offset=9)
            assert torch.equal(packed.cpu(), ops.REFERENCES["pack_bits"](codes, fmt.bits)), (rounding, s)
            plain, zeros = ops.fp_encode(x.cuda(), fmt, rounding, scale_exp=s, seed=3, offset=9, with_stats=False)
            assert torch.equal(plain, packed) and zeros.is_cuda and not zeros.any()  # the stats-free kernel
            y = ops.fp_decode(packed, x.numel(), fmt, scale_exp=s, dtype=dtype)
            assert bits_equal(y.cpu(), decode_codes(codes, fmt, scale_exp=s).to(dtype))
    ref = lognormal.moment_stats(x)
    torch.testing.assert_close(stats.cpu()[[0, 3, 4]], ref[[0, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(stats.cpu()[1:3], ref[1:3], rtol=1e-6, atol=1e-6)  # log2 in float32 there


def test_misaligned_and_noncontiguous_input():
    x = lognormal_sample(4097, seed=1, dtype=torch.bfloat16).cuda()
    fmt = FPFormat(4, 1)
    for view in (x[1:], x[3:].reshape(-1)[::2]):  # not 16-byte aligned; strided
        packed, _ = ops.fp_encode(view, fmt, "stochastic", seed=4)
        codes = encode_codes(view.cpu(), fmt, "stochastic", seed=4)
        assert torch.equal(packed.cpu(), ops.REFERENCES["pack_bits"](codes, fmt.bits))


def test_binding_refuses_wrong_dtype():
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.ops.gradwire.rng_u32(1, torch.arange(4).cuda().to(torch.int32))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_prune_and_nm_bit_exact(dtype):
    from gradwire.numerics import nm, pruning

    x = lognormal_sample(4 * 100_003, seed=12, dtype=dtype)
    for alpha in (2.0**-6, 0.5):
        got = ops.stochastic_prune(x.cuda(), alpha, seed=3, offset=11)
        assert bits_equal(got.cpu(), pruning.stochastic_prune(x, alpha, seed=3, offset=11))
    xb = x.reshape(-1, 4)
    for scheme, fn in (("mvue_12", nm.mvue_12_select), ("mvue_24_exact", nm.mvue_24_exact_select),
                       ("mvue_24_approx", nm.mvue_24_approx_select)):
        v, i = ops.nm_select(xb.cuda(), scheme, seed=5, offset=2**32 - 3)
        rv, ri = fn(xb, seed=5, offset=2**32 - 3)
        assert torch.equal(i.cpu(), ri) and bits_equal(v.cpu(), rv), scheme


ODD_SIZES = (1, 7, 9, 31, 33, 4099, 65537)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_fp_odd_sizes_bit_exact(fmt, dtype):
    """Partial groups of 8 and partial quads of 32 take the byte-store tail of the encode."""
    for n in ODD_SIZES:
        x = lognormal_sample(n, seed=n, dtype=dtype)
        for rounding in Rounding:
            packed, stats = ops.fp_encode(x.cuda(), fmt, rounding, scale_exp=2, seed=n, offset=5)
            codes = encode_codes(x, fmt, rounding, scale_exp=2, seed=n, offset=5)
            assert torch.equal(packed.cpu(), ops.REFERENCES["pack_bits"](codes, fmt.bits)), (n, rounding)
            y = ops.fp_decode(packed, n, fmt, scale_exp=2, dtype=dtype)
            assert bits_equal(y.cpu(), decode_codes(codes, fmt, scale_exp=2).to(dtype)), n
        ref = lognormal.moment_stats(x)
        torch.testing.assert_close(stats.cpu()[[0, 3, 4]], ref[[0, 3, 4]], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_prune_nm_stats_odd_sizes_bit_exact(dtype):
    from gradwire.numerics import nm, pruning

    for n in ODD_SIZES:
        x = lognormal_sample(4 * n, seed=n, dtype=dtype)
        got = ops.stochastic_prune(x[: n].cuda(), 2.0**-5, seed=1, offset=n)
        assert bits_equal(got.cpu(), pruning.stochastic_prune(x[:n], 2.0**-5, seed=1, offset=n)), n
        ref = lognormal.moment_stats(x[:n])
        got_stats = ops.moment_stats(x[:n].cuda()).cpu()
        torch.testing.assert_close(got_stats[[0, 3, 4]], ref[[0, 3, 4]], rtol=0, atol=0)
        torch.testing.assert_close(got_stats[1:3], ref[1:3], rtol=1e-6, atol=1e-6)
        for scheme, m, fn in (("mvue_12", 2, nm.mvue_12_select), ("mvue_24_exact", 4, nm.mvue_24_exact_select),
                              ("mvue_24_approx", 4, nm.mvue_24_approx_select)):
            xb = x[: m * n].reshape(n, m)  # an odd number of blocks
            v, i = ops.nm_select(xb.cuda(), scheme, seed=n, offset=3)
            rv, ri = fn(xb, seed=n, offset=3)
            assert torch.equal(i.cpu(), ri) and bits_equal(v.cpu(), rv), (scheme, n)


def test_outputs_stay_on_the_current_stream():
    """The kernels launch on torch's current stream: work queued on a side stream is ordered."""
    x = lognormal_sample(1 << 20, seed=3, dtype=torch.bfloat16).cuda()
    fmt = FPFormat(4, 1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = x * 1.0  # same values, produced on the side stream
        packed, _ = ops.fp_encode(y, fmt, "stochastic", seed=9)
    s.synchronize()
    codes = encode_codes(x.cpu(), fmt, "stochastic", seed=9)
    assert torch.equal(packed.cpu(), ops.REFERENCES["pack_bits"](codes, fmt.bits))
