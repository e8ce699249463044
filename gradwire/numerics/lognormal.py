"""Lognormal statistics of neural gradients and the analytic measures built on them.

Paper 001 (Chmiel et al., ICLR 2021, "Neural gradients are near-lognormal") models |g| as
lognormal. This module provides:

* one-pass, additive moment statistics and the lognormal fit (``moment_stats``, ``fit_lognormal``);
* Kolmogorov-Smirnov distances to a normal and to a lognormal fit (paper Table 1);
* Eq. (4), the expected relative error of the idealised n-bit FP format of Eq. (2), with the
  mantissa term re-derived (see ``eq4_expected_error``), and the optimal exponent/mantissa split
  (Table 2);
* Eq. (8), the expected sparsity of stochastic pruning (Eq. 5) at threshold alpha, its inverse,
  the cosine similarity of stochastic pruning, and a heterogeneous per-layer sparsity allocation.

Units (docs/architecture.md): ``*_log2`` are statistics of log2|g| (Eq. 2-4), ``*_ln`` of ln|g|
(Eq. 5-8). Statistics cover the finite nonzero entries; zeros and non-finite entries are counted
separately. Scalar analytics use float64 numpy/scipy; tensor passes use torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri

from gradwire.numerics.rng import random_u32

STATS_LEN = 5
LN2 = math.log(2.0)
_CHUNK = 1 << 15  # elements per chunk in moment_stats (see its docstring)
KS_MAX_SAMPLES = 200_000
KS_SEED = 0x5EED


# --------------------------------------------------------------------------- fitting


def _check_float_tensor(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")


def moment_stats(x: torch.Tensor) -> torch.Tensor:
    """Additive statistics of log2|x|: float64 ``[n_finite_nonzero, sum_log2, sum_log2_sq,
    n_zero, n_nonfinite]``.

    log2 is taken in float32 (bf16/fp16 upcast exactly; float64 input stays float64); each
    chunk's sum of logs and sum of squared logs (the square rounded to the input's float type,
    relative error <= 2^-24 per term) accumulate in float64. Chunks of 2^15 elements into two
    reused buffers: whole-tensor temporaries were page-fault bound (~4x slower), and chunks below
    ATen's parallel grain size make the sums independent of the thread count. 16M float32
    elements: ~0.15 s on one thread of the shared CI box. An empty tensor gives all zeros, the
    identity of ``merge_stats``. Raises TypeError for non-floating dtypes.
    """
    _check_float_tensor(x)
    flat = x.detach().reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    n_fin = n_zero = n_nonfinite = 0
    s1 = s2 = 0.0
    buf = torch.empty(min(_CHUNK, flat.numel()), dtype=flat.dtype, device=flat.device)
    sq = torch.empty_like(buf)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        k = chunk.numel()
        lg = torch.abs(chunk, out=buf[:k])
        nz = k - int(torch.count_nonzero(lg))
        torch.log2(lg, out=lg)  # -inf at 0, +inf at inf, NaN at NaN
        total = lg.sum(dtype=torch.float64).item()
        if nz == 0 and math.isfinite(total):
            nnf = 0  # fast path: every entry finite and nonzero
        else:
            nnf = k - int(torch.isfinite(chunk).sum())
            torch.nan_to_num_(lg, nan=0.0, posinf=0.0, neginf=0.0)  # drop zeros/non-finite from sums
            total = lg.sum(dtype=torch.float64).item()
        s1 += total
        s2 += torch.mul(lg, lg, out=sq[:k]).sum(dtype=torch.float64).item()
        n_zero += nz
        n_nonfinite += nnf
        n_fin += k - nz - nnf
    return torch.tensor([n_fin, s1, s2, n_zero, n_nonfinite], dtype=torch.float64)


def merge_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine the statistics of two disjoint pieces (chunks, ranks): they are plain sums."""
    _check_stats(a)
    _check_stats(b)
    return a.to(torch.float64) + b.to(torch.float64)


def _check_stats(stats: torch.Tensor) -> None:
    if not isinstance(stats, torch.Tensor) or stats.shape != (STATS_LEN,):
        raise ValueError(f"stats must be a tensor of shape ({STATS_LEN},), got "
                         f"{getattr(stats, 'shape', type(stats).__name__)}")
    if not stats.dtype.is_floating_point:
        raise TypeError(f"stats must be floating (float64), got {stats.dtype}")
    s = stats.tolist()
    if not all(math.isfinite(v) for v in s) or min(s[0], s[2], s[3], s[4]) < 0:
        raise ValueError(f"stats are not valid moment statistics: {s}")


