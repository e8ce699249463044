"""The versioned packet header: everything a receiver needs to validate and decode a payload.

A packet is ``header || payload`` as one 1-D ``torch.uint8`` tensor. All fields are little-endian.

Fixed part (24 bytes, ``struct`` format ``<4sBBBBBBHQI``)::

    offset size field
    0      4    magic            b"GWPK"
    4      1    version          FORMAT_VERSION (1)
    5      1    codec_id         which codec wrote the packet (registry ids, see base.Codec)
    6      1    flags            codec-specific bits (e.g. rounding mode)
    7      1    src_dtype        DTYPE_CODES: 1 float32, 2 bfloat16, 3 float16
    8      1    ndim             0..MAX_NDIM
    9      1    param_len        bytes of the codec parameter block
    10     2    header_len       total header bytes (includes the header CRC)
    12     8    payload_len      bytes that follow the header
    20     4    payload_crc      CRC-32 (zlib) of the payload
    24     ..   shape            ndim unsigned LEB128 varints (7 bits per byte, low group first,
                                 high bit = "more"; minimal length; at most 9 bytes, < 2**63)
    ..     param_len  params     codec parameters (scale exponent, threshold, formats, counts)
    header_len-4  4  header_crc  CRC-32 of header bytes [0, header_len - 4)

Why varints: a 64K-element tensor at ~1 bit per element (prune at S=0.99) has an 8 KiB payload,
and the "header under 1%" goal leaves ~80 bytes; u64 dimensions would spend 8 bytes each.
Codecs copy the payload before viewing it as wider dtypes, so no alignment padding is needed.

Why a header CRC as well as the payload CRC: a flipped bit in the scale exponent or the threshold
would otherwise decode to a plausible but wrong tensor, silently. Both checksums are verified
before anything is allocated, and sizes are checked with Python integers, so a corrupted shape
can never trigger a huge allocation (every codec bounds numel by the payload length).

Why an ``Expected`` as well: the payload bounds numel only up to the codec's compression ratio,
and a pruning packet with Rice-coded positions may legitimately describe ~2**11 elements per
payload byte, so a forged 131 KB packet could ask for a 2**28-element (1 GiB) tensor. Every
receiver knows the shape and dtype it is waiting for; ``parse_packet(packet, expect)`` compares
them (and the packet size) with the header before the payload is even checksummed, so a decode
never allocates more than the expected tensor and its codec's working buffers.

Trust model: the CRCs detect corruption (a flipped bit, a truncated or padded message), not
forgery -- anyone can compute a CRC-32. A peer that forges packets can still make a receiver
decode wrong values of the expected shape; what it cannot do is make it read out of bounds,
allocate more than the expected tensor, or crash with anything but ``PacketError``. Like NCCL and
gloo themselves, gradwire assumes the ranks of a job and their network are trusted.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from gradwire.codec.crc32 import crc32  # payload checksum, computed on the payload's device

MAGIC = b"GWPK"
FORMAT_VERSION = 1
MAX_NDIM = 16
_FIXED = struct.Struct("<4sBBBBBBHQI")
FIXED_SIZE = _FIXED.size  # 24
_CRC = struct.Struct("<I")
MAX_DIM = (1 << 63) - 1  # torch sizes are int64
_MAX_VARINT = 9  # bytes of a varint below 2**63

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


class PacketError(ValueError):
    """A packet is malformed, corrupted, or does not match the receiver's codec configuration.

    Messages name the field, the expected value and the value found.
    """


@dataclass(frozen=True)
class Header:
    """A parsed (and checksum-verified) packet header."""

    codec_id: int
    flags: int
    src_dtype: torch.dtype
    shape: tuple[int, ...]
    params: bytes
    payload_len: int
    payload_crc: int
    header_len: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Expected:
    """What a receiver knows before a packet arrives: the tensor's ``shape``, its source ``dtype``
    and, optionally, the largest packet it accepts (``max_bytes``, e.g. ``Codec.max_packed_size``).

    ``parse_packet(packet, expect)`` rejects a packet that disagrees, before allocating anything.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    max_bytes: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"Expected.dtype must be a torch.dtype, got {self.dtype!r}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or self.max_bytes < 0):
            raise ValueError(f"Expected.max_bytes must be None or >= 0, got {self.max_bytes!r}")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _check_expected(expect: Expected, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if shape != expect.shape:
        raise PacketError(f"shape: receiver expects {expect.shape}, packet has {shape}")
    if dtype != expect.dtype:
        raise PacketError(f"src_dtype: receiver expects {expect.dtype}, packet has {dtype}")


def varint(v: int) -> bytes:
    """Unsigned LEB128 encoding of 0 <= v < 2**63."""
    if not 0 <= v <= MAX_DIM:
        raise ValueError(f"tensor dimensions must be in [0, 2**63), got {v}")
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _read_varint(buf: bytes, off: int, end: int, i: int) -> tuple[int, int]:
    """Decode one varint of ``buf[off:end]``; PacketError names dimension ``i`` if malformed."""
    v = shift = 0
    for k in range(_MAX_VARINT):
        if off + k >= end:
            raise PacketError(f"shape[{i}]: expected a varint, found the end of the shape field")
        byte = buf[off + k]
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if k and byte == 0:
                raise PacketError(f"shape[{i}]: expected a minimal varint, found a redundant zero byte")
            return v, off + k + 1  # 9 groups of 7 bits: always <= MAX_DIM
    raise PacketError(f"shape[{i}]: expected a varint of at most {_MAX_VARINT} bytes")


def header_size(shape: Sequence[int], param_len: int) -> int:
    """Bytes of the header for a tensor of ``shape`` and a ``param_len``-byte parameter block."""
    return FIXED_SIZE + sum(len(varint(int(d))) for d in shape) + param_len + 4


def dtype_code(dtype: torch.dtype) -> int:
    """The header code of a source dtype; ``TypeError`` for dtypes the codecs do not accept."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(
            f"gradwire codecs encode float32, bfloat16 or float16 tensors, got {dtype}"
        ) from None


def build_packet(
    codec_id: int,
    src_dtype: torch.dtype,
    shape: Sequence[int],
    params: bytes,
    payload: torch.Tensor,
    *,
    flags: int = 0,
) -> torch.Tensor:
    """Prepend the header to ``payload`` (1-D uint8) and return the packet on payload's device."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise TypeError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} {tuple(payload.shape)}")
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors of at most {MAX_NDIM} dimensions can be encoded, got {len(shape)}")
    if len(params) > 255:
        raise ValueError(f"codec parameter block too long: {len(params)} > 255 bytes")
    hlen = header_size(shape, len(params))
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, codec_id, flags, dtype_code(src_dtype), len(shape), len(params),
        hlen, payload.numel(), crc32(payload),
    )
    body = fixed + b"".join(varint(d) for d in shape) + params
    body += _CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)
    head = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(payload.device)
    return torch.cat([head, payload])


