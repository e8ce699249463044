"""CRC-32 of a packet's bytes where they live: zlib's checksum, computed on the tensor's device.

The packet checksum is zlib's CRC-32 (reflected polynomial 0xEDB88320, initial value and final
xor 0xFFFFFFFF). On the CPU ``zlib.crc32`` computes it. A payload on a GPU used to be copied to
the host for zlib, which cost more than everything else in a codec: 87 ms for the identity
codec's 64 MB packet on an H200 machine (bench/results/gpu_check_h200/README.md). Here the same
value is computed with tensor ops on the device, and only the 4-byte result is read back.

How (all arithmetic in GF(2), i.e. XOR): with the initial value 0, the CRC register after a
message, R(M), is linear in M, and appending b bytes maps a register value s to Z_b(s) ^ R(B),
where Z_b is the linear map "feed b zero bytes". So

  1. the message is left-padded with zeros to a multiple of CHUNK bytes (leading zeros leave a
     zero register unchanged) and cut into chunks; R(chunk) = XOR_i T_i[chunk[i]], where T_i is
     the byte table shifted by the CHUNK-1-i bytes that follow byte i: CHUNK gathers, all chunks
     at once;
  2. adjacent chunk values are combined pairwise, R(A || B) = Z_|B|(R(A)) ^ R(B), in log2(#chunks)
     rounds; Z_l of a 32-bit value is four 256-entry table lookups, one per byte;
  3. crc32(M) = Z_n(0xFFFFFFFF) ^ R(M) ^ 0xFFFFFFFF, the initial value's contribution computed on
     the host from cached powers Z_(2^j).

Tables and operators are built once per device and length on the host (32x32 bit matrices as
lists of column words). ``tests/unit/test_crc32.py`` checks the tensor path against zlib on the
CPU for every length class; on a GPU the same integer ops run, so the result is the same.
"""
from __future__ import annotations

import functools
import zlib

import torch

POLY = 0xEDB88320
CHUNK = 16  # bytes per chunk in step 1: 16 gathers, then log2(n / 16) combine rounds
_SLICE = 1 << 20  # chunks per step-1 slice (16 MB of data): bounds the int32 temporaries to 64 MB


@functools.lru_cache(maxsize=None)
def _byte_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (POLY if c & 1 else 0)
        table.append(c)
    return tuple(table)


def _apply(op: tuple[int, ...], v: int) -> int:
    """A 32x32 GF(2) matrix (column words) times a 32-bit vector."""
    out, i = 0, 0
    while v:
        if v & 1:
            out ^= op[i]
        v >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=None)
def _zeros_op(log2_bytes: int) -> tuple[int, ...]:
    """Z_(2^k): the register map of feeding 2^k zero bytes."""
    if log2_bytes == 0:
        t = _byte_table()
        return tuple((1 << i) >> 8 ^ t[(1 << i) & 0xFF] for i in range(32))
    half = _zeros_op(log2_bytes - 1)
    return tuple(_apply(half, col) for col in half)


def _feed_zeros(v: int, nbytes: int) -> int:
    """Z_nbytes(v), from the cached powers of two."""
    k = 0
    while nbytes:
        if nbytes & 1:
            v = _apply(_zeros_op(k), v)
        nbytes >>= 1
        k += 1
    return v


def _signed(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.lru_cache(maxsize=None)
def _chunk_tables(device: torch.device) -> torch.Tensor:
    """int32 [CHUNK * 256]: entry 256*i + b is R(byte b followed by CHUNK-1-i zero bytes)."""
    t = _byte_table()
    rows = [[_signed(_feed_zeros(t[b], CHUNK - 1 - i)) for b in range(256)] for i in range(CHUNK)]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1)


@functools.lru_cache(maxsize=None)
def _shift_tables(device: torch.device, log2_bytes: int) -> torch.Tensor:
    """int32 [4, 256]: Z_(2^k) of each byte value in each of the register's four bytes."""
    op = _zeros_op(log2_bytes)
    rows = [[_signed(_apply(op, b << (8 * k))) for b in range(256)] for k in range(4)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _chunk_values(data: torch.Tensor) -> torch.Tensor:
    """R of every CHUNK-byte chunk of ``data`` (length a multiple of CHUNK), int32 on its device."""
    tables = _chunk_tables(data.device)
    offsets = torch.arange(CHUNK, device=data.device, dtype=torch.int32) * 256
    chunks = data.reshape(-1, CHUNK)
    out = []
    for s in range(0, chunks.shape[0], _SLICE):
        v = tables[chunks[s:s + _SLICE].to(torch.int32) + offsets]  # [c, CHUNK]
        while v.shape[1] > 1:  # XOR-reduce the columns
            h = v.shape[1] // 2
            v = v[:, :h] ^ v[:, h:]
        out.append(v[:, 0])
    return torch.cat(out)


def crc32_tensor(data: torch.Tensor) -> int:
    """zlib.crc32 of a 1-D uint8 tensor, computed with tensor ops on its device."""
    n = data.numel()
    if n == 0:
        return 0
    pad = (-n) % CHUNK
    flat = data.reshape(-1)
    if pad:
        flat = torch.cat([flat.new_zeros(pad), flat])
    vals = _chunk_values(flat)
    log2_len = CHUNK.bit_length() - 1  # the length of each value's segment is 2^log2_len bytes
    while vals.numel() > 1:
        if vals.numel() % 2:  # a zero segment in front changes nothing (register starts at 0)
            vals = torch.cat([vals.new_zeros(1), vals])
        a, b = vals[0::2], vals[1::2]
        u = _shift_tables(data.device, log2_len)
        vals = u[0][a & 255] ^ u[1][(a >> 8) & 255] ^ u[2][(a >> 16) & 255] ^ u[3][(a >> 24) & 255] ^ b
        log2_len += 1
    r = int(vals.item()) & 0xFFFFFFFF  # the one device -> host read
    return _feed_zeros(0xFFFFFFFF, n) ^ r ^ 0xFFFFFFFF


def crc32(data: torch.Tensor) -> int:
    """CRC-32 (as ``zlib.crc32``) of a uint8 tensor's bytes: zlib for CPU tensors, tensor ops on
    the device for the others (only the 4-byte result crosses to the host)."""
    if data.numel() == 0:
        return 0
    data = data.detach().contiguous()
    if data.device.type == "cpu":
        return zlib.crc32(data.numpy()) & 0xFFFFFFFF
    return crc32_tensor(data)
