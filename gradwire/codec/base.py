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
        """``encode`` plus the moment statistics of ``x``: here a separate ``ops.moment_stats``
        pass (native kernel when loaded); the FP codec overrides this with one fused pass."""
        from gradwire import ops

        x = check_input(x, self.name)
        return EncodeResult(self.encode(x, seed=seed, fit=fit), ops.moment_stats(x))

    @abstractmethod
    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Any | None = None) -> torch.Tensor:
        """Return the tensor a packet describes, in ``dtype`` (default: the source dtype).

        Raises ``gradwire.codec.header.PacketError`` (a ``ValueError``) on any inconsistency
        between the header, the payload and this codec's configuration. ``expect``
        (``header.Expected``: shape, source dtype, maximum size) is what the receiver waits for;
        it is checked before anything is allocated, so bytes from the network must always be
        decoded with one (header.py: without it a forged header may ask for ~2**11 elements per
        payload byte).
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


# ---------------------------------------------------------------------------------------------
# Helpers shared by the codecs (input checks and the decode dtype), kept here so every codec
# reports bad input with the same words.

def check_input(x: Any, what: str) -> torch.Tensor:
    """Validate an ``encode`` input: a float32/bfloat16/float16 tensor of at most 16 dims.

    Empty and 0-d tensors are valid (they round-trip to an empty / 0-d tensor). Non-finite
    entries are data, not errors: every codec delivers them non-finite (DESIGN.md).
    """
    from gradwire.codec.header import DTYPE_CODES, MAX_NDIM

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}.encode expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{what}.encode accepts float32, bfloat16 or float16 tensors, got {x.dtype}")
    if x.dim() > MAX_NDIM:
        raise ValueError(f"{what}.encode accepts at most {MAX_NDIM} dimensions, got {x.dim()}")
    if x.is_meta:  # no data to encode: say so, instead of an unrelated error deep in a kernel
        raise ValueError(f"{what}.encode needs a tensor with data, got a meta tensor of shape {tuple(x.shape)}")
    return x.detach()


def canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every NaN replaced by the positive quiet NaN of its dtype.

    A packet must not depend on the device that encoded it, but casts and arithmetic write
    device-specific NaN bits: torch's CUDA float32 -> bfloat16 cast and its CPU one give different
    NaN payloads, and CUDA arithmetic returns one canonical NaN where x86 keeps an operand's.
    Applied wherever a codec sends values it computed or cast (not the caller's own bits).
    """
    return t.masked_fill(torch.isnan(t), float("nan"))


def decode_dtype(dtype: torch.dtype | None, src: torch.dtype) -> torch.dtype:
    """The dtype ``decode`` returns: ``dtype`` if given (must be floating point), else the source's."""
    if dtype is None:
        return src
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"decode dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype
