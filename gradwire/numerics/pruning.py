"""Stochastic pruning of neural gradients (paper 001, Sec. 5, Eq. 5) and the Fig. 5 baselines.

This module is the semantic oracle: the codec, the C++ and the CUDA kernels must reproduce
``stochastic_prune`` bit for bit. The exact float32 semantics, per element ``i`` of ``x``
(flat row-major index ``i``)::

    a   = float32(dtype(float32(alpha)))  # alpha -> float32 -> x.dtype, widened back (see below)
    if a <= 0: out = x                # identity (nothing to prune)
    xf  = float32(x[i])               # exact for float16 / bfloat16 / float32
    ax  = |xf|
    if not (ax <= a):                 # |x| > a, +-Inf and NaN (comparison false) -> kept as is
        out = xf
    else:
        eps = uniform(seed, offset + i)      # rng.uniform: 24-bit float32 in [0, 1)
        t   = a * eps                        # one float32 multiply (round to nearest even)
        if ax >= t and ax > 0: out = copysign(a, xf)   # rounded up to the threshold
        else:                  out = +0.0               # pruned (exact zeros stay zeros)
    result = dtype(out)               # exact: out is xf, +-a (representable), or 0

Why ``alpha`` is rounded to ``x.dtype`` first: the output must hold +-a exactly, otherwise the
bf16/fp16 result would round a and the operator would no longer be unbiased. For float32 inputs
this is just ``float32(alpha)``. The effective threshold is what ``prune_to_sparsity`` returns.

Properties (tested by Monte Carlo in tests/unit/test_pruning.py): for |x| <= a,
P(out = sign(x) a) = |x|/a (up to the 2**-24 resolution of eps: E[out] - x is O(a 2**-24)),
so E[out] = x (unbiased) and Var[out] = |x| (a - |x|); the expected
number of zeros is sum_i (1 - |x_i|/a) over the nonzero |x_i| <= a (plus the exact zeros).
Inf/NaN are data (DESIGN.md): they pass through unchanged.
"""
from __future__ import annotations

import math
import numbers

import torch
from scipy import optimize, special

from gradwire.numerics import rng

#: Input dtypes the float32 oracle accepts; each upcasts to float32 exactly.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (the float32 oracle upcasts exactly), "
            f"got {x.dtype}; convert float64 to float32 explicitly first"
        )


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a real number, got {type(sparsity).__name__}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


def effective_alpha(alpha: float, dtype: torch.dtype) -> float:
    """The threshold ``stochastic_prune`` really uses: alpha rounded to ``dtype``, as a float.

    Raises ValueError if alpha is not finite or overflows ``dtype``; returns 0.0 if alpha <= 0
    or underflows ``dtype`` (both mean: no pruning).
    """
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar, got a tensor of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if alpha <= 0:
        return 0.0
    # float32 first (the kernels take a float32 alpha), then x.dtype: a fixed double-rounding order.
    a = torch.tensor(float(alpha), dtype=torch.float32).to(dtype).to(torch.float32).item()
    if not math.isfinite(a):
        raise ValueError(f"alpha={alpha} overflows {dtype}")
    return a


