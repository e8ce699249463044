"""Dense packing of b-bit codes (1 <= b <= 8) into bytes.

Stream layout (docs/architecture.md): codes are packed LSB-first into a little-endian bit
stream; code i occupies stream bits [i*b, (i+1)*b), and stream bit j is bit (j % 8) of byte
j // 8. The packed size is ceil(n*b/8) bytes; the unused high bits of the last byte are zero.
So FP6 puts 4 codes in 3 bytes, FP5 8 codes in 5 bytes, FP4 2 codes per byte.

Vectorisation: k = 8 / gcd(b, 8) consecutive codes fill exactly g = k*b/8 whole bytes (a "group";
at most 56 bits), so each group is assembled as one int64 word and split into bytes. The C++/CUDA
kernels must reproduce these bytes exactly; the layout above is the contract, not this trick.
"""
from __future__ import annotations

import math

import torch


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ceil(n*bits/8)."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n * bits + 7) // 8


def _group(bits: int) -> tuple[int, int]:
    k = 8 // math.gcd(bits, 8)  # codes per group
    return k, k * bits // 8  # (codes, bytes) per group


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a uint8 tensor of codes (any shape, flattened row-major) into a 1-D uint8 tensor.

    Raises ``TypeError`` unless ``codes`` is uint8 and ``ValueError`` if a code needs more than
    ``bits`` bits (silently dropping its high bits would corrupt the neighbours' meaning).
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if bits < 8 and bool((flat >> bits).any()):
        raise ValueError(f"codes must be < 2**{bits}; found {int(flat.max())}")
    if bits == 8:
        return flat.clone()
    k, g = _group(bits)
    pad = (-n) % k
    w = flat.to(torch.int64)
    if pad:
        w = torch.cat([w, w.new_zeros(pad)])
    w = w.view(-1, k)
    shifts = torch.arange(k, device=codes.device, dtype=torch.int64) * bits
    word = (w << shifts).sum(dim=1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(g, device=codes.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[:nbytes]


def unpack_bits(data: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``n`` codes (1-D uint8) from exactly ceil(n*bits/8) bytes.

    Raises ``ValueError`` if ``data`` has the wrong length or its padding bits are not zero
    (either means the stream is not what ``pack_bits`` wrote).
    """
    _check_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"data must be a 1-D torch.uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    nbytes = packed_nbytes(n, bits)
    if data.numel() != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {data.numel()}")
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=data.device)
    tail_bits = n * bits % 8
    if tail_bits and int(data[-1]) >> tail_bits:
        raise ValueError("nonzero padding bits after the last code")
    if bits == 8:
        return data.clone()
    k, g = _group(bits)
    pad = (-nbytes) % g
    b = data.to(torch.int64)
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.view(-1, g)
    byte_shifts = torch.arange(g, device=data.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(k, device=data.device, dtype=torch.int64) * bits
    codes = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    return codes[:n]
