"""Cosine similarity of stochastic pruning on a lognormal |g| and the heterogeneous per-layer
sparsity allocation built on it (paper 001, Sec. 5.3 / App. A.9, as re-derived in
NOTES-ON-SEEDS.md): layers get the sparsities that equalise their expected cosine under an
element-weighted budget. ln units (mu_ln, sigma_ln), as for Eq. (8).
"""
from __future__ import annotations

import math
from typing import Sequence

from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtri

from gradwire.numerics.lognormal_fit import LognormalFit
from gradwire.numerics.pruning_threshold import (
    _DEGENERATE_SIGMA,
    _T_LO,
    _check_alpha,
    _check_lognormal,
    _sparsity_t,
    _t_for_sparsity,
)

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
