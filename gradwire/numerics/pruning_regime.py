"""How much a tensor loses to stochastic pruning, measured on the tensor itself.

The analytic pruning cosine (``sparsity_allocation.pruning_cosine``) holds for a lognormal |g|.
Neural gradients at a transformer's residual stream are closer to Gaussian (sigma(log2|g|) ~ 1.6,
the value of a normal's log-magnitude, with the left skew of one), and there the lognormal model
over-predicts the cosine (issue 17: 0.75 predicted, 0.55 measured at 80%). What the receiver gets
from stochastic pruning of a *given* tensor at threshold a has an exact conditional expectation,
with no distributional assumption: an entry with |g| < a becomes +-a with probability |g|/a, so

    E||g_hat||^2 = sum_{|g| >= a} g^2 + a sum_{|g| < a} |g|,     E[g . g_hat] = ||g||^2,
    expected cosine  = sqrt(||g||^2 / E||g_hat||^2)   (the ratio-of-expectations cosine),
    expected zeros   = sum_{|g| < a} (1 - |g| / a) / n.

The policy uses these to warn, or cap the sparsity, when the measured gradients leave the regime
where pruning is cheap (``policy.BoundaryPolicy``). Kept values are taken exactly (an FP8 kept
value adds its own, much smaller, error).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _abs64(x: torch.Tensor) -> torch.Tensor:
    a = x.detach().reshape(-1).to(torch.float64).abs()
    return a[torch.isfinite(a)]


def expected_cosine(x: torch.Tensor, alpha: float) -> float:
    """sqrt(||x||^2 / E||stochastic_prune(x, alpha)||^2) over the finite entries (1.0 for an
    all-zero tensor or alpha = 0)."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    a = _abs64(x)
    e2 = float((a * a).sum())
    if e2 == 0.0 or alpha == 0.0:
        return 1.0
    small = a < alpha
    added = float((alpha * a[small] - a[small] ** 2).sum())  # E g_hat^2 - g^2 on the pruned entries
    return math.sqrt(e2 / (e2 + added))


def expected_sparsity(x: torch.Tensor, alpha: float) -> float:
    """Expected fraction of zeros after stochastic pruning of ``x`` at ``alpha`` (finite entries;
    exact zeros count as zeros)."""
    a = _abs64(x)
    if a.numel() == 0:
        return math.nan
    if alpha <= 0:
        return float((a == 0).double().mean())
    small = a < alpha
    return float((1.0 - a[small] / alpha).sum()) / a.numel()


def max_sparsity_for_cosine(x: torch.Tensor, threshold: Callable[[float], float], sparsity: float,
                            min_cosine: float, tol: float = 1e-3) -> float:
    """The largest s <= ``sparsity`` whose threshold ``threshold(s)`` keeps
    ``expected_cosine(x, threshold(s)) >= min_cosine`` (bisection: the threshold, and so the
    loss, grows with s). Returns ``sparsity`` itself when it already meets the floor, 0.0 when
    no s > 0 does (to within ``tol``)."""
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if sparsity == 0.0 or expected_cosine(x, threshold(sparsity)) >= min_cosine:
        return sparsity
    lo, hi = 0.0, sparsity  # cos(lo) >= min_cosine > cos(hi)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if expected_cosine(x, threshold(mid)) >= min_cosine:
            lo = mid
        else:
            hi = mid
    return lo
