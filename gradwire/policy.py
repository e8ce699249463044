"""The state of one compressed boundary (a pipeline send, a tensor-parallel collective).

Schedule, per step ``s`` (both ends of a link know ``s``, so they agree without messages):

* warm-up (``s < warmup_steps``): tensors go uncompressed (identity codec) while the sender
  accumulates lognormal moment statistics (``numerics.lognormal.moment_stats``, fused into the
  encode pass where the codec can);
* refresh (``s >= warmup_steps`` and ``(s - warmup_steps) % refresh_every == 0``): the statistics
  gathered since the last refresh become the running ``LognormalFit`` (mu, sigma of log2|g|),
  used for the next ``refresh_every`` steps. The codec derives from it the FP format split
  (paper 001 Eq. 4, for the configured bit width), the power-of-two scale, or the pruning
  threshold (Eq. 8); the values chosen travel in each packet's header, so the receiver needs no
  policy state to decode (``decode`` picks the codec by the header's codec id).

Statistics are gathered at every warm-up step and, after warm-up, at the steps with
``(s - warmup_steps) % stats_every == 0`` (every step by default). Since ``stats_every <=
refresh_every``, every refresh window holds at least one of them. On the other steps the encode
skips the statistics: a bf16 FP encode on CPU is 10-22% faster without them
(bench/kernels.py); on a GPU the saving is a block reduction.

Heterogeneous sparsity (paper 001 Sec. 5.3): ``allocate_heterogeneous(policies, budget)`` gives
each pruning boundary its own sparsity so that the element-weighted mean meets the budget while
the expected pruning cosines are equalised (``numerics.lognormal.allocate_sparsity``).

Pruning regime (issue 17): stochastic pruning is cheap only where |g| is wide (sigma(log2|g|)
>= ~3, paper 001 Table 2); on near-Gaussian gradients (sigma(log2|g|) ~ 1.6, e.g. a transformer's
residual stream) 80% pruning keeps a cosine of ~0.55 and costs training loss. At every refresh a
prune boundary computes, on the tensor in hand, the exact expected cosine of its pruning at the
configured sparsity (``numerics.pruning_regime.expected_cosine``, no distributional assumption).
Below ``warn_cosine`` (default 0.9) it warns once (``PruningRegimeWarning``); with ``min_cosine``
set it also lowers the sparsity, until the next refresh, to the largest one that keeps that cosine
(and returns to the configured one when the gradients allow it). ``events`` lists the checks.

Counters (``telemetry()``): raw bytes, bytes sent, steps, and, every ``sample_every`` steps, the
relative error, the cosine similarity and the achieved sparsity of the decoded tensor.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from gradwire.codec.base import Codec
from gradwire.numerics.rng import check_seed, derive_seed


def _build(config: Mapping[str, Any] | Codec) -> Codec:
    if isinstance(config, Codec):
        return config
    from gradwire.codec.registry import build_codec

    return build_codec(dict(config))


def _identity() -> Codec:
    from gradwire.codec.baselines import IdentityCodec

    return IdentityCodec()


def _check_cosine(where: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0):
        raise ValueError(f"{where} must be None or a number in (0, 1], got {v!r}")


class PruningRegimeWarning(UserWarning):
    """Stochastic pruning at the configured sparsity loses more than ``warn_cosine`` allows on
    the gradients this boundary actually carries."""


@dataclass(frozen=True)
class PolicyConfig:
    """Configuration of one boundary.

    ``codec``: a ``build_codec`` mapping (e.g. ``{"name": "fp", "bits": 6}``) or a Codec.
    ``warmup_steps``: steps sent uncompressed while statistics are collected (>= 0).
    ``refresh_every``: steps between refreshes of the fit (K >= 1).
    ``stats_every``: after warm-up, statistics are gathered every this many steps (1 <= k <= K).
    ``sample_every``: every how many steps to measure error/cosine/sparsity (0: never; costs a
    decode on the sender).
    ``base_seed``/``boundary_id``: step ``s`` encodes with ``derive_seed(base_seed, s, boundary_id)``.
    ``warn_cosine``: prune codecs warn once when the expected cosine at the configured sparsity
    falls below it (None: never). ``min_cosine``: prune codecs lower their sparsity to keep at
    least this expected cosine (None: never; module docstring, "Pruning regime").
    """

    codec: Any = field(default_factory=lambda: {"name": "fp", "bits": 6})
    warmup_steps: int = 0
    refresh_every: int = 50
    stats_every: int = 1
    sample_every: int = 0
    base_seed: int = 0
    boundary_id: int = 0
    warn_cosine: float | None = 0.9
    min_cosine: float | None = None

    def __post_init__(self):
        for name, lo in (("warmup_steps", 0), ("refresh_every", 1), ("stats_every", 1), ("sample_every", 0),
                         ("boundary_id", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"PolicyConfig.{name} must be an int >= {lo}, got {v!r}")
        if self.stats_every > self.refresh_every:
            raise ValueError(f"PolicyConfig.stats_every ({self.stats_every}) must be <= refresh_every "
                             f"({self.refresh_every}): otherwise some refreshes would have no statistics")
        check_seed(self.base_seed)
        for name in ("warn_cosine", "min_cosine"):
            _check_cosine(f"PolicyConfig.{name}", getattr(self, name))
        if not isinstance(self.codec, (Mapping, Codec)):
            raise TypeError(f"PolicyConfig.codec must be a codec config mapping or a Codec, "
                            f"got {type(self.codec).__name__}")


class BoundaryPolicy:
    """Encode/decode for one boundary with the schedule above. API used by the integrations:
    ``encode(x, step) -> packet``, ``decode(packet, dtype=None)``, ``codec_at(step)``,
    ``packed_size(shape, dtype, step)`` (None for variable-size codecs), ``observe(stats)``,
    ``fit``, ``set_sparsity(s)``, ``telemetry()``."""

    def __init__(self, config: PolicyConfig | None = None, **kwargs: Any):
        if config is None:
            config = PolicyConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass a PolicyConfig or keyword arguments, not both")
        self.config = config
        self.codec = _build(config.codec)
        self._identity = _identity()
        self._pending: torch.Tensor | None = None  # stats since the last refresh
        self._last_refresh: int | None = None
        self.fit = None  # running LognormalFit (None until the first refresh with data)
        self.last_numel = 0
        self.min_cosine = config.min_cosine
        self.target_sparsity = getattr(self.codec, "sparsity", None)  # configured (before any cap)
        self.events: list[dict[str, Any]] = []  # pruning-regime checks, one per refresh
        self._warned = False
        self._regime_step: int | None = None
        self.counters: dict[str, float] = dict(steps=0, warmup_steps=0, raw_bytes=0, sent_bytes=0,
                                               samples=0, rel_error_sum=0.0, cosine_sum=0.0,
                                               sparsity_sum=0.0, refreshes=0)

    def wire_settings(self) -> dict[str, Any]:
        """The settings besides the codec that change this boundary's packets (their codec and
        size per step): both ends exchange them in the handshake (``comm.handshake``)."""
        return {"warmup_steps": self.config.warmup_steps}

    # --- schedule
    def in_warmup(self, step: int) -> bool:
        return step < self.config.warmup_steps

    def codec_at(self, step: int) -> Codec:
        """The codec both ends use at ``step`` (identity during warm-up)."""
        return self._identity if self.in_warmup(step) else self.codec

    def collects_stats(self, step: int) -> bool:
        """Whether the encode at ``step`` gathers statistics for the next refresh."""
        w = self.config.warmup_steps
        return step < w or (step - w) % self.config.stats_every == 0

    def seed(self, step: int) -> int:
        return derive_seed(self.config.base_seed, step, self.config.boundary_id)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype, step: int) -> int | None:
        """Exact packet size at ``step`` (a receiver pre-allocates it); None if variable-size."""
        c = self.codec_at(step)
        return c.packed_size(shape, dtype) if c.fixed_rate else None

    def max_packed_size(self, shape: Sequence[int], dtype: torch.dtype, step: int) -> int:
        return self.codec_at(step).max_packed_size(shape, dtype)

    def _maybe_refresh(self, step: int) -> None:
        w, k = self.config.warmup_steps, self.config.refresh_every
        if step < w or (step - w) % k or self._last_refresh == step:
            return
        self._last_refresh = step
        pending = None if self._pending is None else self._pending.cpu()  # the one host read
        if pending is not None and pending[0] > 0:
            from gradwire.numerics.lognormal import fit_from_stats

            self.fit = fit_from_stats(pending)
            self.counters["refreshes"] += 1
        self._pending = None

    def observe(self, stats: torch.Tensor) -> None:
        """Add moment statistics (``moment_stats`` layout) to those of the next refresh, e.g.
        stats merged over the ranks of a tensor-parallel group.

        Stays on the statistics' device and never reads values back (no ``.cpu()``/``.tolist()``):
        on CUDA a host read would synchronise the stream at every encode and stall the backward
        pass (DESIGN.md: statistics never block the critical path). The one device-to-host copy
        happens at a refresh, every ``refresh_every`` steps, where ``fit_from_stats`` validates
        the sums."""
        if not isinstance(stats, torch.Tensor) or stats.shape != (5,):
            raise ValueError(f"stats must be a tensor of shape (5,) (moment_stats layout), got "
                             f"{getattr(stats, 'shape', type(stats).__name__)}")
        stats = stats.detach().to(torch.float64)
        if self._pending is None:
            self._pending = stats.clone()
        else:  # merge_stats(a, b) is a plain sum, but it validates with a host read
            self._pending = self._pending + stats.to(self._pending.device)

    def _encode_with_stats(self, codec: Codec, x: torch.Tensor, seed: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packet and moment statistics of ``x``. A codec that does not fuse the statistics into
        its encode (the ``Codec`` default computes them with the reference, which reads partial
        sums back to the host) gets them from ``ops.moment_stats`` on accelerators: a device
        kernel, no synchronisation."""
        if x.device.type != "cpu" and type(codec).encode_with_stats is Codec.encode_with_stats:
            from gradwire import ops

            packet = codec.encode(x, seed=seed, fit=self.fit)
            return packet, ops.moment_stats(x)
        packet, stats = codec.encode_with_stats(x, seed=seed, fit=self.fit)
        return packet, stats

    # --- data path
    def encode(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The packet for ``x`` at ``step``; updates statistics and counters."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._maybe_refresh(step)
        if self._last_refresh == step and self._regime_step != step and not self.in_warmup(step):
            self._regime_step = step
            self._check_regime(x, step)
        codec = self.codec_at(step)
        if self.collects_stats(step):
            packet, stats = self._encode_with_stats(codec, x, self.seed(step))
            self.observe(stats)
        else:
            packet = codec.encode(x, seed=self.seed(step), fit=self.fit)
        c = self.counters
        c["steps"] += 1
        c["warmup_steps"] += int(self.in_warmup(step))
        c["raw_bytes"] += x.numel() * x.element_size()
        c["sent_bytes"] += packet.numel()
        self.last_numel = x.numel()
        se = self.config.sample_every
        if se and step % se == 0:
            self._sample(x, codec.decode(packet, dtype=torch.float32))
        return packet

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Any | None = None) -> torch.Tensor:
        """Decode a packet of this boundary (warm-up identity packets included); ``expect``
        (``codec.header.Expected``) is checked before anything is allocated."""
        from gradwire.codec.header import parse_packet

        codec_id = parse_packet(packet, expect)[0].codec_id
        codec = self._identity if codec_id == self._identity.codec_id else self.codec
        return codec.decode(packet, dtype=dtype, expect=expect)

    def _sample(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        y = y.reshape(-1)
        ok = torch.isfinite(x)
        x, y = x[ok].double(), y[ok].double()
        nx = x.norm().item()
        c = self.counters
        c["samples"] += 1
        c["rel_error_sum"] += (y - x).norm().item() / nx if nx > 0 else 0.0
        ny = y.norm().item()
        c["cosine_sum"] += (x @ y).item() / (nx * ny) if nx > 0 and ny > 0 else 1.0
        c["sparsity_sum"] += (y == 0).double().mean().item() if y.numel() else 0.0

    # --- pruning regime (module docstring)
    def _prunes(self) -> bool:
        from gradwire.codec.prune import PruneCodec

        return isinstance(self.codec, PruneCodec) and self.target_sparsity is not None

    def _with_sparsity(self, s: float) -> Codec:
        c = copy.copy(self.codec)  # keeps the codec's class and every other setting
        c.sparsity = float(s)
        return c

    def _check_regime(self, x: torch.Tensor, step: int) -> None:
        if not self._prunes() or self.target_sparsity == 0 or x.numel() == 0:
            return
        from gradwire.numerics.pruning_regime import expected_cosine, max_sparsity_for_cosine

        x = x.detach().float().cpu()  # one host copy per refresh (every refresh_every steps)
        fit = self.fit
        if fit is None or not fit.usable:  # first refresh before any statistics: fit the tensor itself
            from gradwire.numerics.lognormal import fit_lognormal

            fit = fit_lognormal(x)

        def threshold(s: float) -> float:
            return self._with_sparsity(s).threshold(x, fit)

        target = self.target_sparsity
        cos = expected_cosine(x, threshold(target))
        event = {"step": step, "sigma_log2": fit.sigma_log2,
                 "sparsity": target, "expected_cosine": cos, "applied_sparsity": target}
        warn, floor = self.config.warn_cosine, self.min_cosine
        if floor is not None:
            s = max_sparsity_for_cosine(x, threshold, target, floor)
            event["applied_sparsity"] = s
            if s != self.codec.sparsity:
                self.codec = self._with_sparsity(s)
        if warn is not None and cos < warn and not self._warned:
            self._warned = True
            sig = event["sigma_log2"]
            what = (f"the sparsity is capped at {event['applied_sparsity']:.3f} to keep min_cosine {floor}"
                    if floor is not None else
                    "expect a training-loss gap; set min_cosine to cap the sparsity, or prune less")
            warnings.warn(PruningRegimeWarning(
                f"boundary {self.config.boundary_id}: stochastic pruning at sparsity {target:g} keeps an "
                f"expected cosine of only {cos:.3f} on this gradient (sigma(log2|g|) = {sig:.2f}; pruning is "
                f"cheap where the distribution is wide, sigma >= ~3, and near-Gaussian gradients have ~1.6): "
                f"{what}. (Warned once per boundary; policy.events has every check.)"), stacklevel=3)
        self.events.append(event)

    def set_min_cosine(self, min_cosine: float | None) -> None:
        """Cap (or, with None, stop capping) the sparsity at an expected cosine floor."""
        _check_cosine("min_cosine", min_cosine)
        self.min_cosine = min_cosine

    def set_sparsity(self, sparsity: float) -> None:
        """Rebuild a pruning codec at a new sparsity (heterogeneous allocation). The receiver's
        decode does not depend on it (the threshold travels in the header)."""
        cfg = self.codec.config()
        if cfg.get("name", self.codec.name) != "prune":
            raise TypeError(f"set_sparsity needs a 'prune' codec, this boundary has {cfg}")
        cfg = {**cfg, "name": "prune", "sparsity": float(sparsity)}
        self.codec = _build(cfg)
        self.target_sparsity = float(sparsity)

    def telemetry(self) -> dict[str, Any]:
        """Counters plus derived ratios and the current fit."""
        c = dict(self.counters)
        n = c["samples"]
        c.update(ratio=c["sent_bytes"] / c["raw_bytes"] if c["raw_bytes"] else math.nan,
                 rel_error=c["rel_error_sum"] / n if n else math.nan,
                 cosine=c["cosine_sum"] / n if n else math.nan,
                 sparsity=c["sparsity_sum"] / n if n else math.nan,
                 mu_log2=self.fit.mu_log2 if self.fit else math.nan,
                 sigma_log2=self.fit.sigma_log2 if self.fit else math.nan,
                 codec=self.codec.config(), boundary_id=self.config.boundary_id,
                 expected_cosine=self.events[-1]["expected_cosine"] if self.events else math.nan)
        return c


def allocate_heterogeneous(policies: Sequence[BoundaryPolicy], budget: float) -> list[float]:
    """Give each pruning boundary its own sparsity under one element-weighted ``budget``
    (``numerics.lognormal.allocate_sparsity``) and apply it; returns the sparsities. Boundaries
    without a fit yet keep the budget itself."""
    from gradwire.numerics.lognormal import allocate_sparsity

    ready = [p for p in policies if p.fit is not None and p.fit.usable and p.last_numel > 0]
    if len(ready) < len(policies):
        for p in policies:
            p.set_sparsity(budget)
        return [budget] * len(policies)
    s = allocate_sparsity([p.fit for p in policies], [p.last_numel for p in policies], budget)
    for p, si in zip(policies, s):
        p.set_sparsity(si)
    return list(s)
