"""Measure what a boundary's codec does to each gradient it encodes, during training.

``ProbedPolicy`` wraps a ``policy.BoundaryPolicy`` (everything else is delegated, so the
in-process pipeline and the heterogeneous allocation use it unchanged). ``encode`` remembers the
exact tensor; the matching ``decode`` compares it with what the receiver gets and appends a
``Probe`` record:

* ``cosine`` and ``added_var`` = ||g_hat - g||^2 / ||g||^2. For an unbiased codec
  E||g_hat||^2 = ||g||^2 + variance, so added_var estimates the relative variance the codec adds,
  and the analytic pruning cosine predicts it as 1 / cos^2 - 1;
* ``sparsity`` (exact zeros of g_hat) and, for prune packets, the threshold ``alpha`` from the
  packet header;
* the analytic view of the same tensor: a lognormal fit of g itself (ln units) and, at the alpha
  actually used, Eq. (8)'s expected sparsity and the analytic cosine
  (``sparsity_allocation.pruning_cosine``, truncated at the 1 - 1/n quantile as the allocation
  does, n the nonzero count), beside the exact conditional expectation for this tensor at that
  alpha (``numerics.pruning_regime``, no distributional assumption: the measured cosine matches it
  up to sampling noise and the FP8 kept values' small error, while the lognormal model is only as
  good as the fit), and the sparsity ATP's normal-model threshold would reach on a lognormal with
  g's fit (``baselines.predicted_atp_sparsity``: the numerics' prediction of ATP's miss).

Measurement happens in float64 on the host and costs about a millisecond per 16K-element tensor.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from gradwire.codec.header import parse_packet, unpack_params
from gradwire.codec.prune import PRUNE_PARAMS, PruneCodec


@dataclass
class Probe:
    step: int  # micro-batch counter of the policy
    boundary: int
    warmup: bool
    cosine: float
    added_var: float
    sparsity: float
    zero_fraction: float  # exact zeros already in g
    sigma_log2: float  # of g's nonzeros
    alpha: float  # prune threshold from the packet (NaN: not a prune packet)
    analytic_sparsity: float  # Eq. (8) at alpha for g's own lognormal fit (NaN: not prune)
    analytic_cosine: float  # pruning_cosine at alpha, truncated at 1 - 1/n (NaN: not prune)
    expected_cosine: float  # exact conditional expectation for this tensor at alpha (pruning_regime)
    expected_sparsity: float
    atp_predicted_sparsity: float  # what ATP would zero on a lognormal with g's fit (baselines)


def measure(g: torch.Tensor, y: torch.Tensor, packet: torch.Tensor, step: int, boundary: int,
            warmup: bool, target: float | None = None) -> Probe:
    from gradwire.numerics.lognormal import fit_lognormal
    from gradwire.numerics.pruning_threshold import pruning_sparsity
    from gradwire.numerics.sparsity_allocation import pruning_cosine

    gd, yd = g.detach().reshape(-1).double(), y.detach().reshape(-1).double()
    ok = torch.isfinite(gd)
    gd, yd = gd[ok], yd[ok]
    ng2, ny2 = float(gd @ gd), float(yd @ yd)
    cos = float(gd @ yd) / math.sqrt(ng2 * ny2) if ng2 > 0 and ny2 > 0 else math.nan
    added = float(((yd - gd) ** 2).sum()) / ng2 if ng2 > 0 else math.nan
    fit = fit_lognormal(g.detach().float())
    from gradwire.fidelity.baselines import predicted_atp_sparsity
    from gradwire.numerics.pruning_regime import expected_cosine, expected_sparsity

    alpha = a_sp = a_cos = e_cos = e_sp = atp = math.nan
    h, _ = parse_packet(packet)
    if h.codec_id == PruneCodec.codec_id:
        alpha = float(unpack_params(h, PRUNE_PARAMS, "prune")[0])
        n_nz = fit.numel * (1.0 - fit.zero_fraction)
        e_cos, e_sp = expected_cosine(g, alpha), expected_sparsity(g, alpha)
        if target and fit.usable and fit.sigma_ln > 0:
            atp = fit.zero_fraction + (1 - fit.zero_fraction) * predicted_atp_sparsity(fit.mu_ln, fit.sigma_ln, target)
        if fit.usable and alpha > 0 and n_nz > 2:
            z = fit.zero_fraction
            a_sp = z + (1 - z) * pruning_sparsity(alpha, fit.mu_ln, fit.sigma_ln)
            a_cos = pruning_cosine(alpha, fit.mu_ln, fit.sigma_ln, upper_quantile=1.0 - 1.0 / n_nz)
        elif alpha == 0:
            a_sp, a_cos = fit.zero_fraction, 1.0
    return Probe(step, boundary, warmup, cos, added, float((yd == 0).double().mean()), fit.zero_fraction,
                 fit.sigma_log2, alpha, a_sp, a_cos, e_cos, e_sp, atp)


class ProbedPolicy:
    """A ``BoundaryPolicy`` that records a ``Probe`` for every ``every``-th encoded tensor."""

    def __init__(self, inner, boundary: int, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.__dict__.update(_inner=inner, _boundary=boundary, _every=every, _pending=None, probes=[])

    def __getattr__(self, name):  # everything not defined here is the policy's
        return getattr(self._inner, name)

    def encode(self, x: torch.Tensor, step: int) -> torch.Tensor:
        packet = self._inner.encode(x, step)
        self._pending = (x, packet, step) if step % self._every == 0 else None
        return packet

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        y = self._inner.decode(packet, dtype=dtype)
        if self._pending is not None and self._pending[1] is packet:
            x, _, step = self._pending
            target = getattr(self._inner, "target_sparsity", None)
            self.probes.append(measure(x, y, packet, step, self._boundary, self._inner.in_warmup(step), target))
            self._pending = None
        return y

    def probe_dicts(self) -> list[dict]:
        return [asdict(p) for p in self.probes]