@dataclass(frozen=True)
class LognormalFit:
    """Fit of |g| ~ 2**N(mu_log2, sigma_log2**2) over the finite nonzero entries.

    ``zero_fraction`` = exact zeros / numel (numel counts every element, non-finite included).
    With no finite nonzero entry (all zeros or all non-finite) mu and sigma are NaN and
    ``usable`` is False: callers must check it before using mu/sigma.
    """

    mu_log2: float
    sigma_log2: float
    zero_fraction: float
    nonfinite_count: int
    numel: int

    @property
    def mu_ln(self) -> float:
        """Mean of ln|g| (Eq. 5-8 units): log2 units times ln 2."""
        return self.mu_log2 * LN2

    @property
    def sigma_ln(self) -> float:
        """Standard deviation of ln|g|."""
        return self.sigma_log2 * LN2

    @property
    def usable(self) -> bool:
        """True when at least one finite nonzero entry was seen (mu/sigma are finite numbers)."""
        return math.isfinite(self.mu_log2) and math.isfinite(self.sigma_log2)


def fit_from_stats(stats: torch.Tensor) -> LognormalFit:
    """Lognormal fit from ``moment_stats`` (maximum likelihood: population variance, ddof=0).

    Variance = E[l^2] - E[l]^2 in float64, clamped at 0: fine unless |mu| / sigma > ~1e6.
    Raises ValueError when the statistics describe zero elements.
    """
    _check_stats(stats)
    n, s1, s2, nz, nnf = stats.tolist()
    numel = n + nz + nnf
    if numel == 0:
        raise ValueError("cannot fit an empty tensor (statistics of zero elements)")
    if n > 0:
        mu = s1 / n
        sigma = math.sqrt(max(s2 / n - mu * mu, 0.0))
    else:
        mu = sigma = math.nan
    return LognormalFit(mu, sigma, nz / numel, int(nnf), int(numel))


def fit_lognormal(x: torch.Tensor) -> LognormalFit:
    """Fit a tensor: TypeError on non-floating dtype, ValueError on an empty tensor."""
    _check_float_tensor(x)
    if x.numel() == 0:
        raise ValueError("cannot fit an empty tensor")
    return fit_from_stats(moment_stats(x))


# --------------------------------------------------------------------------- KS distances


def _finite_nonzero_sample(x: torch.Tensor, max_samples: int, seed: int) -> np.ndarray:
    """Finite nonzero values of x as float64 numpy; a deterministic subsample (with
    replacement, counter-based hash indices) when there are more than ``max_samples``."""
    _check_float_tensor(x)
    v = x.detach().reshape(-1).to(torch.float64)
    v = v[torch.isfinite(v) & (v != 0)].cpu()
    if v.numel() < 2:
        raise ValueError(f"need at least 2 finite nonzero values for a KS distance, got {v.numel()}")
    if v.numel() > max_samples:
        idx = (random_u32(seed, torch.arange(max_samples, dtype=torch.int64)) * v.numel()) >> 32
        v = v[idx]
    return v.numpy()


def _ks_vs_fitted_normal(values: np.ndarray) -> float:
    """sup |F_n - Phi((v - mean)/std)| with the mean and std fitted to ``values``."""
    v = np.sort(values)
    std = v.std()
    if std == 0:
        return 1.0 - 1.0 / v.size  # a point mass vs a normal: the jump at the mean is everything
    cdf = ndtr((v - v.mean()) / std)
    n = v.size
    upper = np.arange(1, n + 1) / n - cdf
    lower = cdf - np.arange(0, n) / n
    return float(max(upper.max(), lower.max()))


def ks_distance_normal(x: torch.Tensor, *, max_samples: int = KS_MAX_SAMPLES, seed: int = KS_SEED) -> float:
    """KS distance of the signed finite nonzero values g to a normal with their mean and std.

    Zeros are excluded here too (ReLU zeros are a point mass that neither model describes),
    as in paper 001, Table 1.
    """
    return _ks_vs_fitted_normal(_finite_nonzero_sample(x, max_samples, seed))


def ks_distance_lognormal(x: torch.Tensor, *, max_samples: int = KS_MAX_SAMPLES, seed: int = KS_SEED) -> float:
    """KS distance of |g| (finite nonzero) to a fitted lognormal = that of log|g| to a fitted
    normal (KS is invariant under the monotone map log)."""
    return _ks_vs_fitted_normal(np.log(np.abs(_finite_nonzero_sample(x, max_samples, seed))))


