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

Counters (``telemetry()``): raw bytes, bytes sent, steps, and, every ``sample_every`` steps, the
relative error, the cosine similarity and the achieved sparsity of the decoded tensor.
"""
from __future__ import annotations

import math
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
    """

    codec: Any = field(default_factory=lambda: {"name": "fp", "bits": 6})
    warmup_steps: int = 0
    refresh_every: int = 50
    stats_every: int = 1
    sample_every: int = 0
    base_seed: int = 0
    boundary_id: int = 0

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

    def set_sparsity(self, sparsity: float) -> None:
        """Rebuild a pruning codec at a new sparsity (heterogeneous allocation). The receiver's
        decode does not depend on it (the threshold travels in the header)."""
        cfg = self.codec.config()
        if cfg.get("name", self.codec.name) != "prune":
            raise TypeError(f"set_sparsity needs a 'prune' codec, this boundary has {cfg}")
        cfg = {**cfg, "name": "prune", "sparsity": float(sparsity)}
        self.codec = _build(cfg)

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
                 codec=self.codec.config(), boundary_id=self.config.boundary_id)
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
