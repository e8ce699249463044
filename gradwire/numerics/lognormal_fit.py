"""Lognormal fit of neural gradients and Kolmogorov-Smirnov distances (paper 001, Sec. 3, Table 1).

Paper 001 (Chmiel et al., ICLR 2021, "Neural gradients are near-lognormal") models |g| as
lognormal. This module computes one-pass, additive moment statistics of log2|g| over the finite
nonzero entries (``moment_stats``; mergeable across chunks and ranks), the fit in log2 and ln
units (``LognormalFit``), and the KS distances of a tensor to a fitted normal and to a fitted
lognormal. Zeros and non-finite entries are counted separately (NOTES-ON-SEEDS.md, Units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtr

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
    # max_samples < 2 would fit a normal to one point (or none): a meaningless distance.
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise ValueError(f"max_samples must be an int >= 2, got {max_samples!r}")
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
