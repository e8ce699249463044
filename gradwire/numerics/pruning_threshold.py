"""Eq. (8) of paper 001: the expected sparsity of stochastic pruning (Eq. 5) of a lognormal |g|
at threshold alpha, and its inverse (the analytic threshold for a requested sparsity).

Units: mu_ln and sigma_ln are the mean and standard deviation of ln|g| (NOTES-ON-SEEDS.md).
Eq. (8) is evaluated in a numerically stable form (log_ndtr, expm1) and inverted with a
bracketing root finder on the standardised threshold t = (ln alpha - mu) / sigma; tested over
mu in [-20, 5], sigma in [0.5, 6], S in [0.05, 0.99] (tests/unit/test_lognormal.py).
"""
from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr

from gradwire.numerics.lognormal_fit import LognormalFit

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
