"""Tiny reference codecs implementing ``gradwire.codec.base.Codec``, for transport tests.

They let the comm layer be tested independently of the production codecs: one fixed-rate
(a bfloat16 cast), one variable-size (keep the entries with |x| >= a threshold, as index/value
pairs). Their packets carry a minimal header of their own (magic, version, source dtype, shape).
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

import torch

from gradwire.codec.base import Codec

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_HEAD = struct.Struct("<4sBBB")  # magic, version, dtype index, ndim; then ndim int64 dims


def _header(magic: bytes, version: int, x: torch.Tensor) -> bytes:
    return _HEAD.pack(magic, version, _DTYPES.index(x.dtype), x.dim()) + struct.pack(f"<{x.dim()}q", *x.shape)


def _parse(magic: bytes, version: int, packet: torch.Tensor, expect=None) -> tuple[torch.dtype, tuple, int]:
    raw = bytes(packet[: _HEAD.size].tolist())
    m, v, d, nd = _HEAD.unpack(raw)
    if m != magic or v != version:
        raise ValueError(f"packet magic/version {m!r}/{v} does not match {magic!r}/{version}")
    shape = struct.unpack(f"<{nd}q", bytes(packet[_HEAD.size: _HEAD.size + 8 * nd].tolist()))
    if expect is not None and (tuple(shape) != expect.shape or _DTYPES[d] != expect.dtype):
        # checked before allocating, as the production codecs do (codec.header.Expected)
        from gradwire.codec.header import PacketError

        raise PacketError(f"packet holds {_DTYPES[d]} {tuple(shape)}, receiver expects "
                          f"{expect.dtype} {expect.shape}")
    return _DTYPES[d], shape, _HEAD.size + 8 * nd


def _check(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}")


class CastCodec(Codec):
    """Round to bfloat16 (nearest even) and send the 2-byte values: fixed rate."""

    name, codec_id, fixed_rate = "test_cast", 250, True

    def __init__(self, version: int = 1):
        self.version = version

    def encode(self, x, *, seed=0, fit=None):
        _check(x)
        payload = x.detach().contiguous().reshape(-1).to(torch.bfloat16).view(torch.uint8)
        head = torch.tensor(list(_header(b"GWTC", self.version, x)), dtype=torch.uint8, device=x.device)
        return torch.cat([head, payload])

    def decode(self, packet, *, dtype=None, expect=None):
        src, shape, off = _parse(b"GWTC", self.version, packet, expect)
        vals = packet[off:].clone().view(torch.bfloat16)
        return vals.reshape(shape).to(dtype or src)

    def packed_size(self, shape: Sequence[int], dtype) -> int:
        n = 1
        for s in shape:
            n *= s
        return _HEAD.size + 8 * len(shape) + 2 * n

    def config(self) -> dict[str, Any]:
        return {"version": self.version}


class ThresholdCodec(Codec):
    """Keep the entries with |x| >= threshold (and every non-finite one) as (int64 index,
    float32 value) pairs: variable size. Deterministic, biased: for transport tests only."""

    name, codec_id, fixed_rate = "test_threshold", 251, False

    def __init__(self, threshold: float = 1.0):
        self.threshold = float(threshold)

    def encode(self, x, *, seed=0, fit=None):
        _check(x)
        flat = x.detach().reshape(-1).float()
        keep = ~(flat.abs() < self.threshold)  # NaN compares False: kept
        idx = keep.nonzero().reshape(-1)
        head = torch.tensor(list(_header(b"GWTT", 1, x)), dtype=torch.uint8, device=x.device)
        return torch.cat([head, idx.view(torch.uint8), flat[idx].contiguous().view(torch.uint8)])

    def decode(self, packet, *, dtype=None, expect=None):
        src, shape, off = _parse(b"GWTT", 1, packet, expect)
        body = packet[off:].clone()
        k = body.numel() // 12
        idx = body[: 8 * k].view(torch.int64)
        val = body[8 * k:].view(torch.float32)
        n = 1
        for s in shape:
            n *= s
        out = torch.zeros(n, dtype=torch.float32, device=packet.device)
        out[idx] = val
        return out.reshape(shape).to(dtype or src)

    def packed_size(self, shape, dtype):
        raise TypeError("ThresholdCodec is variable-size; use max_packed_size")

    def max_packed_size(self, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        return _HEAD.size + 8 * len(shape) + 12 * n

    def config(self):
        return {"threshold": self.threshold}
