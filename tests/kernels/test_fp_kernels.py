"""C++ fused FP encode / decode: bytes identical to numerics.fp for every format family, dtype,
rounding, scale and odd size; statistics exact in counts and within a derived bound in sums."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from gradwire import ops
from gradwire.numerics import lognormal
from gradwire.numerics.fp import FPFormat, Rounding, decode_codes, encode_codes
from tests.kernels._native import bits_equal, lognormal_sample, require_native_cpu

# Every exp/man split family, the FP4..FP8 formats the paper picks, odd biases, no subnormals.
FORMATS = [
    FPFormat(1, 1), FPFormat(2, 1), FPFormat(3, 0), FPFormat(2, 5), FPFormat(4, 0),
    FPFormat(4, 1), FPFormat(5, 0), FPFormat(4, 3), FPFormat(5, 2), FPFormat(7, 0),
    FPFormat(4, 1, subnormals=False), FPFormat(3, 2, bias=1, subnormals=False),
    FPFormat(5, 2, bias=20), FPFormat(2, 2, bias=-5),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALES = (0, 7, -9, 200, -300)  # 200/-300: all saturate / flush (float32 range never materialised)


@pytest.fixture(autouse=True)
def _native():
    require_native_cpu()


def _oracle(x, fmt, rounding, scale_exp, seed, offset):
    codes = encode_codes(x, fmt, rounding, scale_exp=scale_exp, seed=seed, offset=offset)
    return ops.REFERENCES["pack_bits"](codes, fmt.bits)


def _check_without_stats(x, fmt, rounding, scale_exp, seed, offset, want):
    """with_stats=False runs other kernel instantiations (no histogram): the same bytes, and
    zeros (merge_stats' identity) for the statistics."""
    packed, stats = ops.fp_encode(x, fmt, rounding, scale_exp=scale_exp, seed=seed, offset=offset,
                                  with_stats=False)
    assert torch.equal(packed, want), ("with_stats=False", x.dtype, rounding, scale_exp)
    assert torch.equal(stats, torch.zeros(5, dtype=torch.float64))


def _stats_bound(x: torch.Tensor) -> tuple[float, float]:
    """Allowed |kernel - reference| on (sum log2, sum log2^2): the reference rounds each log2 to
    float32 (<= 2**-24 relative; squares: 2 * 2**-24 + tiny), float64 summation adds ~n*2**-53;
    16-bit inputs: the kernels' fixed-point log2 is within 2**-29 of the true one (log2_stats16.h),
    which adds up to 2**-29 per element to the first sum and 2**-28 |log2| + 2**-58 to the second."""
    lg = torch.log2(x.double().abs())
    lg = lg[torch.isfinite(lg)]
    s1 = float(lg.abs().sum())
    s2 = float((lg * lg).sum())
    fixed = x.dtype in (torch.bfloat16, torch.float16)
    q1 = 2**-29 * lg.numel() if fixed else 0.0
    q2 = 2**-28 * s1 + 2**-58 * lg.numel() if fixed else 0.0
    return 2**-23 * s1 + q1 + 1e-9, 2**-22 * s2 + q2 + 1e-9


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_encode_bit_exact(fmt):
    n = 4099  # odd: exercises the partial last group of 8 and a partial last byte
    for dtype in DTYPES:
        x = lognormal_sample(n, seed=fmt.bits * 31 + fmt.exp_bits, dtype=dtype)
        for rounding in Rounding:
            for s in SCALES:
                packed, stats = ops.fp_encode(x, fmt, rounding, scale_exp=s, seed=99, offset=5)
                want = _oracle(x, fmt, rounding, s, 99, 5)
                assert torch.equal(packed, want), (dtype, rounding, s)
                _check_without_stats(x, fmt, rounding, s, 99, 5, want)


def every_bf16_pattern(seed: int) -> torch.Tensor:
    """All 65536 bf16 bit patterns (zeros, subnormals, normals, Inf, NaN; both signs), shuffled
    so that 16-lane groups mix the cases the vector paths branch on."""
    perm = torch.randperm(65536, generator=torch.Generator().manual_seed(seed))
    return perm.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # int16 wraps: same bits


# Scales that put every case (normal cell, sub-normal cell, saturation) in one call, and the
# extremes where the bf16 exponent range lies wholly above or below the format's.
BF16_SCALES = (0, 7, -9, 126, -126, 140, 300, -300)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_bf16_pattern_bit_exact(fmt):
    # bf16 inputs take explicit AVX-512/AVX2 lanes (fp_bf16_fast.h) with a separate sub-normal-cell
    # branch and a scalar redo of float32 subnormals: every pattern, every scale above, both
    # roundings, against the oracle. 65536 % 16 == 0, so the general lanes' tail path is idle here
    # (test_encode_odd_sizes_and_chunk_edges covers it).
    x = every_bf16_pattern(fmt.bits * 7 + fmt.man_bits)
    for rounding in Rounding:
        for s in BF16_SCALES:
            packed, _ = ops.fp_encode(x, fmt, rounding, scale_exp=s, seed=12, offset=2**32 + 3)
            want = _oracle(x, fmt, rounding, s, 12, 2**32 + 3)
            assert torch.equal(packed, want), (rounding, s)
            _check_without_stats(x, fmt, rounding, s, 12, 2**32 + 3, want)


_SIMD_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from gradwire import _build, ops
from gradwire.numerics.fp import FPFormat, Rounding
from tests.kernels.test_fp_kernels import BF16_SCALES, _check_without_stats, _oracle, every_bf16_pattern, lognormal_sample
_build.load_native()
assert ops.implementation("fp_encode", "cpu") == "native", _build.STATUS
for fmt in (FPFormat(4, 1), FPFormat(3, 2, bias=1, subnormals=False), FPFormat(2, 5), FPFormat(7, 0)):
    for x in (every_bf16_pattern(1), lognormal_sample(4099, seed=2, dtype=torch.bfloat16),
              lognormal_sample(4099, seed=3), lognormal_sample(4099, seed=4, dtype=torch.float16)):
        for rounding in Rounding:
            for s in BF16_SCALES:
                packed, _ = ops.fp_encode(x, fmt, rounding, scale_exp=s, seed=5, offset=9)
                want = _oracle(x, fmt, rounding, s, 5, 9)
                assert torch.equal(packed, want), (fmt, x.dtype, rounding, s)
                _check_without_stats(x, fmt, rounding, s, 5, 9, want)
print("bit-exact")
"""


def _run_child(simd: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, GRADWIRE_CPU_SIMD=simd)
    return subprocess.run([sys.executable, "-c", _SIMD_CHILD.format(root=root)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("simd", ["avx2", "none"])
def test_narrower_simd_paths_bit_exact(simd):
    # The CPU picks the widest FP encode path once per process; GRADWIRE_CPU_SIMD caps it, so the
    # AVX2 and baseline paths are checked on an AVX-512 machine too (in a child process). Python
    # cannot see which path ran: that the cap is read is shown by the next test, that it takes
    # effect only by reading simd_level() in fp_lanes.h. On a CPU without AVX-512 the parent and the
    # avx2 child run the same path.
    res = _run_child(simd)
    assert res.returncode == 0 and "bit-exact" in res.stdout, res.stdout + res.stderr


def test_bad_simd_cap_is_a_clear_error():
    res = _run_child("sse9")
    assert res.returncode != 0
    assert "GRADWIRE_CPU_SIMD must be avx512, avx2 or none" in res.stderr, res.stderr


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 65535, 65536 + 9])
def test_encode_odd_sizes_and_chunk_edges(n):
    fmt = FPFormat(4, 1)  # FP6: 4 codes per 3 bytes, the awkward case
    x = lognormal_sample(n, seed=n)
    for rounding in Rounding:
        packed, stats = ops.fp_encode(x, fmt, rounding, scale_exp=3, seed=7, offset=2**33)
        want = _oracle(x, fmt, rounding, 3, 7, 2**33)
        assert torch.equal(packed, want)
        _check_without_stats(x, fmt, rounding, 3, 7, 2**33, want)
        y = ops.fp_decode(packed, n, fmt, scale_exp=3)
        assert bits_equal(y, decode_codes(encode_codes(x, fmt, rounding, scale_exp=3, seed=7, offset=2**33), fmt, scale_exp=3))
    if n == 0:
        assert packed.numel() == 0 and torch.equal(stats, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_stats(dtype):
    x = lognormal_sample(70001, seed=3, dtype=dtype)
    _, stats = ops.fp_encode(x, FPFormat(4, 3), scale_exp=2)
    ref = lognormal.moment_stats(x)
    torch.testing.assert_close(stats[[0, 3, 4]], ref[[0, 3, 4]], rtol=0, atol=0)  # counts: exact
    b1, b2 = _stats_bound(x)
    assert abs(float(stats[1] - ref[1])) <= b1
    assert abs(float(stats[2] - ref[2])) <= b2
    torch.testing.assert_close(ops.moment_stats(x), stats, rtol=0, atol=0)  # same code, same sums
    # Exact on data whose log2 is an integer (powers of two): no rounding anywhere.
    p2 = torch.exp2(torch.randint(-30, 30, (1000,), generator=torch.Generator().manual_seed(1)).float()).to(dtype)
    torch.testing.assert_close(ops.moment_stats(p2), lognormal.moment_stats(p2), rtol=0, atol=0)


def test_stats_independent_of_thread_count():
    x = lognormal_sample(300001, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.fp_encode(x, FPFormat(4, 1), "stochastic", seed=3)
        torch.set_num_threads(2)
        two = ops.fp_encode(x, FPFormat(4, 1), "stochastic", seed=3)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0])
    assert torch.equal(one[1], two[1])  # fixed chunking + fixed merge order: bit-identical float64


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_decode_bit_exact_every_code(fmt):
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8).repeat(3)  # the whole table, odd count
    packed = ops.pack_bits(codes, fmt.bits)
    for s in (0, 5, -11, 140, -140, 1000):
        ref = decode_codes(codes, fmt, scale_exp=s)
        for dtype in DTYPES:
            got = ops.fp_decode(packed, codes.numel(), fmt, scale_exp=s, dtype=dtype)
            assert bits_equal(got, ref.to(dtype)), (s, dtype)


def test_stochastic_rounding_unbiased_through_kernel():
    # FP6 1-4-1 has spacing 0.5 on [1, 2): v = 1.2 lies between lo = 1.0 and hi = 1.5. Each
    # element has its own counter, so the n decodes are independent draws of lo or hi with
    # mean v and variance (hi - v)(v - lo); the sample mean must be within 6 standard errors.
    fmt = FPFormat(4, 1)
    n = 200_000
    x = torch.full((n,), 1.2)
    v = float(x[0])  # the float32 value actually encoded
    packed, _ = ops.fp_encode(x, fmt, "stochastic", seed=2024)
    y = ops.fp_decode(packed, n, fmt).double()
    assert set(torch.unique(y).tolist()) == {1.0, 1.5}
    se = math.sqrt((1.5 - v) * (v - 1.0) / n)
    assert abs(float(y.mean()) - v) < 6 * se


def test_noncontiguous_and_float64_inputs():
    fmt = FPFormat(5, 2)
    x = lognormal_sample(64 * 33, seed=8).reshape(64, 33)
    for view in (x.t(), x[:, ::2]):
        packed, _ = ops.fp_encode(view, fmt)
        assert torch.equal(packed, _oracle(view, fmt, Rounding.NEAREST_EVEN, 0, 0, 0))
    x64 = torch.tensor([1e300, -1e300, 1.3, float("nan"), 1e-300], dtype=torch.float64)
    packed, _ = ops.fp_encode(x64, fmt, scale_exp=1)
    assert torch.equal(packed, _oracle(x64, fmt, Rounding.NEAREST_EVEN, 1, 0, 0))


def test_malformed_input_refused():
    fmt = FPFormat(4, 3)
    with pytest.raises(TypeError, match="float32"):
        ops.fp_encode(torch.zeros(4, dtype=torch.int32), fmt)
    with pytest.raises(TypeError, match="FPFormat"):
        ops.fp_encode(torch.zeros(4), (4, 3))
    with pytest.raises(ValueError, match="seed"):
        ops.fp_encode(torch.zeros(4), fmt, seed=-1)
    with pytest.raises(ValueError, match="offset"):
        ops.fp_encode(torch.zeros(4), fmt, offset=-3)
    with pytest.raises(TypeError, match="with_stats must be a bool"):
        ops.fp_encode(torch.zeros(4), fmt, with_stats=1)
    with pytest.raises(ValueError, match="bytes"):
        ops.fp_decode(torch.zeros(3, dtype=torch.uint8), 4, fmt)
    with pytest.raises(TypeError, match="dtype"):
        ops.fp_decode(torch.zeros(4, dtype=torch.uint8), 4, fmt, dtype=torch.int8)
    # The raw op checks too (a caller bypassing the Python wrapper gets a clear error, not UB).
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.gradwire.fp_encode(torch.zeros(4, dtype=torch.float64), 4, 3, 7, True, 0, False, 0, 0)
    with pytest.raises(RuntimeError, match="fp format"):
        torch.ops.gradwire.fp_encode(torch.zeros(4), 4, 4, 7, True, 0, False, 0, 0)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_table_path_for_16bit_inputs_bit_exact(dtype):
    # n >= 2**18: for fp16 the C++ kernel tabulates the decision per 16-bit pattern; bf16 takes
    # the fused lanes (hash inline, and the offset makes the first block cross a 2**32 counter
    # boundary: the fallback path). Statistics come from the |x| histogram. Both must give the
    # oracle's bytes and exact counts.
    n = 2**18 + 13
    x = lognormal_sample(n, seed=11, dtype=dtype)
    for fmt, s in ((FPFormat(4, 1), 9), (FPFormat(3, 0, subnormals=False), -4)):
        for rounding in Rounding:
            packed, stats = ops.fp_encode(x, fmt, rounding, scale_exp=s, seed=5, offset=2**32 - 100)
            want = _oracle(x, fmt, rounding, s, 5, 2**32 - 100)
            assert torch.equal(packed, want), (fmt.name, rounding)
            _check_without_stats(x, fmt, rounding, s, 5, 2**32 - 100, want)
    ref = lognormal.moment_stats(x)
    torch.testing.assert_close(stats[[0, 3, 4]], ref[[0, 3, 4]], rtol=0, atol=0)
    b1, b2 = _stats_bound(x)
    assert abs(float(stats[1] - ref[1])) <= b1 and abs(float(stats[2] - ref[2])) <= b2
    torch.testing.assert_close(ops.moment_stats(x), stats, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_encode_subnormal_inputs_bit_exact(dtype):
    # The vectorised code path hands float32-subnormal inputs to the scalar fp_split; a scale of
    # 2**140 puts them (and the smallest normals) inside the format's grid, so every rounding
    # decision on them is exercised, both signs, both roundings, with and without subnormals.
    g = torch.Generator().manual_seed(3)
    mant = torch.randint(1, 2**23, (3001,), generator=g, dtype=torch.int32)
    sub = mant.view(torch.float32) * torch.where(torch.rand(3001, generator=g) < 0.5, -1.0, 1.0)
    x = torch.cat([sub, sub * 2**10, torch.tensor([1.1754944e-38, -1.1754942e-38, 1e-45])]).to(dtype)
    for fmt in (FPFormat(4, 1), FPFormat(3, 2, bias=1, subnormals=False), FPFormat(2, 5)):
        for rounding in Rounding:
            packed, _ = ops.fp_encode(x, fmt, rounding, scale_exp=140, seed=8, offset=3)
            assert torch.equal(packed, _oracle(x, fmt, rounding, 140, 8, 3)), (fmt.name, rounding)