def _check_packet_tensor(packet: Any) -> None:
    if not isinstance(packet, torch.Tensor):
        raise PacketError(f"packet: expected a torch.Tensor, found {type(packet).__name__}")
    if packet.dtype != torch.uint8 or packet.dim() != 1:
        raise PacketError(
            f"packet: expected a 1-D torch.uint8 tensor, found {packet.dtype} of shape {tuple(packet.shape)}"
        )
    if packet.is_meta:
        raise PacketError(f"packet: expected bytes, found a meta tensor of {packet.numel()} elements (no data)")


def parse_packet(packet: torch.Tensor, expect: Expected | None = None) -> tuple[Header, torch.Tensor]:
    """Validate a packet's header and payload checksum; return the header and the payload view.

    Raises ``PacketError`` naming the first inconsistent field. Reads only within the packet.
    With ``expect``, the packet size, shape and source dtype are checked against it before the
    payload is touched (module docstring: the decode then allocates at most the expected tensor).
    """
    _check_packet_tensor(packet)
    total = packet.numel()
    if expect is not None and expect.max_bytes is not None and total > expect.max_bytes:
        raise PacketError(f"packet length: receiver accepts at most {expect.max_bytes} bytes, found {total}")
    if total < FIXED_SIZE + 4:
        raise PacketError(f"packet length: expected at least {FIXED_SIZE + 4} bytes, found {total}")
    # Only the header crosses to the host; the payload CRC needs the payload bytes too.
    first = bytes(packet[:FIXED_SIZE].cpu().numpy())
    magic, version, codec_id, flags, dcode, ndim, plen, hlen, payload_len, payload_crc = _FIXED.unpack(first)
    if magic != MAGIC:
        raise PacketError(f"magic: expected {MAGIC!r}, found {magic!r} (not a gradwire packet)")
    if version != FORMAT_VERSION:
        raise PacketError(f"version: expected {FORMAT_VERSION}, found {version}")
    if ndim > MAX_NDIM:
        raise PacketError(f"ndim: expected at most {MAX_NDIM}, found {ndim}")
    lo, hi = FIXED_SIZE + ndim + plen + 4, FIXED_SIZE + _MAX_VARINT * ndim + plen + 4
    if not lo <= hlen <= hi:
        raise PacketError(
            f"header_len: expected {lo}..{hi} for ndim={ndim}, param_len={plen}; found {hlen}"
        )
    if total < hlen:
        raise PacketError(f"packet length: header needs {hlen} bytes, packet has {total}")
    head = bytes(packet[:hlen].cpu().numpy())
    (hcrc,) = _CRC.unpack(head[hlen - 4:])
    want_hcrc = zlib.crc32(head[: hlen - 4]) & 0xFFFFFFFF
    if hcrc != want_hcrc:
        raise PacketError(f"header_crc: expected {want_hcrc:#010x}, found {hcrc:#010x} (header corrupted)")
    if dcode not in CODE_DTYPES:
        raise PacketError(f"src_dtype: expected one of {sorted(CODE_DTYPES)}, found {dcode}")
    if payload_len != total - hlen:
        raise PacketError(
            f"payload_len: header says {payload_len} bytes, packet carries {total - hlen} "
            f"(truncated or padded packet)"
        )
    shape_end = hlen - 4 - plen
    off, dims = FIXED_SIZE, []
    for i in range(ndim):
        d, off = _read_varint(head, off, shape_end, i)
        dims.append(d)
    if off != shape_end:
        raise PacketError(f"shape: expected {ndim} varints filling {shape_end - FIXED_SIZE} bytes, "
                          f"found {off - FIXED_SIZE} bytes used")
    shape = tuple(dims)
    if expect is not None:
        _check_expected(expect, shape, CODE_DTYPES[dcode])
    params = head[shape_end: shape_end + plen]
    payload = packet[hlen:]
    got_crc = crc32(payload)
    if got_crc != payload_crc:
        raise PacketError(
            f"payload_crc: header says {payload_crc:#010x}, payload hashes to {got_crc:#010x} "
            f"(payload corrupted)"
        )
    header = Header(codec_id, flags, CODE_DTYPES[dcode], shape, params, payload_len, payload_crc, hlen)
    return header, payload


