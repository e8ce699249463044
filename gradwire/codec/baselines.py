"""Baseline codecs users compare against: identity, bf16 cast, FP8 with per-tensor amax scaling.

They share the wire header with the gradwire codecs, so the same plumbing (and the same
corruption checks) carries them.
"""
from __future__ import annotations

import math
import struct
from typing import Any, ClassVar, Sequence

import torch

from gradwire.codec.base import Codec, canonical_nan, check_input, decode_dtype
from gradwire.numerics.fp import saturating_cast
from gradwire.codec.header import (
    Expected,
    Header,
    PacketError,
    build_packet,
    check_codec_id,
    check_payload_len,
    dtype_code,
    header_size,
    parse_packet,
    unpack_params,
)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _RawCastCodec(Codec):
    """Payload = the tensor's elements cast to ``wire_dtype`` (the source dtype when None)."""

    wire_dtype: ClassVar[torch.dtype | None]
    fixed_rate = True

    def _wire(self, src: torch.dtype) -> torch.dtype:
        return self.wire_dtype or src

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        x = check_input(x, self.name)
        wire = self._wire(x.dtype)
        # float32 values near its max round up to inf in bf16: saturate finite values instead
        w = x.contiguous().reshape(-1) if wire == x.dtype else canonical_nan(
            saturating_cast(x, wire).reshape(-1))
        return build_packet(self.codec_id, x.dtype, x.shape, b"", w.view(torch.uint8))

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Expected | None = None) -> torch.Tensor:
        h, payload = parse_packet(packet, expect)
        check_codec_id(h, self.codec_id, self.name)
        unpack_params(h, struct.Struct("<"), self.name)
        wire = self._wire(h.src_dtype)
        check_payload_len(h, h.numel * wire.itemsize, self.name)
        out = decode_dtype(dtype, h.src_dtype)
        # clone(): the payload view starts 8-byte aligned, but a fresh buffer is simplest to own.
        y = payload.clone().view(wire).reshape(h.shape)
        # bf16 65536 (fp16 65504 rounded) must not become an fp16 inf; infs on the wire stay inf
        return saturating_cast(y, out) if torch.finfo(wire).max > torch.finfo(out).max else y.to(out)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        dtype_code(dtype)
        return header_size(shape, 0) + _numel(shape) * self._wire(dtype).itemsize

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class IdentityCodec(_RawCastCodec):
    """No compression: the source bytes as they are (bit-exact round trip)."""

    name = "identity"
    codec_id = 1
    wire_dtype = None


class BF16Codec(_RawCastCodec):
    """Cast to bfloat16 (round to nearest even; inf/NaN preserved), 16 bits per element."""

    name = "bf16"
    codec_id = 2
    wire_dtype = torch.bfloat16


_SCALE = struct.Struct("<f")


class _FP8Codec(Codec):
    """FP8 with per-tensor amax scaling: q = fp8(clamp(x * s)), x_hat = q / s.

    s = fp8_max / amax(|finite x|) as a float32 (1 when there is no finite nonzero entry;
    capped at float32 max so a tiny amax cannot make it infinite). Non-finite elements are
    sent as NaN (e4m3fn has no infinity, and torch's cast would saturate inf to 448) or, for
    e5m2, as themselves. Deterministic round-to-nearest-even (torch's cast).
    """

    fp8_dtype: ClassVar[torch.dtype]
    fixed_rate = True

    def scale_for(self, x: torch.Tensor) -> float:
        """The float32 scale the codec uses for ``x``."""
        xf = x.float()
        finite = torch.isfinite(xf)
        amax = float(xf.abs().where(finite, xf.new_zeros(())).max()) if x.numel() else 0.0
        if amax == 0.0:
            return 1.0
        s = min(torch.finfo(self.fp8_dtype).max / amax, torch.finfo(torch.float32).max)
        return struct.unpack("<f", struct.pack("<f", s))[0]  # exactly what travels

    def quantize(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """The fp8 tensor sent for ``x`` at ``scale`` (the codec's reference semantics)."""
        fmax = torch.finfo(self.fp8_dtype).max
        xf = x.float()
        y = (xf * scale).clamp(-fmax, fmax)
        nonfinite = ~torch.isfinite(xf)
        if self.fp8_dtype == torch.float8_e4m3fn:
            y = y.masked_fill(nonfinite, math.nan)
        else:
            y = torch.where(nonfinite, xf, y)
        return y.to(self.fp8_dtype)

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        x = check_input(x, self.name)
        scale = self.scale_for(x)
        q = self.quantize(x, scale).contiguous().reshape(-1)
        return build_packet(self.codec_id, x.dtype, x.shape, _SCALE.pack(scale), q.view(torch.uint8))

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Expected | None = None) -> torch.Tensor:
        h: Header
        h, payload = parse_packet(packet, expect)
        check_codec_id(h, self.codec_id, self.name)
        (scale,) = unpack_params(h, _SCALE, self.name)
        if not (math.isfinite(scale) and scale > 0):
            raise PacketError(f"{self.name} scale: expected a finite positive float, found {scale}")
        check_payload_len(h, h.numel, self.name)
        out = decode_dtype(dtype, h.src_dtype)
        q = payload.clone().view(self.fp8_dtype).reshape(h.shape)
        # Divide by a tensor on q's device: CUDA turns division by a Python scalar into a
        # multiplication by its reciprocal (1 ulp off the CPU's true division).
        if torch.finfo(self.fp8_dtype).max / scale < 0.5 * torch.finfo(out).max:
            return (q.float() / torch.tensor(scale, dtype=torch.float32, device=q.device)).to(out)
        # near the top of out's range (amax ~ float32 max): divide in float64 and saturate, so a
        # finite code stays finite; the fp8 NaN/inf codes stay non-finite
        return saturating_cast(q.double() / torch.tensor(scale, dtype=torch.float64, device=q.device), out)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        dtype_code(dtype)
        return header_size(shape, _SCALE.size) + _numel(shape)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class FP8E4M3Codec(_FP8Codec):
    name = "fp8_e4m3"
    codec_id = 3
    fp8_dtype = torch.float8_e4m3fn


class FP8E5M2Codec(_FP8Codec):
    name = "fp8_e5m2"
    codec_id = 4
    fp8_dtype = torch.float8_e5m2
