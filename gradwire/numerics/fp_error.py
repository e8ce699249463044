"""Expected relative error of a concrete FP format on lognormal data, and the best power-of-two scale.

Paper 001 (Eq. 4) gives E|Q(x) - x| / |x| for an idealised format (no subnormals, symmetric
exponent range, mantissa error averaged over a log-uniform significand). The codec needs the
error of the format it actually uses (``gradwire.numerics.fp``: subnormals or not, any bias, the
top binade finite, saturation at ``max_value``), so this module integrates the exact piecewise
error over the format's grid against the lognormal density.

Model: ``log2|x| ~ N(mu_log2, sigma_log2**2)`` and ``y = |x| * 2**scale_exp``, so
``ln y ~ N(m, s**2)`` with ``m = (mu_log2 + scale_exp) ln 2`` and ``s = sigma_log2 ln 2``. The relative
error is scale-free (``|Q(x) - x| / |x| = |q(y) - y| / y`` for the grid rounding ``q``). On a grid
cell ``[lo, hi]`` (consecutive representable values; every gap is a power of two):

    nearest:     |q - y| / y = 1 - lo / y       on [lo, c],   hi / y - 1  on [c, hi],  c = (lo+hi)/2
    stochastic:  E|q - y| / y = 2 (hi - y)(y - lo) / ((hi - lo) y)
                             = 2 / (hi - lo) * ((hi + lo) - hi lo / y - y)
    saturation:  y > max:  1 - max / y         (both roundings)

(cell ``[0, g1]``: lo = 0 gives error 1 below g1/2 for nearest and 2 (1 - y/g1) stochastic). Each
piece is a combination of the lognormal partial moments, in closed form::

    E[y**k ; a < y < b] = exp(k m + k**2 s**2 / 2) * (Phi(zb - k s) - Phi(za - k s)),  z = (ln v - m) / s

so the result is exact up to float64 rounding (checked against quadrature and Monte Carlo in
tests/unit/test_fp_error.py). For STOCHASTIC it assumes a continuous uniform u; the real u has
24 bits (``P(up) = ceil(frac * 2**24) / 2**24``), which adds at most ``2**-24 * g1 * E[1/y ; y < g1]``
(``g1`` the smallest positive value): negligible unless most of the mass lies far below ``g1``. ``scale_exp`` may be real here, to evaluate real-valued heuristics
such as the authors' ``2**(-mean(log2|g|) - 3)`` (NOTES-ON-SEEDS.md); the codec uses integers.

The authors' heuristic puts ``mu_log2 + scale_exp = -3`` whatever the format; the optimum for
IEEE-biased formats sits near ``+1`` (the log2-centre of their grids is above 1). Expected
relative error (``optimal_scale_exp`` vs ``authors_scale_exp``; tests/unit/test_fp_error.py checks
the optimum never loses, and Monte Carlo agrees with every number to < 0.3%)::

    format   sigma_log2  nearest: optimal / authors   stochastic: optimal / authors
    1-2-1    1.0         0.114 / 0.921                0.148 / 1.384
    1-3-0    4.0         0.427 / 0.627                0.523 / 1.030
    1-3-2    3.0         0.132 / 0.355                0.161 / 0.533
    1-4-1    4.0         0.117 / 0.209                0.152 / 0.305
    1-4-3    5.5         0.101 / 0.156                0.125 / 0.238
    1-5-2    6.0         0.049 / 0.058                0.065 / 0.080
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import log_ndtr, ndtr

from gradwire.numerics.fp import FPFormat, Rounding, _as_rounding, quantize

LN2 = math.log(2.0)
AUTHORS_SHIFT = -3.0  # the empirical "-3" of the authors' released code (NOTES-ON-SEEDS.md)


def _check_args(fmt, mu_log2, sigma_log2) -> tuple[float, float]:
    if not isinstance(fmt, FPFormat):
        raise TypeError(f"fmt must be an FPFormat, got {type(fmt).__name__}")
    mu, sigma = float(mu_log2), float(sigma_log2)
    if not math.isfinite(mu):
        raise ValueError(f"mu_log2 must be finite, got {mu_log2}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma_log2 must be finite and > 0, got {sigma_log2}")
    return mu, sigma


def _phi_between(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """Phi(zb) - Phi(za) for za <= zb without cancellation in the upper tail."""
    upper = za > 0
    return np.where(upper, ndtr(-za) - ndtr(-zb), ndtr(zb) - ndtr(za))


def _log_phi_between(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """log(Phi(zb) - Phi(za)) for za <= zb (-inf where the difference is 0), from log_ndtr, so
    that it stays accurate where Phi itself underflows (|z| > ~38)."""
    upper = za > 0
    hi = np.where(upper, log_ndtr(-za), log_ndtr(zb))  # log of the larger term
    lo = np.where(upper, log_ndtr(-zb), log_ndtr(za))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = hi + np.log1p(-np.exp(lo - hi))
    return np.where(np.isneginf(hi) | (lo >= hi), -np.inf, out)


# Above this the prefactor exp(k m + k^2 s^2 / 2) overflows float64 (exp(709.78) is the largest).
_MAX_LOG_PREFACTOR = 700.0


def _partial_moment(k: int, a: np.ndarray, b: np.ndarray, m: float, s: float) -> np.ndarray:
    """E[y**k ; a < y < b] for ln y ~ N(m, s**2); a may be 0 and b may be inf.

    The prefactor exp(k m + k^2 s^2 / 2) overflows for wide spreads (s ~ 37, i.e. a log2 spread of
    ~47 binades: a tensor holding 1.0 and 1e-40), although the moment itself is bounded by
    max(a**k, b**k): the Phi difference is then astronomically small. There the product is
    evaluated in log space; elsewhere the direct form is kept (its values, and so every format
    and scale choice made before, are unchanged bit for bit).
    """
    with np.errstate(divide="ignore"):
        za = (np.log(a) - m) / s
        zb = (np.log(b) - m) / s
    log_pre = k * m + 0.5 * k * k * s * s
    if log_pre <= _MAX_LOG_PREFACTOR:
        return math.exp(log_pre) * _phi_between(za - k * s, zb - k * s)
    with np.errstate(over="ignore"):  # only E[1/y ; 0 < y < b] can be infinite: see _times
        return np.exp(log_pre + _log_phi_between(za - k * s, zb - k * s))


def _times(coef: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """coef * moment, 0 where coef is 0: the cell [0, g1] weighs E[1/y ; 0 < y < .] by lo = 0,
    and that moment overflows to inf for very wide spreads (0 * inf would be NaN)."""
    with np.errstate(invalid="ignore"):
        return np.where(coef == 0, 0.0, coef * moment)


def expected_relative_error(
    fmt: FPFormat,
    mu_log2: float,
    sigma_log2: float,
    scale_exp: float = 0,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
) -> float:
    """E[|Q(x) - x| / |x|] for ``log2|x| ~ N(mu_log2, sigma_log2**2)``, with Q = quantize in ``fmt``
    after scaling by ``2**scale_exp`` (for STOCHASTIC, also the expectation over the rounding).

    Exact for this format (closed form per grid cell, see the module docstring). Sign and exact
    zeros do not matter (zeros are exact); non-finite inputs are outside the model.
    """
    mu, sigma = _check_args(fmt, mu_log2, sigma_log2)
    rounding = _as_rounding(rounding)
    scale = float(scale_exp)
    if not math.isfinite(scale):
        raise ValueError(f"scale_exp must be finite, got {scale_exp}")
    m, s = (mu + scale) * LN2, sigma * LN2
    g = np.asarray(fmt.grid(), dtype=np.float64)
    lo, hi = g[:-1], g[1:]
    if rounding is Rounding.NEAREST_EVEN:
        c = 0.5 * (lo + hi)
        down = _partial_moment(0, lo, c, m, s) - _times(lo, _partial_moment(-1, lo, c, m, s))
        up = hi * _partial_moment(-1, c, hi, m, s) - _partial_moment(0, c, hi, m, s)
        cells = down + up
    else:
        cells = (2.0 / (hi - lo)) * (
            (hi + lo) * _partial_moment(0, lo, hi, m, s)
            - _times(hi * lo, _partial_moment(-1, lo, hi, m, s))
            - _partial_moment(1, lo, hi, m, s)
        )
    top = np.array([g[-1]])
    tail = _partial_moment(0, top, np.array([np.inf]), m, s) - g[-1] * _partial_moment(
        -1, top, np.array([np.inf]), m, s
    )
    # math.fsum: cells span many orders of magnitude; keep the sum correctly rounded.
    return float(math.fsum(np.concatenate([cells, tail]).tolist()))


def optimal_scale_exp(
    fmt: FPFormat,
    mu_log2: float,
    sigma_log2: float,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
) -> int:
    """The integer ``scale_exp`` minimising ``expected_relative_error`` (the most centred on ties).

    Searched over a window centred where ``mu_log2 + scale_exp`` sits in the middle (in log2) of
    ``[min_positive, max_value]``; the window is widened until the minimum is interior.
    """
    mu, sigma = _check_args(fmt, mu_log2, sigma_log2)
    rounding = _as_rounding(rounding)
    centre = 0.5 * (math.log2(fmt.min_positive) + math.log2(fmt.max_value))
    s0 = round(centre - mu)
    half = math.ceil(0.5 * (math.log2(fmt.max_value) - math.log2(fmt.min_positive)) + 2 * sigma) + 4
    while True:
        cands = range(s0 - half, s0 + half + 1)
        errs = [expected_relative_error(fmt, mu, sigma, s, rounding) for s in cands]
        best = int(np.argmin(errs))
        if 0 < best < len(errs) - 1 or half > 4096:
            break
        half *= 2
    # Wide formats have a flat optimum (every scale that keeps the mass in range is equally good,
    # up to float64 noise): among the near-ties, prefer the most centred scale.
    floor = errs[best] * (1 + 1e-9)
    return min((s for s, e in zip(cands, errs) if e <= floor), key=lambda s: (abs(s - s0), s))


def optimal_format(
    bits: int,
    mu_log2: float,
    sigma_log2: float,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
    *,
    subnormals: bool = True,
) -> tuple[FPFormat, int]:
    """The ``bits``-bit format (IEEE bias) and integer ``scale_exp`` with the least
    ``expected_relative_error``: every exp_bits in 1..min(bits - 1, 7), each at its
    ``optimal_scale_exp`` (ties: fewer exponent bits).

    ``lognormal.optimal_split`` minimises Eq. (4), which describes the idealised format of
    Eq. (2) (2**n2 binades, no subnormals, saturation at 2**Emax). The formats of
    ``numerics.fp`` gain about ``man_bits`` binades of range from subnormals, so they need fewer
    exponent bits: e.g. at sigma_log2 = 4, 8 bits, nearest, Eq. (4) picks 1-5-2 (expected error
    0.0449 in the concrete format) where 1-4-3 gives 0.0403; at sigma_log2 = 2, 7 bits, 1-4-2
    (0.0449) vs 1-3-3 (0.0341). For sigma_log2 >= ~5 the two agree. NOTES-ON-SEEDS.md: the
    error used to pick a format must describe that format; this one does (and is checked by
    Monte Carlo in tests/unit/test_fp_error.py).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    mu, sigma = float(mu_log2), float(sigma_log2)
    rounding = _as_rounding(rounding)
    best = None
    for e in range(1, min(bits - 1, 7) + 1):
        fmt = FPFormat(e, bits - 1 - e, subnormals=subnormals)
        k = optimal_scale_exp(fmt, mu, sigma, rounding)
        err = expected_relative_error(fmt, mu, sigma, k, rounding)
        if best is None or err < best[0]:
            best = (err, fmt, k)
    return best[1], best[2]


def authors_scale_exp(mu_log2: float) -> float:
    """The authors' per-layer scale exponent ``-mean(log2|g|) - 3`` (real-valued; NOTES-ON-SEEDS)."""
    return -float(mu_log2) + AUTHORS_SHIFT


def simulate_relative_error(
    fmt: FPFormat,
    mu_log2: float,
    sigma_log2: float,
    scale_exp: int = 0,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
    *,
    n: int = 1_000_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Monte Carlo estimate of ``expected_relative_error`` with the real quantizer: returns
    (mean of |Q(x) - x| / |x| over n lognormal float32 samples, its standard error)."""
    mu, sigma = _check_args(fmt, mu_log2, sigma_log2)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen, dtype=torch.float64) * sigma + mu
    if float(z.min()) < -149 or float(z.max()) >= 128:
        raise ValueError("samples leave the float32 range; choose mu_log2/sigma_log2 closer to 0")
    x = torch.exp2(z).to(torch.float32)
    q = quantize(x, fmt, rounding, scale_exp=scale_exp, seed=seed).double()
    x64 = x.double()  # the value actually quantized (float32-rounded sample)
    rel = (q - x64).abs() / x64
    return float(rel.mean()), float(rel.std() / math.sqrt(n))
