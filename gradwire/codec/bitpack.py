"""Dense packing of b-bit codes (1 <= b <= 8) into bytes.

Stream layout (docs/architecture.md): codes are packed LSB-first into a little-endian bit
stream; code i occupies stream bits [i*b, (i+1)*b), and stream bit j is bit (j % 8) of byte
j // 8. The packed size is ceil(n*b/8) bytes; the unused high bits of the last byte are zero.
So FP6 puts 4 codes in 3 bytes, FP5 8 codes in 5 bytes, FP4 2 codes per byte.

The work is done by ``gradwire.ops.pack_bits`` / ``unpack_bits`` (the native C++/CUDA kernel when
it is loaded, else the ops' pure-PyTorch reference; both write these bytes). This module keeps the
codec-facing names, argument order and error types (ValueError for a malformed stream, whichever
implementation detected it).
"""
from __future__ import annotations

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


def _reraise(e: Exception, bits: int) -> None:
    """Turn the ops' malformed-stream errors (ValueError from the reference, RuntimeError from a
    native kernel's TORCH_CHECK) into this module's documented ValueErrors; re-raise the rest."""
    msg = str(e)
    if "does not fit" in msg:
        raise ValueError(f"codes must be < 2**{bits}: {msg.splitlines()[0]}") from None
    if "padding" in msg:
        raise ValueError("nonzero padding bits after the last code") from None
    raise e


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a uint8 tensor of codes (any shape, flattened row-major) into a 1-D uint8 tensor.

    Delegates to ``gradwire.ops.pack_bits`` (native kernel when loaded, else its reference).
    Raises ``TypeError`` unless ``codes`` is uint8 and ``ValueError`` if a code needs more than
    ``bits`` bits (silently dropping its high bits would corrupt the neighbours' meaning).
    """
    from gradwire import ops

    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    try:
        return ops.pack_bits(codes, bits)
    except (ValueError, RuntimeError) as e:
        _reraise(e, bits)


def unpack_bits(data: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``n`` codes (1-D uint8) from exactly ceil(n*bits/8) bytes.

    Argument order (data, n, bits) differs from ``gradwire.ops.unpack_bits(packed, bits, numel)``,
    which this delegates to. Raises ``ValueError`` if ``data`` has the wrong length or its padding
    bits are not zero (either means the stream is not what ``pack_bits`` wrote).
    """
    from gradwire import ops

    _check_bits(bits)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"data must be a 1-D torch.uint8 tensor, got {getattr(data, 'dtype', type(data))} "
                        f"{tuple(getattr(data, 'shape', ()))}")
    nbytes = packed_nbytes(n, bits)
    if data.numel() != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {data.numel()}")
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=data.device)
    try:
        return ops.unpack_bits(data, bits, n)
    except (ValueError, RuntimeError) as e:
        _reraise(e, bits)
