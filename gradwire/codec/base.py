"""The codec interface: a tensor in, a self-describing packet of bytes out, and back.

A packet is a 1-D ``torch.uint8`` tensor on the tensor's device: a fixed header (see
``gradwire.codec.header``) followed by the payload. Packets go over the wire as they are, so the
receiver needs nothing but the bytes and its own codec configuration to decode them, and it checks
that the two agree.

Dynamic parameters (the power-of-two scale of the FP codec, the pruning threshold) are chosen
from a ``LognormalFit``: the policy passes its running fit (refreshed on a schedule) as ``fit=``;
without one, the codec fits the tensor it encodes (one extra pass). Either way the chosen values
travel in the header, so decoding is stateless.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Sequence

import torch


class EncodeResult(NamedTuple):
    """A packet and the statistics of the tensor it encodes (``numerics.lognormal.moment_stats``
    layout), accumulated in the same pass where a kernel can, for the policy's next refresh."""

    packet: torch.Tensor
    stats: torch.Tensor


class Codec(ABC):
    """Encode a tensor to a packet, decode a packet to a tensor.

    Subclasses are frozen in their configuration: two codecs with equal ``config()`` produce and
    accept the same packets.
    """

    name: ClassVar[str]  # registry key, e.g. "fp"
    codec_id: ClassVar[int]  # the id written in the header
    fixed_rate: ClassVar[bool]  # True when the packed size depends only on shape and config

    @abstractmethod
    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        """Return the packet (uint8, 1-D, on ``x.device``) for ``x``."""

    def encode_with_stats(
        self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None
    ) -> EncodeResult:
        """``encode`` plus the moment statistics of ``x`` (kernels fuse the two passes)."""
        from gradwire.numerics.lognormal import moment_stats

        return EncodeResult(self.encode(x, seed=seed, fit=fit), moment_stats(x))

    @abstractmethod
    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return the tensor a packet describes, in ``dtype`` (default: the source dtype).

        Raises ``gradwire.codec.header.PacketError`` (a ``ValueError``) on any inconsistency
        between the header, the payload and this codec's configuration.
        """

    @abstractmethod
    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Exact packet size in bytes for a tensor of ``shape`` and ``dtype``.

        Fixed-rate codecs only; variable-size codecs raise ``TypeError`` and offer
        ``max_packed_size`` instead.
        """

    def max_packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """An upper bound on the packet size (equal to ``packed_size`` for fixed-rate codecs)."""
        return self.packed_size(shape, dtype)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able description of everything that must agree between sender and receiver."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
