"""Eq. (4) of paper 001: expected relative error of the idealised n-bit FP format of Eq. (2) on
lognormal data, and the optimal exponent/mantissa split (paper 001, Table 2).

sigma here is the standard deviation of log2|x| (NOTES-ON-SEEDS.md, Units), and the data are
centred (mu = 0: the per-layer scale has been applied). The first term of Eq. (4) is damaged in
the paper copy; it is re-derived here (``mantissa_error_exact``), with the NOTES-ON-SEEDS
approximation kept for comparison. For the error of a concrete format (subnormals, bias,
rounding mode) and the best per-layer scale, see ``gradwire.numerics.fp_error``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.special import log_ndtr, ndtr

LN2 = math.log(2.0)

def _check_format(exp_bits: int, man_bits: int, sigma_log2: float) -> None:
    if not isinstance(exp_bits, int) or exp_bits < 1 or exp_bits > 11:
        raise ValueError(f"exp_bits must be an int in [1, 11], got {exp_bits!r}")
    if not isinstance(man_bits, int) or man_bits < 0 or man_bits > 52:
        raise ValueError(f"man_bits must be an int in [0, 52], got {man_bits!r}")
    if not (math.isfinite(sigma_log2) and sigma_log2 > 0):
        raise ValueError(f"sigma_log2 must be finite and > 0, got {sigma_log2!r}")


def mantissa_error_exact(man_bits: int) -> float:
    """E[|M_q - M| / M] for M log-uniform on [1, 2) (density 1/(M ln 2)), round to nearest on
    the grid 1 + k 2^-n1, k = 0..2^n1 (M_q = 2 is the next binade's 1.0).

    Sum over grid cells of integral |M - g| / M^2 dM / ln 2, per cell [a, b] around g:
    int_a^g (g-M)/M^2 = r - log1p(r), r = (g-a)/a;  int_g^b (M-g)/M^2 = log1p(s) - s/(1+s),
    s = (b-g)/g. For n1 > 16 the NOTES' uniform-error value 1/(8 ln2 2^n1) is used (it is
    exact up to O(2^-2n1)). n1 = 0: 0.16993 vs the approximation's 0.18034.
    """
    if man_bits > 16:
        return 1.0 / (8.0 * LN2 * 2.0**man_bits)
    d = 2.0**-man_bits
    g = 1.0 + d * np.arange(2**man_bits + 1)
    a = np.maximum(g - d / 2, 1.0)
    b = np.minimum(g + d / 2, 2.0)
    r = (g - a) / a
    s = (b - g) / g
    return float(np.sum(r - np.log1p(r)) + np.sum(np.log1p(s) - s / (1 + s))) / LN2


def mantissa_error_notes(man_bits: int) -> float:
    """The NOTES-ON-SEEDS correction of Eq. (4)'s first term: uniform rounding error D/4 times
    E[1/M] = 1/(2 ln 2), i.e. 1 / (8 ln2 2^n1). An approximation (6% high at n1 = 0)."""
    return 1.0 / (8.0 * LN2 * 2.0**man_bits)


def _eq4(exp_bits: int, man_bits: int, sigma_log2: float, mantissa: Callable[[int], float]) -> float:
    _check_format(exp_bits, man_bits, sigma_log2)
    emax = 2.0 ** (exp_bits - 1)
    k = emax / sigma_log2
    # Regions by log2 x (mu = 0, i.e. after scaling): normal binades -Emax <= log2 x < Emax
    # (E = floor(log2 x) in [-Emax, Emax-1]), saturation at 2^Emax for log2 x >= Emax, flush to
    # zero below -Emax (relative error 1). Paper 001, Eq. (2)-(4) and App. A.4.
    # Eq. (2) as printed overlaps at E = +-Emax; NOTES-ON-SEEDS flushes E = -Emax. We keep
    # E = -Emax normal: then the normal range is the 2^n2 = 2 Emax binades that Eq. (4)'s
    # 2 Phi(Emax / sigma) - 1 term integrates over (the Monte Carlo test simulates exactly this).
    p_mid = 2.0 * ndtr(k) - 1.0
    p_tail = ndtr(-k)
    # E[2^Emax / x ; x > 2^Emax] = 2^Emax e^{(sigma ln2)^2/2} (1 - Phi(k + sigma ln2)), in logs
    # because the exponential overflows for large sigma.
    sl = sigma_log2 * LN2
    sat_ratio = math.exp(emax * LN2 + 0.5 * sl * sl + float(log_ndtr(-(k + sl))))
    return p_mid * mantissa(man_bits) + (p_tail - sat_ratio) + p_tail


def eq4_expected_error(exp_bits: int, man_bits: int, sigma_log2: float) -> float:
    """Expected relative error E|x_q - x| / x of the Eq. (2) format for log2 x ~ N(0, sigma^2).

    Eq. (4) of paper 001 with its damaged first term replaced by the exact mantissa term
    (``mantissa_error_exact``); the other terms are the paper's (saturation and flush).
    Checked against a Monte Carlo of the same format in tests/unit/test_lognormal.py.
    """
    return _eq4(exp_bits, man_bits, sigma_log2, mantissa_error_exact)


def eq4_expected_error_notes(exp_bits: int, man_bits: int, sigma_log2: float) -> float:
    """Eq. (4) with the NOTES-ON-SEEDS mantissa term 1/(8 ln2 2^n1), kept for comparison."""
    return _eq4(exp_bits, man_bits, sigma_log2, mantissa_error_notes)


def optimal_split(bits: int, sigma_log2: float, *, error: Callable[[int, int, float], float] = eq4_expected_error
                  ) -> tuple[int, int]:
    """(exp_bits, man_bits) with 1 + exp_bits + man_bits = bits minimising ``error`` (Eq. 4).

    exp_bits ranges over 1..bits-1 (at least one exponent bit). Reproduces paper 001 Table 2.
    """
    if not isinstance(bits, int) or bits < 2 or bits > 12:
        raise ValueError(f"bits must be an int in [2, 12], got {bits!r}")
    splits = [(e, bits - 1 - e) for e in range(1, bits)]
    return min(splits, key=lambda em: error(em[0], em[1], sigma_log2))
