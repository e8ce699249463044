"""16-bit moment statistics (csrc/cpu/log2_stats16.h): exact integer sums of a fixed-point log2.

The definition is re-implemented here with Python integers (an independent oracle), and every
way the C++ computes it must give the same bits: moment_stats' vector lanes (bf16 on AVX-512
VNNI), its histogram (fp16, or any dtype under GRADWIRE_CPU_SIMD=avx2), and the histogram
interleaved with the fused FP encode.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from gradwire import ops
from gradwire.numerics.fp import FPFormat
from tests.kernels._native import lognormal_sample, require_native_cpu
from tests.kernels.test_fp_kernels import every_bf16_pattern

_LAYOUT = {torch.bfloat16: (7, 127, 0x7F80), torch.float16: (10, 15, 0x7C00)}  # man bits, bias, Inf


@pytest.fixture(autouse=True)
def _native():
    require_native_cpu()


def exact_stats(x: torch.Tensor) -> torch.Tensor:
    """lf = E * 2**28 + round(2**28 * log2(1 + M / 1024)) for |x| = 2**E (1 + M / 1024) (subnormals
    normalised), summed exactly (Python ints), each sum rounded once (int / int is correctly
    rounded in Python, as the C++ int128 -> double conversion is)."""
    man, bias, inf = _LAYOUT[x.dtype]
    counts = torch.bincount(x.reshape(-1).view(torch.int16).to(torch.int64) & 0x7FFF, minlength=1 << 15)
    table = [round(math.ldexp(math.log2(1 + j / 1024), 28)) for j in range(1024)]
    n = n_zero = n_nonfinite = s1 = s2 = 0
    for b, c in enumerate(counts.tolist()):
        if not c:
            continue
        if b >= inf:
            n_nonfinite += c
        elif b == 0:
            n_zero += c
        else:
            e, m = b >> man, b & ((1 << man) - 1)
            exp = e - bias
            if e == 0:  # subnormal: m * 2**(1 - bias - man)
                k = m.bit_length() - 1
                exp, m = k + 1 - bias - man, (m - (1 << k)) << (man - k)
            lf = exp * 2**28 + table[m << (10 - man)]
            n, s1, s2 = n + c, s1 + lf * c, s2 + lf * lf * c
    return torch.tensor([n, s1 / 2**28, s2 / 2**56, n_zero, n_nonfinite], dtype=torch.float64)


def _samples():
    return [
        every_bf16_pattern(1),  # zeros, subnormals, normals, Inf, NaN, both signs
        every_bf16_pattern(2).view(torch.float16),  # every fp16 pattern
        lognormal_sample(2**18 + 13, seed=3, dtype=torch.bfloat16),  # several chunks + a tail
        lognormal_sample(4099, seed=4, dtype=torch.float16),
        torch.full((100_003,), -3.5, dtype=torch.bfloat16),  # one bin: widening of every lane sum
        torch.zeros(0, dtype=torch.bfloat16),
    ]


@pytest.mark.parametrize("i", range(6))
def test_moment_stats_and_fused_encode_equal_the_exact_definition(i):
    x = _samples()[i]
    want = exact_stats(x)
    assert torch.equal(ops.moment_stats(x), want)
    _, fused = ops.fp_encode(x, FPFormat(4, 1), "stochastic", seed=1)
    assert torch.equal(fused, want)


def test_large_values_do_not_overflow_the_lane_sums():
    # lf = 127 * 2**28 + L (the top of the bf16 range) and -126 * 2**28 + L (the smallest normal
    # binade): the int32 lane sums of the vector method are widened before they wrap (every 8 and
    # 256 steps of 32 elements).
    x = torch.full((1 << 20,), 3.3e38, dtype=torch.bfloat16)
    x[::3] = -1.5 * 2.0**-126
    fields = (x.view(torch.int16).to(torch.int32) & 0x7F80).unique().tolist()
    assert sorted(fields) == [0x0080, 0x7F00]  # exponent fields 1 and 254: both ends of the normals
    assert torch.equal(ops.moment_stats(x), exact_stats(x))


_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from gradwire import _build, ops
from tests.kernels.test_stats16_kernels import _both
_build.load_native()
print(_both())
"""


def _both() -> str:
    """moment_stats and the fused encode's statistics of every sample, as exact hex floats."""
    out = []
    for x in _samples():
        fused = ops.fp_encode(x, FPFormat(4, 1), "stochastic", seed=1)[1]
        out.append(" ".join(float(v).hex() for v in ops.moment_stats(x).tolist() + fused.tolist()))
    return "\n".join(out)


def _has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512bw", "avx512vl", "avx512dq", "bmi2", "avx512_vnni"))


@pytest.mark.skipif(not _has_vnni(), reason="no AVX-512 VNNI: both processes would run the histogram")
def test_histogram_method_gives_the_same_bits():
    # GRADWIRE_CPU_SIMD=avx2 turns the bf16 vector lanes off: moment_stats and the fused encode
    # take the histogram; this process takes the vector lanes.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", _CHILD.format(root=root)], cwd=root, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, GRADWIRE_CPU_SIMD="avx2"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == _both()