# --------------------------------------------------------------------------- Eq. (4): FP format error


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


# --------------------------------------------------------------------------- Eq. (8): stochastic pruning


def _check_lognormal(mu_ln: float, sigma_ln: float) -> None:
    if not math.isfinite(mu_ln):
        raise ValueError(f"mu_ln must be finite, got {mu_ln!r}")
    if not (math.isfinite(sigma_ln) and sigma_ln >= 0):
        raise ValueError(f"sigma_ln must be finite and >= 0, got {sigma_ln!r}")


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")


_DEGENERATE_SIGMA = 1e-9  # below this, |g| is treated as the constant e^mu


def _sparsity_t(t: float, sigma: float) -> float:
    """Eq. (8) in the standardised threshold t = (ln alpha - mu) / sigma:
    S = Phi(t) - e^{sigma^2/2 - sigma t} Phi(t - sigma) = Phi(t) (1 - e^d), with
    d = log E[|g|/alpha | |g| < alpha] <= 0 formed in log space (log_ndtr) so that nothing
    overflows and -expm1 keeps the small difference accurate."""
    lp = float(log_ndtr(t))
    d = 0.5 * sigma * sigma - sigma * t + float(log_ndtr(t - sigma)) - lp
    return math.exp(lp) * -math.expm1(min(d, 0.0))


def pruning_sparsity(alpha: float, mu_ln: float, sigma_ln: float) -> float:
    """Expected fraction of zeros after stochastic pruning (Eq. 5) of |g| ~ Lognormal(mu, sigma)
    (ln units) at threshold alpha: P(|g| < alpha) - E[|g|/alpha ; |g| < alpha] (Eq. 8)."""
    _check_alpha(alpha)
    _check_lognormal(mu_ln, sigma_ln)
    if alpha == 0:
        return 0.0
    if sigma_ln < _DEGENERATE_SIGMA:  # |g| = c: zero with probability 1 - c/alpha when alpha > c
        return max(0.0, -math.expm1(mu_ln - math.log(alpha)))
    return _sparsity_t((math.log(alpha) - mu_ln) / sigma_ln, sigma_ln)


_T_LO = -40.0  # S(-40) ~ Phi(-40) ~ 1e-350: below every sparsity of interest


def _t_for_sparsity(sparsity: float, sigma: float) -> float:
    """t with _sparsity_t(t, sigma) = sparsity. For large t, S ~ 1 - e^{sigma^2/2 - sigma t},
    so the upper end of the bracket must grow like 1/sigma: expand it until it brackets."""
    hi = 40.0
    while _sparsity_t(hi, sigma) < sparsity:
        hi *= 4.0
        if hi > 1e300:
            raise ValueError(f"no threshold reaches sparsity {sparsity} (sigma_ln={sigma})")
    return brentq(lambda u: _sparsity_t(u, sigma) - sparsity, _T_LO, hi, xtol=1e-13, rtol=1e-15, maxiter=200)


def pruning_threshold(sparsity: float, mu_ln: float, sigma_ln: float) -> float:
    """Threshold alpha at which stochastic pruning of Lognormal(mu_ln, sigma_ln) gives the
    expected ``sparsity`` (inverse of Eq. 8): brentq on t = (ln alpha - mu) / sigma, where
    S is strictly increasing. Tested for mu in [-20, 5], sigma in [0.5, 6], S in [0.05, 0.99];
    also valid for small sigma (down to 1e-9; below that |g| is taken as the constant e^mu)."""
    _check_lognormal(mu_ln, sigma_ln)
    if not (0.0 < sparsity < 1.0):
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    if sigma_ln < _DEGENERATE_SIGMA:
        return math.exp(mu_ln) / (1.0 - sparsity)
    return math.exp(mu_ln + sigma_ln * _t_for_sparsity(sparsity, sigma_ln))


def pruning_threshold_for(fit: LognormalFit, sparsity: float) -> float:
    """Threshold for a fitted tensor whose exact zeros already count towards ``sparsity``:
    solve for S' = (S - z) / (1 - z) among the nonzeros; S <= z gives 0.0 (nothing to prune).

    Raises ValueError when ``sparsity`` is outside [0, 1) or the fit is not usable while
    pruning is still needed.
    """
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    z = fit.zero_fraction
    if sparsity <= z:
        return 0.0
    if not fit.usable:
        raise ValueError("the fit has no finite nonzero entries (fit.usable is False)")
    return pruning_threshold((sparsity - z) / (1.0 - z), fit.mu_ln, fit.sigma_ln)