def stochastic_prune(x: torch.Tensor, alpha: float, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Stochastic pruning T_{alpha,eps}(x) of paper 001, Eq. 5, with eps = uniform(seed, offset + i).

    Args:
        x: float32 / float16 / bfloat16 tensor, any shape (empty and 0-d included).
        alpha: threshold (a real number or a one-element tensor); <= 0 means identity.
        seed: 32-bit seed of the counter-based RNG (``rng.check_seed``).
        offset: counter of element 0 (chunked encoding: the chunk's first flat index), >= 0.

    Returns a new tensor of x's shape and dtype; see the module docstring for the exact rule.
    """
    _check_tensor(x)
    rng.check_seed(seed)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    a = effective_alpha(alpha, x.dtype)
    if a <= 0.0 or x.numel() == 0:
        return x.clone()
    xf = x.to(torch.float32)
    ax = xf.abs()
    a_t = torch.tensor(a, dtype=torch.float32, device=x.device)
    t = a_t * rng.uniform_like(seed, xf, offset)  # float32 a * eps, one rounding
    keep = ~(ax <= a_t)  # |x| > a, Inf, NaN: passed through (NaN compares false)
    up = (ax >= t) & (ax > 0)  # the rounded-up branch, probability |x| / a
    out = torch.where(up, torch.copysign(a_t.expand_as(xf), xf), torch.zeros_like(xf))
    out = torch.where(keep, xf, out)
    return out.to(x.dtype)


def prune_to_sparsity(x: torch.Tensor, sparsity: float, *, seed: int = 0, fit=None):
    """Stochastically prune ``x`` to an expected ``sparsity`` with the lognormal threshold (Eq. 8).

    The threshold comes from ``lognormal.pruning_threshold_for(fit, sparsity)``, with ``fit``
    defaulting to ``lognormal.fit_lognormal(x)``; the zero fraction is handled there
    (NOTES-ON-SEEDS.md, Eq. 8). Returns ``(pruned, alpha)`` where alpha is the effective threshold
    (rounded to x.dtype, see ``effective_alpha``), 0.0 when no pruning was needed.
    """
    _check_tensor(x)
    s = _check_sparsity(sparsity)
    # Imported here: lognormal.py is a sibling module that must not be needed by stochastic_prune.
    from gradwire.numerics import lognormal

    if fit is None:
        if x.numel() == 0:
            raise ValueError("prune_to_sparsity: cannot fit a lognormal to an empty tensor; pass fit=")
        fit = lognormal.fit_lognormal(x)
    alpha = float(lognormal.pruning_threshold_for(fit, s)) if s > 0 else 0.0
    a = effective_alpha(alpha, x.dtype)
    return stochastic_prune(x, a, seed=seed), a


def _finite_abs64(x: torch.Tensor) -> torch.Tensor:
    _check_tensor(x)
    ax = x.detach().to(torch.float64).abs().flatten()
    ax = ax[torch.isfinite(ax)]
    if ax.numel() == 0:
        raise ValueError("need at least one finite element to choose a threshold")
    return ax


def normal_sparsity(c: float) -> float:
    """Expected zero fraction of stochastic pruning at a = c * sigma when g ~ Normal(0, sigma^2).

    S = P(|g| < a) - E[|g| / a ; |g| < a] = erf(c/sqrt2) - sqrt(2/pi) (1 - exp(-c^2/2)) / c
    (half-normal analogue of paper 001, Eq. 6). Increasing in c, from 0 to 1.
    """
    if c <= 0:
        return 0.0
    return float(special.erf(c / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * -math.expm1(-0.5 * c * c) / c)


def normal_threshold(x: torch.Tensor, sparsity: float) -> float:
    """ATP baseline (Ye et al. 2019, paper 001 Fig. 5): threshold under a Gaussian assumption.

    Assumes g ~ Normal(0, sigma^2) with sigma estimated by matching E|g| = sigma sqrt(2/pi) over the
    finite entries (one cheap pass; ATP's exact estimator is not in our copy of the paper), and
    solves ``normal_sparsity(alpha / sigma) = sparsity`` for alpha with a bracketing root finder.
    On real (near-lognormal) gradients the achieved sparsity differs from the request: that
    mismatch is what the paper's Fig. 5 (right) shows. Returns 0.0 for sparsity 0 or an all-zero x.
    """
    s = _check_sparsity(sparsity)
    ax = _finite_abs64(x)
    sigma = math.sqrt(math.pi / 2.0) * ax.mean().item()
    if s == 0.0 or sigma == 0.0:
        return 0.0
    hi = 1.0
    while normal_sparsity(hi) < s:  # S(c) -> 1 as c -> inf, so this terminates
        hi *= 2.0
    c = optimize.brentq(lambda c: normal_sparsity(c) - s, 0.0, hi, xtol=1e-14, rtol=1e-12)
    return c * sigma


def topk_threshold(x: torch.Tensor, sparsity: float) -> float:
    """Exact magnitude quantile (the "top-k" baseline of paper 001, Fig. 5).

    Returns the k-th smallest |x| over the finite entries, k = ceil(sparsity * n) (1-based), i.e.
    the smallest threshold such that deterministic magnitude pruning of |x| <= threshold removes
    at least a ``sparsity`` fraction (exactly k elements when magnitudes are distinct). Returns
    0.0 for sparsity 0.

    It is NOT a threshold for ``stochastic_prune``: stochastic pruning at it zeroes each |x| below
    it only with probability 1 - |x|/threshold, so the achieved sparsity is
    sum_{|x_i| <= a} (1 - |x_i|/a) / n < sparsity (Fig. 5 right, "top-k + stochastic pruning").
    """
    s = _check_sparsity(sparsity)
    ax = _finite_abs64(x)
    # The 1e-9 absorbs binary rounding of s (0.9 * 10 = 9.000000000000002 must give k = 9).
    k = math.ceil(s * ax.numel() - 1e-9)
    if k == 0:
        return 0.0
    return torch.kthvalue(ax, k).values.item()
