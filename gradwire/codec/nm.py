"""The N:M codec: MVUE 1:2, exact/approx MVUE 2:4 (paper 004) and greedy N:M, packed as index
metadata plus kept values. Fixed-rate: the size depends only on shape and configuration.

Semantics are ``gradwire.numerics.nm``: the ``*_select`` functions give the compact form
(values float32 ``[..., n_blocks, N]``, ascending indices ``[..., n_blocks, N]``; blocks are M
consecutive elements along ``dim``, block counter = flat block index, offset 0), and
``decode(encode(x, seed=s))`` equals ``nm.scatter_blocks(V, indices, M, x.shape, dim, dtype)`` where
V are the values, raw (rounded to the source dtype) or ``numerics.fp.quantize``-d in an FP format
of ``value_bits`` with ``seed = rng.derive_seed(s, 1)`` and counter = flat index into the values
(row-major over ``[..., n_blocks, N]``). The FP split comes from a lognormal fit of the kept values
themselves (``fp.choose_format``; MVUE values are block sums, not the input's distribution, so the
policy's fit of x does not describe them); the scale keeps the largest value unsaturated by default.

Payload::

    1. index metadata  per block: the rank of its index set among the C(M, N) sets in
                       lexicographic order, ceil(log2 C(M, N)) bits (1:2 -> 1 bit, 2:4 -> 3 bits:
                       six pairs, not 2 x 2 bits); when C(M, N) > 256, N indices of ceil(log2 M) bits
    2. values          N per block: FP codes (value_bits each) or raw source-dtype values

2:4 with FP8 values: (3 + 16) / 4 = 4.75 bits per element; 1:2 with FP8: 4.5.

``dim=None`` (the form for communication, where the blocks need not follow any axis): blocks
are M consecutive elements of the flattened (row-major) tensor, the last block zero-padded, so
any shape can be sent (a conv feature map ``(1, 384, 2, 2)`` with M = 4 included). Its packet
records the original shape and dim = ``FLAT_DIM``; it decodes to ``scatter_blocks`` of the
padded flat tensor, cut back to ``numel`` and reshaped. When ``shape[-1] % M == 0`` the blocks,
block counters and values are exactly those of ``dim=-1``.
"""
from __future__ import annotations

import functools
import itertools
import math
import struct
from typing import Any, Sequence

import torch

from gradwire.codec.base import Codec, canonical_nan, check_input, decode_dtype
from gradwire.codec.bitpack import pack_bits, packed_nbytes, unpack_bits
from gradwire.codec.fp import (
    FORMAT_PARAMS,
    check_bits,
    check_rounding,
    check_scale,
    choose_format,
    finite_amax,
    pack_format,
    saturate_decoded,
    unpack_format,
    usable_fit,
)
from gradwire.numerics.fp import saturating_cast
from gradwire.codec.header import (
    Expected,
    PacketError,
    build_packet,
    check_codec_id,
    check_config,
    check_payload_len,
    dtype_code,
    header_size,
    parse_packet,
    unpack_params,
)

METHODS = ("mvue", "mvue_approx", "greedy")
_METHOD_CODES = {m: i for i, m in enumerate(METHODS)}
MVUE_PATTERNS = {"mvue": ((1, 2), (2, 4)), "mvue_approx": ((2, 4),)}
MAX_M = 16
FLAT_DIM = 255  # the header's dim byte for dim=None (blocks over the flattened tensor)
# n, m, method, dim (normalised, >= 0), value flag (1 = FP codes, 0 = raw), FP format block.
NM_PARAMS = struct.Struct("<BBBBB" + FORMAT_PARAMS.format[1:])