def _log_cosine_t(t: float, sigma: float, z_max: float = math.inf) -> float:
    """log of the pruning cosine, cos^2 = E[g^2] / E[g_hat^2] with
    E[g_hat^2] = E[g^2 ; |g| >= a] + a E[|g| ; |g| < a] (NOTES, App. A.9), for
    ln|g| = mu + sigma Z, Z truncated to Z <= z_max, t = (ln a - mu) / sigma. Dividing through
    by e^{2mu + 2 sigma^2}, with s = sigma:

        t < z_max:  cos^-2 = 1 + delta,  delta = Phi(t - 2s) (e^D - 1) / Phi(z_max - 2s),
                    D = s t - 3 s^2 / 2 + log Phi(t - s) - log Phi(t - 2s) >= 0
                    (delta = E[g_hat^2 - g^2 ; |g| < a] / E[g^2]: log1p/expm1 keep a cosine
                    within 1e-300 of 1 exact, which the heterogeneous allocation needs);
        t >= z_max: cos^-2 = e^{s t - 3 s^2 / 2} Phi(z_max - s) / Phi(z_max - 2s).
    """
    s = sigma
    log_num = float(log_ndtr(z_max - 2 * s))
    if t < z_max:
        lp2 = float(log_ndtr(t - 2 * s))
        d = s * t - 1.5 * s * s + float(log_ndtr(t - s)) - lp2
        return -0.5 * math.log1p(math.exp(lp2 - log_num) * math.expm1(max(d, 0.0)))
    return -0.5 * (s * t - 1.5 * s * s + float(log_ndtr(z_max - s)) - log_num)


def pruning_cosine(alpha: float, mu_ln: float, sigma_ln: float, *, upper_quantile: float | None = None) -> float:
    """Expected cosine similarity between g and its stochastic pruning at threshold alpha,
    sqrt(E[g^2] / E[g_hat^2]) (unbiased pruning: E[g g_hat] = E[g^2]; NOTES, App. A.9).

    ``upper_quantile`` (e.g. 0.999) truncates the lognormal above that quantile, as the
    authors do: the untruncated E[g^2] is dominated by a tail no finite tensor samples.
    """
    _check_alpha(alpha)
    _check_lognormal(mu_ln, sigma_ln)
    z_max = math.inf
    if upper_quantile is not None:
        if not 0.5 < upper_quantile < 1.0:
            raise ValueError(f"upper_quantile must be in (0.5, 1), got {upper_quantile!r}")
        z_max = float(ndtri(upper_quantile))
    if alpha == 0:
        return 1.0
    if sigma_ln < _DEGENERATE_SIGMA:  # |g| = c: cos^2 = c / alpha for alpha > c
        return math.sqrt(min(1.0, math.exp(mu_ln - math.log(alpha))))
    return math.exp(_log_cosine_t((math.log(alpha) - mu_ln) / sigma_ln, sigma_ln, z_max))


# --------------------------------------------------------------------------- heterogeneous sparsity

_MAX_LAYER_SPARSITY = 0.999  # per-layer cap among nonzeros: keep every layer's signal alive


class _Layer:
    """One layer's sparsity as a function of the common cosine c (zeros included, capped)."""

    def __init__(self, fit: LognormalFit, z_max: float):
        self.z = fit.zero_fraction
        self.z_max = z_max
        self.fixed = None if fit.usable else (1.0 if self.z >= 1.0 else self.z)  # nothing prunable
        self.sigma = fit.sigma_ln
        self.degenerate = fit.usable and self.sigma < _DEGENERATE_SIGMA
        if self.fixed is None and not self.degenerate:
            self.t_cap = _t_for_sparsity(_MAX_LAYER_SPARSITY, self.sigma)
            self.log_cos_cap = _log_cosine_t(self.t_cap, self.sigma, z_max)
        elif self.degenerate:  # |g| constant: cos^2 = 1 - S
            self.log_cos_cap = 0.5 * math.log1p(-_MAX_LAYER_SPARSITY)
        else:
            self.log_cos_cap = 0.0

    def sparsity(self, log_c: float) -> float:
        if self.fixed is not None:
            return self.fixed
        if log_c <= self.log_cos_cap:
            inner = _MAX_LAYER_SPARSITY
        elif log_c >= 0.0:
            inner = 0.0
        elif self.degenerate:
            inner = -math.expm1(2.0 * log_c)
        else:
            t = brentq(lambda u: _log_cosine_t(u, self.sigma, self.z_max) - log_c, _T_LO, self.t_cap,
                       xtol=1e-13, rtol=1e-15, maxiter=200)
            inner = _sparsity_t(t, self.sigma)
        return self.z + (1.0 - self.z) * inner