def unpack_params(header: Header, fmt: struct.Struct, what: str) -> tuple:
    """Unpack a codec's parameter block, checking its length first."""
    if len(header.params) != fmt.size:
        raise PacketError(
            f"{what} params: expected a {fmt.size}-byte parameter block, found {len(header.params)} bytes"
        )
    return fmt.unpack(header.params)


def check_payload_len(header: Header, expected: int, what: str) -> None:
    """Raise unless the payload is exactly the size the shape and parameters imply."""
    if header.payload_len != expected:
        raise PacketError(
            f"{what} payload_len: shape {header.shape} and the packet's parameters need {expected} "
            f"bytes, found {header.payload_len}"
        )


def check_config(packet_cfg: Mapping[str, Any], receiver_cfg: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Receiver-side agreement check: the packet's codec configuration must match on ``keys``.

    The message names both configurations in full so a misconfigured job is easy to diagnose.
    """
    diff = [k for k in keys if packet_cfg.get(k) != receiver_cfg.get(k)]
    if diff:
        raise PacketError(
            f"codec config mismatch on {diff}: packet was encoded with {dict(packet_cfg)}, "
            f"receiver is configured with {dict(receiver_cfg)}"
        )


def check_codec_id(header: Header, codec_id: int, name: str) -> None:
    if header.codec_id != codec_id:
        raise PacketError(
            f"codec_id: receiver is a {name!r} codec (id {codec_id}), packet has codec id {header.codec_id}"
        )
