"""Counter-based random bits shared by the reference, the C++ and the CUDA kernels.

Stochastic rounding, stochastic pruning and MVUE sampling must give the *same bytes* in every
implementation (DESIGN.md, "Reference first, kernels second, bit-exact"). A stateful generator
cannot give that across devices and thread layouts, so every random decision is a pure function
of ``(seed, counter)``: the counter is the flat element index (or block index) of the decision.

The hash (all arithmetic modulo 2**32, ``>>`` logical)::

    mix32(x):  x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
    key1 = mix32(seed ^ 0x9E3779B9)          # per call, from the 32-bit seed
    key2 = mix32(key1 ^ 0x85EBCA6B)
    random_u32(seed, i) = mix32( (mix32(lo32(i) ^ key1) + hi32(i) + key2) mod 2**32 )

``mix32`` is Chris Wellons' "lowbias32" finaliser (a bijection on 32-bit words with low bias);
two keyed rounds decorrelate consecutive counters and seeds. A uniform float is
``(random_u32 >> 8) * 2**-24``: 24 random bits, exactly representable in float32, in [0, 1).

The per-step seed is derived in Python (``derive_seed``) and handed to the kernels as one 32-bit
integer, so the kernels need only ``random_u32``. C++/CUDA ports: csrc/common/rng.h.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x21F0AAAD
_M2 = 0x735A2D97
GOLDEN = 0x9E3779B9
_K2 = 0x85EBCA6B
UNIFORM_SCALE = 2.0**-24


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32, in place, for int64 tensors holding values in [0, 2**32).

    Split into 16-bit halves so that no int64 product overflows (signed overflow is undefined
    behaviour in the C++ that backs torch; wrapping cannot be relied on).
    """
    lo = x & 0xFFFF
    x >>= 16
    x.mul_(c).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.add_(lo.mul_(c)).bitwise_and_(MASK32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 finaliser on an int64 tensor of 32-bit words (values in [0, 2**32))."""
    x = x ^ (x >> 16)
    _mul32_(x, _M1)
    x ^= x >> 15
    _mul32_(x, _M2)
    x ^= x >> 15
    return x


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (used for keys and seed derivation)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def check_seed(seed: int) -> int:
    """Validate a 32-bit seed; kernels take it as uint32."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**32), got {type(seed).__name__}")
    if not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def keys(seed: int) -> tuple[int, int]:
    """The two per-call keys derived from a 32-bit seed."""
    key1 = mix32_int(check_seed(seed) ^ GOLDEN)
    return key1, mix32_int(key1 ^ _K2)


# Counters are hashed in chunks that stay in cache: the hash is ~20 elementwise passes, and
# running them over a whole 16M-element tensor is memory-bound (5-10x slower).
_CHUNK = 1 << 14


def random_u32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """32 random bits per counter in ``index`` (int64, >= 0), as int64 values in [0, 2**32)."""
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    key1, key2 = keys(seed)
    flat = index.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _CHUNK):
        i = flat[start : start + _CHUNK]
        h = mix32((i & MASK32) ^ key1)
        h += (i >> 32) + key2
        out[start : start + _CHUNK] = mix32(h.bitwise_and_(MASK32))
    return out.reshape(index.shape)


def uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) per counter: ``(random_u32 >> 8) * 2**-24`` (exact in float32)."""
    return (random_u32(seed, index) >> 8).to(torch.float32) * UNIFORM_SCALE


def uniform_like(seed: int, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """One uniform per element of ``x``, counter = ``offset`` + flat (row-major) element index."""
    idx = torch.arange(offset, offset + x.numel(), dtype=torch.int64, device=x.device)
    return uniform(seed, idx).reshape(x.shape)


def derive_seed(base_seed: int, *counters: int) -> int:
    """Fold counters (step, boundary id, rank, ...) into a fresh 32-bit seed, in Python.

    ``derive_seed(s, step, boundary)`` differs for every (step, boundary), so each exchange draws
    independent bits while both ends of a link (and every implementation) agree on them.
    """
    s = mix32_int(check_seed(base_seed) ^ GOLDEN)
    for c in counters:
        if c < 0:
            raise ValueError(f"seed counters must be >= 0, got {c}")
        s = mix32_int(s ^ mix32_int((c & MASK32) + GOLDEN) ^ (c >> 32))
    return s