def allocate_sparsity(fits: Sequence[LognormalFit], numels: Sequence[int], budget: float, *,
                      min_cosine: float | None = None,
                      upper_quantile: float | str | None = "numel") -> list[float]:
    """Per-layer sparsities with element-weighted mean ``budget`` that equalise the expected
    pruning cosine (``pruning_cosine``) across layers (paper 001 Sec. 5.3 / App. A.9: layers
    whose cosine would drop most get lower sparsity; for a lognormal those are the layers with
    the smaller sigma, whose energy is not concentrated in a few large entries).

    Root finding (brentq) on log(-log c) of the common cosine c: each layer's sparsity at
    cosine c increases as c falls. Exact zeros count towards a layer's sparsity and cannot be
    undone, and a layer prunes at most 99.9% of its nonzeros (at the cap its cosine may sit
    above c): a budget outside what those allow raises ValueError, as does a common cosine below
    ``min_cosine`` (the budget is too aggressive for that quality floor).

    ``upper_quantile`` truncates each lognormal for the cosine (see ``pruning_cosine``). The
    default "numel" truncates layer i at quantile 1 - 1/m_i, m_i = numels[i] (1 - zero
    fraction) its nonzero count, about where its largest sampled entry lies: untruncated, E[g^2] of a sigma_ln >= 3 lognormal sits in a tail that no
    tensor samples, its analytic cosine stays ~1 up to 99% sparsity, and such layers would be
    pruned to the cap. None uses the untruncated cosine; a float, one quantile for all layers.
    """
    fits, numels = list(fits), [int(n) for n in numels]
    if not fits or len(fits) != len(numels):
        raise ValueError("fits and numels must be non-empty and of equal length")
    if any(n <= 0 for n in numels):
        raise ValueError("numels must be positive")
    if not (0.0 <= budget < 1.0):
        raise ValueError(f"budget must be in [0, 1), got {budget!r}")
    if min_cosine is not None and not (0.0 < min_cosine <= 1.0):
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine!r}")
    if upper_quantile == "numel":
        nonzeros = [n * (1.0 - f.zero_fraction) for f, n in zip(fits, numels)]
        z_maxs = [float(ndtri(1.0 - 1.0 / m)) if m > 2 else math.inf for m in nonzeros]
    elif upper_quantile is None:
        z_maxs = [math.inf] * len(fits)
    elif isinstance(upper_quantile, float) and 0.5 < upper_quantile < 1.0:
        z_maxs = [float(ndtri(upper_quantile))] * len(fits)
    else:
        raise ValueError(f'upper_quantile must be "numel", None or a float in (0.5, 1), got {upper_quantile!r}')
    layers = [_Layer(f, zm) for f, zm in zip(fits, z_maxs)]
    total = float(sum(numels))

    def mean_at(log_c: float) -> float:
        return sum(n * layer.sparsity(log_c) for layer, n in zip(layers, numels)) / total

    u_max = 1.0 - min(layer.log_cos_cap for layer in layers)  # every layer at its cap
    lo_mean, hi_mean = mean_at(0.0), mean_at(-u_max)
    if not (lo_mean - 1e-12 <= budget <= hi_mean + 1e-12):
        raise ValueError(f"budget {budget} is outside the feasible range [{lo_mean:.6f}, {hi_mean:.6f}] "
                         "(exact zeros already present / 99.9% per-layer cap)")
    # Solve on v = log u: near c = 1 a layer's sparsity grows like a power of u, so a fixed
    # tolerance on u itself would miss the budget by far more than 1e-6.
    v_lo, v_hi = -300.0, math.log(u_max)
    if budget >= hi_mean:
        u = u_max
    elif mean_at(-math.exp(v_lo)) >= budget:
        u = 0.0 if budget <= lo_mean else math.exp(v_lo)
    else:
        v = brentq(lambda w: mean_at(-math.exp(w)) - budget, v_lo, v_hi, xtol=1e-14, rtol=1e-15, maxiter=500)
        u = math.exp(v)
    if min_cosine is not None and -u < math.log(min_cosine):
        raise ValueError(f"budget {budget} needs a common cosine {math.exp(-u):.6f} below min_cosine {min_cosine}")
    return [layer.sparsity(-u) for layer in layers]
