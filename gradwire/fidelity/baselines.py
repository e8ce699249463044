"""The pruning baselines of paper 001 Fig. 5, as codecs that write ordinary prune packets.

* ``ATPPruneCodec``: stochastic pruning (Eq. 5) at the threshold ATP (Ye et al. 2019) derives from
  a *normal* model of g, fitted to each tensor (``numerics.pruning.normal_threshold``). On
  near-lognormal gradients it misses the requested sparsity; the miss is predicted by Eq. (8) at
  ATP's threshold (``predicted_atp_sparsity``), which is what the fidelity suite checks in training.
* ``TopKCodec``: deterministic magnitude pruning to exactly ``sparsity`` (SAW's "top-k"): biased,
  the kept values are sent as they are (FP8 codes by default, like the prune codec).

Both inherit ``PruneCodec``'s packet layout and decode, so a receiver needs nothing new; only the
sender's threshold differs. They are research baselines, not registry codecs.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from gradwire.codec.prune import PruneCodec
from gradwire.numerics.pruning import effective_alpha, normal_sparsity, normal_threshold, topk_threshold


class ATPPruneCodec(PruneCodec):
    name = "prune"  # the packets are prune packets

    def threshold(self, x: torch.Tensor, fit: Any | None = None) -> float:
        if self.sparsity == 0 or x.numel() == 0 or not bool(torch.isfinite(x).any()):
            return 0.0
        return effective_alpha(normal_threshold(x, self.sparsity), x.dtype)


class TopKCodec(PruneCodec):
    name = "prune"

    def threshold(self, x: torch.Tensor, fit: Any | None = None) -> float:
        return 0.0  # encode has already zeroed everything below the quantile: prune nothing more

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        if self.sparsity > 0 and x.numel() and bool(torch.isfinite(x).any()):
            a = topk_threshold(x, self.sparsity)
            x = torch.where(x.abs() > a, x, torch.zeros_like(x))
        return super().encode(x, seed=seed, fit=fit)


def predicted_atp_sparsity(mu_ln: float, sigma_ln: float, sparsity: float) -> float:
    """Expected zero fraction of ATP on an exactly lognormal |g| (ln units, no zeros): ATP's
    normal fit matches E|g| = exp(mu + sigma^2 / 2), so its threshold is c * sqrt(pi/2) E|g| with
    ``normal_sparsity(c) = sparsity``, and stochastic pruning at it zeroes Eq. (8) of that."""
    from scipy.optimize import brentq

    from gradwire.numerics.pruning_threshold import pruning_sparsity

    hi = 1.0
    while normal_sparsity(hi) < sparsity:
        hi *= 2.0
    c = brentq(lambda u: normal_sparsity(u) - sparsity, 0.0, hi, xtol=1e-14, rtol=1e-12)
    alpha = c * math.sqrt(math.pi / 2.0) * math.exp(mu_ln + 0.5 * sigma_ln ** 2)
    return pruning_sparsity(alpha, mu_ln, sigma_ln)