@functools.lru_cache(maxsize=None)
def _index_scheme(n: int, m: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(bits per block of index metadata, rank table by bitmask, index sets by rank).

    Rank coding when C(m, n) <= 256 (codes fit a byte); otherwise per-slot indices (tables None).
    """
    count = math.comb(m, n)
    if count > 256:
        return n * max(1, math.ceil(math.log2(m))), None, None
    combos = list(itertools.combinations(range(m), n))
    rank_of_mask = torch.full((1 << m,), -1, dtype=torch.int64)
    for r, c in enumerate(combos):
        rank_of_mask[sum(1 << i for i in c)] = r
    return max(1, math.ceil(math.log2(count))), rank_of_mask, torch.tensor(combos, dtype=torch.int64)


def _saturate_block_sums(values: torch.Tensor, x: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """MVUE keeps block sums (|a| + |b|, computed in float32), which overflow to inf for finite
    float32/bf16 inputs near float32's max. A block whose inputs are all finite must send finite
    values: those infs saturate to +-float32 max (the bias sits only at that edge). Blocks with a
    non-finite input keep theirs (non-finite data, architecture.md). One ``any()`` pass over the
    values; the block test runs only when an inf is there."""
    inf = torch.isinf(values)
    if not bool(inf.any()):
        return values
    xm = x.movedim(dim, -1)
    finite_block = torch.isfinite(xm).reshape(*xm.shape[:-1], xm.shape[-1] // m, m).all(-1)
    big = torch.finfo(torch.float32).max
    return torch.where(inf & finite_block.unsqueeze(-1), values.sign() * big, values)


class NMCodec(Codec):
    """N:M sparsification of a tensor along ``dim`` (``x.shape[dim] % m == 0`` or ValueError).

    Args:
        n, m: keep n of every m consecutive elements (1 <= n < m <= 16).
        method: "mvue" (1:2 Eq. 7, or exact 2:4 App. A.2; unbiased), "mvue_approx" (2:4, Eq. 25;
            unbiased) or "greedy" (keep the n largest: biased, for activations only).
        value_bits: FP bits of the kept values (2..8), or None to send them raw.
        value_exp_bits: fixed exponent bits of that format; None chooses by Eq. 4 per tensor.
        rounding: rounding of the kept values, "stochastic" (default) or "nearest".
        value_scale: "amax" (default: no saturation, so MVUE + stochastic rounding stays unbiased)
            or "optimal" (least expected relative error of the values' lognormal fit).
        dim: the dimension along which blocks are formed, or None: blocks over the flattened
            tensor, tail zero-padded (any shape; see the module doc).
    """

    name = "nm"
    codec_id = 7
    fixed_rate = True

    def __init__(self, n: int, m: int, method: str = "mvue", value_bits: int | None = None,
                 value_exp_bits: int | None = None, rounding: str = "stochastic", value_scale: str = "amax",
                 dim: int = -1):
        self.m = check_bits("m", m, 2, MAX_M)
        self.n = check_bits("n", n, 1, m - 1)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method in MVUE_PATTERNS and (n, m) not in MVUE_PATTERNS[method]:
            raise ValueError(f"method {method!r} exists for n:m in {MVUE_PATTERNS[method]}, got {n}:{m}")
        self.method = method
        self.value_bits = None if value_bits is None else check_bits("value_bits", value_bits, 2, 8)
        if value_bits is None and value_exp_bits is not None:
            raise ValueError("value_exp_bits needs value_bits (raw values have no format)")
        self.value_exp_bits = (None if value_exp_bits is None
                               else check_bits("value_exp_bits", value_exp_bits, 1, min(7, value_bits - 1)))
        self.rounding = check_rounding(rounding)
        self.value_scale = check_scale(value_scale)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise ValueError(f"dim must be an int or None (flattened blocks), got {dim!r}")
        self.dim = dim

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "m": self.m, "method": self.method,
                "value_bits": self.value_bits, "value_exp_bits": self.value_exp_bits,
                "rounding": self.rounding, "value_scale": self.value_scale, "dim": self.dim}

    def select(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The numerics compact form (values, indices) this codec sends: the MVUE selections via
        ``gradwire.ops.nm_select`` (native kernel when loaded; same bits as ``numerics.nm``),
        greedy via ``numerics.nm.greedy_nm_select`` (reference only: activations, not hot)."""
        from gradwire import ops
        from gradwire.numerics import nm

        dim = -1 if self.dim is None else self.dim  # dim=None: x is the padded flat tensor
        if self.method == "greedy":
            return nm.greedy_nm_select(x, self.n, self.m, dim=dim)
        scheme = "mvue_24_approx" if self.method == "mvue_approx" else (
            "mvue_12" if self.m == 2 else "mvue_24_exact")
        return ops.nm_select(x, scheme, dim=dim, seed=seed)

    def choose(self, values: torch.Tensor) -> tuple[Any, int]:
        """(FPFormat, scale_exp) for the kept values (FP mode only)."""
        return choose_format(self.value_bits, self.value_exp_bits, self.rounding, usable_fit(values, None),
                             self.value_scale, finite_amax(values))

    def _norm_dim(self, ndim: int) -> int:
        if not -ndim <= self.dim < ndim:
            raise ValueError(f"dim={self.dim} is out of range for a {ndim}-d tensor")
        return self.dim % ndim

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        from gradwire import ops
        from gradwire.numerics.rng import derive_seed

        x = check_input(x, self.name)
        shape = x.shape
        if self.dim is None:
            dim, x = FLAT_DIM, self._flat_padded(x)
        else:
            dim = self._norm_dim(x.dim())
            if x.shape[dim] % self.m:
                raise ValueError(f"N:M blocks of M={self.m} need x.shape[{self.dim}] divisible by {self.m}, "
                                 f"got shape {tuple(x.shape)} (dim=None blocks the flattened tensor)")
        values, indices = self.select(x, seed)
        values = _saturate_block_sums(values, x, dim, self.m)
        idx_bits, rank_of_mask, _ = _index_scheme(self.n, self.m)
        flat_idx = indices.reshape(-1, self.n).to(torch.int64)
        if rank_of_mask is not None:
            mask = (1 << flat_idx).sum(dim=1)
            meta = rank_of_mask.to(x.device)[mask].to(torch.uint8)
            meta_bytes = pack_bits(meta, idx_bits)
        else:
            meta_bytes = pack_bits(flat_idx.to(torch.uint8).reshape(-1), idx_bits // self.n)
        if self.value_bits is None:
            # MVUE values are block sums: finite ones above x.dtype's range saturate there
            # (numerics.fp.saturating_cast), so a finite gradient arrives finite.
            val_bytes = canonical_nan(saturating_cast(values.reshape(-1), x.dtype)).contiguous().view(torch.uint8)
            fmt_block = FORMAT_PARAMS.pack(0, 0, 0, 0, 0, 0)
        else:
            fmt, scale_exp = self.choose(values)
            val_bytes, _ = ops.fp_encode(values, fmt, self.rounding, scale_exp=scale_exp,
                                         seed=derive_seed(seed, 1), with_stats=False)
            fmt_block = pack_format(fmt, self.rounding, scale_exp)
        params = NM_PARAMS.pack(self.n, self.m, _METHOD_CODES[self.method], dim,
                                int(self.value_bits is not None), *FORMAT_PARAMS.unpack(fmt_block))
        return build_packet(self.codec_id, x.dtype, shape, params, torch.cat([meta_bytes, val_bytes]))

    def _flat_padded(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        if flat.numel() % self.m:
            flat = torch.cat([flat, flat.new_zeros(self.m - flat.numel() % self.m)])
        return flat

    def _sizes(self, shape: Sequence[int], dtype: torch.dtype, value_bits: int | None) -> list[int]:
        blocks = -(-math.prod(int(d) for d in shape) // self.m)  # flat: the padded tail block counts
        idx_bits, _, _ = _index_scheme(self.n, self.m)
        vals = (packed_nbytes(blocks * self.n, value_bits) if value_bits
                else blocks * self.n * dtype.itemsize)
        return [(blocks * idx_bits + 7) // 8, vals]  # metadata, values

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Expected | None = None) -> torch.Tensor:
        from gradwire import ops
        from gradwire.numerics.nm import scatter_blocks

        h, payload = parse_packet(packet, expect)
        check_codec_id(h, self.codec_id, self.name)
        n, m, mcode, dim, has_fmt, *fmt_fields = unpack_params(h, NM_PARAMS, self.name)
        if mcode >= len(METHODS):
            raise PacketError(f"nm method: expected a code < {len(METHODS)}, found {mcode}")
        if has_fmt not in (0, 1):
            raise PacketError(f"nm value format flag: expected 0 or 1, found {has_fmt}")
        if has_fmt:
            fmt, rounding, scale_exp = unpack_format(tuple(fmt_fields), self.name)
        elif any(fmt_fields):
            raise PacketError(f"nm value format: raw values need a zero format block, found {fmt_fields}")
        else:
            fmt, rounding = None, self.rounding
        ndim = len(h.shape)
        flat = dim == FLAT_DIM
        if not flat and (ndim == 0 or dim >= ndim):
            raise PacketError(f"nm dim: expected a dimension of shape {h.shape}, found dim={dim}")
        sent = {"name": self.name, "n": n, "m": m, "method": METHODS[mcode],
                "value_bits": fmt.bits if fmt else None, "rounding": rounding, "dim": None if flat else dim}
        mine = {**self.config(), "dim": (self.dim % ndim if self.dim is not None and -ndim <= self.dim < ndim
                                         else self.dim)}
        keys = ["n", "m", "method", "value_bits", "rounding", "dim"]
        if self.value_exp_bits is not None:
            sent["value_exp_bits"] = fmt.exp_bits if fmt else None
            keys.append("value_exp_bits")
        check_config(sent, mine, keys)
        if not flat and h.shape[dim] % m:
            raise PacketError(f"nm shape: expected shape[{dim}] divisible by m={m}, found shape {h.shape}")
        sizes = self._sizes(h.shape, h.src_dtype, fmt.bits if fmt else None)
        check_payload_len(h, sum(sizes), self.name)  # bounds numel before allocating
        out = decode_dtype(dtype, h.src_dtype)
        blocks = -(-h.numel // m)
        idx_bits, _, combos = _index_scheme(n, m)
        meta, vals = torch.split(payload, sizes)
        try:
            if combos is not None:
                ranks = unpack_bits(meta, blocks, idx_bits).to(torch.int64)
                if blocks and int(ranks.max()) >= combos.shape[0]:
                    raise ValueError(f"index-set rank {int(ranks.max())} >= C({m},{n}) = {combos.shape[0]}")
                indices = combos.to(payload.device)[ranks]
            else:
                indices = unpack_bits(meta, blocks * n, idx_bits // n).to(torch.int64).reshape(blocks, n)
                if blocks and (int(indices.max()) >= m or bool((indices.diff(dim=1) <= 0).any())):
                    raise ValueError("block indices must be ascending and < m")
            if fmt is not None:
                values = saturate_decoded(ops.fp_decode(vals, blocks * n, fmt, scale_exp=scale_exp,
                                                        dtype=torch.float32), fmt, scale_exp)
            else:
                values = vals.clone().view(h.src_dtype).float()
        except (ValueError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "padding" not in str(e):
                raise
            raise PacketError(f"nm payload: {e}") from None
        top = fmt.max_value * 2.0 ** -scale_exp if fmt is not None else torch.finfo(h.src_dtype).max
        if top > torch.finfo(out).max:  # scatter_blocks casts to out: saturate finite values first
            values = torch.where(torch.isfinite(values), values.clamp(-torch.finfo(out).max, torch.finfo(out).max),
                                 values)
        if flat:
            dense = scatter_blocks(values.reshape(blocks, n), indices.to(torch.uint8).reshape(blocks, n), m,
                                   (blocks * m,), 0, out)
            return dense[:h.numel].reshape(h.shape)
        moved = h.shape[:dim] + h.shape[dim + 1:] + (h.shape[dim] // m, n)
        return scatter_blocks(values.reshape(moved), indices.to(torch.uint8).reshape(moved), m, h.shape, dim, out)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        dtype_code(dtype)
        shape = tuple(int(d) for d in shape)
        if self.dim is None:
            return header_size(shape, NM_PARAMS.size) + sum(self._sizes(shape, dtype, self.value_bits))
        dim = self._norm_dim(len(shape)) if shape else None
        if dim is None or shape[dim] % self.m:
            raise ValueError(f"N:M blocks of M={self.m} need shape[{self.dim}] divisible by {self.m}, got {shape}")
        return header_size(shape, NM_PARAMS.size) + sum(self._sizes(shape, dtype, self.value_bits))
