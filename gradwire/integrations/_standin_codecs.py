"""STAND-IN codecs for the DeepSpeed integration, used only while ``gradwire.codec.{fp,nm,prune}``
are missing from the tree (they are written by other engineers; ``codec_from_spec`` in
``gradwire.integrations.deepspeed`` prefers the registry and falls back here).

They implement the same ``Codec`` interface with the shared wire header and bit packing, and the
same mathematics (stochastic rounding onto an FP grid; MVUE 1:2 of paper 004 Eq. 7; greedy N:M;
stochastic pruning of paper 001 Eq. 5), written compactly and without the analytic format and
threshold choice of the real ones. Delete this file when the registry codecs have landed.
"""
from __future__ import annotations

import math
import struct
from typing import Any, ClassVar, Sequence

import torch

from gradwire.codec.base import Codec, check_input, decode_dtype
from gradwire.codec.bitpack import pack_bits, packed_nbytes, unpack_bits
from gradwire.codec.header import build_packet, header_size, parse_packet
from gradwire.numerics.rng import uniform_like

_PARAMS = struct.Struct("<iii")  # three int32 codec parameters in every stand-in header


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def fp_table(exp_bits: int, man_bits: int) -> torch.Tensor:
    """All non-negative values of a 1-e-m format (bias 2^(e-1)-1, subnormals), ascending."""
    bias = 2 ** (exp_bits - 1) - 1
    vals = []
    for e in range(2 ** exp_bits):
        for m in range(2 ** man_bits):
            if e == 0:
                vals.append(m / 2 ** man_bits * 2.0 ** (1 - bias))
            else:
                vals.append((1 + m / 2 ** man_bits) * 2.0 ** (e - bias))
    return torch.tensor(vals, dtype=torch.float64).to(torch.float32)


# Table 2 of paper 001 at sigma = 4 (NOTES-ON-SEEDS.md): exponent bits per total bits.
_DEFAULT_EXP = {3: 2, 4: 3, 5: 4, 6: 4, 7: 4, 8: 5}


class StandinFPCodec(Codec):
    name = "fp"
    codec_id: ClassVar[int] = 201
    fixed_rate = True

    def __init__(self, bits: int = 6, exp_bits: int | None = None, rounding: str = "stochastic"):
        self.bits, self.rounding = bits, rounding
        self.exp_bits = exp_bits if exp_bits is not None else _DEFAULT_EXP[bits]
        self.man_bits = bits - 1 - self.exp_bits
        self.table = fp_table(self.exp_bits, self.man_bits)

    def _scale_exp(self, x: torch.Tensor) -> int:
        # Centre mean(log2|g|) in the exponent range (paper 001 App. A.6 idea; no Eq. 4 search).
        a = x.abs()
        nz = a[(a > 0) & torch.isfinite(a)]
        if nz.numel() == 0:
            return 0
        mu = float(torch.log2(nz).mean())
        bias = 2 ** (self.exp_bits - 1) - 1
        centre = (1 - bias + (2 ** self.exp_bits - 1 - bias)) / 2
        return int(round(centre - mu))

    def encode(self, x, *, seed=0, fit=None):
        x = check_input(x, self.name)
        xf = x.float().reshape(-1)
        se = self._scale_exp(xf)
        a = (xf.abs() * 2.0 ** se).clamp(max=float(self.table[-1]))
        hi = torch.searchsorted(self.table, a).clamp(max=len(self.table) - 1)
        lo = (hi - 1).clamp(min=0)
        tl, th = self.table[lo], self.table[hi]
        exact = th == a
        gap = torch.where(th > tl, th - tl, torch.ones_like(th))
        if self.rounding == "stochastic":
            up = uniform_like(seed, a) < (a - tl) / gap  # P(up) = distance from lo: unbiased
        else:
            up = (a - tl) > (th - a)
        idx = torch.where(exact | up, hi, lo).to(torch.uint8)
        codes = idx | ((xf < 0).to(torch.uint8) << (self.bits - 1))
        return build_packet(self.codec_id, x.dtype, x.shape, _PARAMS.pack(self.bits, self.exp_bits, se),
                            pack_bits(codes, self.bits))

    def decode(self, packet, *, dtype=None):
        h, payload = parse_packet(packet)
        bits, exp_bits, se = _PARAMS.unpack(h.params)
        codes = unpack_bits(payload, h.numel, bits).long()
        mag = self.table[codes & ((1 << (bits - 1)) - 1)] * 2.0 ** (-se)
        val = torch.where((codes >> (bits - 1)) == 1, -mag, mag)
        return val.reshape(h.shape).to(decode_dtype(dtype, h.src_dtype))

    def packed_size(self, shape, dtype):
        return header_size(len(shape), _PARAMS.size) + packed_nbytes(_numel(shape), self.bits)

    def config(self):
        return {"name": self.name, "bits": self.bits, "exp_bits": self.exp_bits,
                "rounding": self.rounding}


class StandinNMCodec(Codec):
    """N:M along the last dim: payload = kept values (source dtype) + packed in-block indices."""

    name = "nm"
    codec_id: ClassVar[int] = 202
    fixed_rate = True

    def __init__(self, n: int = 1, m: int = 2, method: str = "mvue"):
        self.n, self.m, self.method = n, m, method
        self.idx_bits = max(1, (m - 1).bit_length())

    def _select(self, x, seed):
        from gradwire.numerics import nm

        if self.method == "greedy":
            return nm.greedy_nm_select(x, self.n, self.m)
        if (self.n, self.m) == (1, 2):
            return nm.mvue_12_select(x, seed=seed)
        if self.method == "mvue_approx":
            return nm.mvue_24_approx_select(x, seed=seed)
        return nm.mvue_24_exact_select(x, seed=seed)

    def encode(self, x, *, seed=0, fit=None):
        x = check_input(x, self.name)
        vals, keep = self._select(x.float(), seed)  # real numerics.nm (paper 004 Eq. 7 / App. A.2)
        payload = torch.cat([vals.to(x.dtype).contiguous().reshape(-1).view(torch.uint8),
                             pack_bits(keep.reshape(-1).to(torch.uint8), self.idx_bits)])
        return build_packet(self.codec_id, x.dtype, x.shape, _PARAMS.pack(self.n, self.m, 0), payload)

    def decode(self, packet, *, dtype=None):
        h, payload = parse_packet(packet)
        nb = h.numel // self.m
        vbytes = nb * self.n * h.src_dtype.itemsize
        vals = payload[:vbytes].clone().view(h.src_dtype).float().reshape(nb, self.n)
        keep = unpack_bits(payload[vbytes:], nb * self.n, self.idx_bits).long().reshape(nb, self.n)
        out = torch.zeros(nb, self.m).scatter_(1, keep, vals)
        return out.reshape(h.shape).to(decode_dtype(dtype, h.src_dtype))

    def packed_size(self, shape, dtype):
        nb = _numel(shape) // self.m
        return (header_size(len(shape), _PARAMS.size) + nb * self.n * dtype.itemsize
                + packed_nbytes(nb * self.n, self.idx_bits))

    def config(self):
        return {"name": self.name, "n": self.n, "m": self.m, "method": self.method}


class StandinPruneCodec(Codec):
    """Stochastic pruning (paper 001 Eq. 5) at the empirical |g| quantile; bitmap + kept values."""

    name = "prune"
    codec_id: ClassVar[int] = 203
    fixed_rate = False

    def __init__(self, sparsity: float = 0.8):
        self.sparsity = sparsity

    def encode(self, x, *, seed=0, fit=None):
        x = check_input(x, self.name)
        xf = x.float().reshape(-1)
        a = xf.abs()
        # alpha such that the expected zero fraction P(|g|<alpha) - E[|g|/alpha; |g|<alpha] hits
        # the target: bisection on the empirical distribution (the real codec uses Eq. 8).
        lo, hi = 0.0, float(a.max()) if a.numel() else 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            below = a < mid
            z = (below.float() - torch.where(below, a / max(mid, 1e-45), 0.0)).mean()
            lo, hi = (mid, hi) if float(z) < self.sparsity else (lo, mid)
        alpha = hi
        u = uniform_like(seed, xf)
        small = a < alpha
        out = torch.where(small, torch.where(u < a / max(alpha, 1e-45), xf.sign() * alpha, 0.0), xf)
        nz = out != 0
        payload = torch.cat([pack_bits(nz.to(torch.uint8), 1),
                             out[nz].to(x.dtype).contiguous().view(torch.uint8)])
        return build_packet(self.codec_id, x.dtype, x.shape, _PARAMS.pack(0, 0, 0), payload)

    def decode(self, packet, *, dtype=None):
        h, payload = parse_packet(packet)
        nb = packed_nbytes(h.numel, 1)
        nz = unpack_bits(payload[:nb], h.numel, 1).bool()
        out = torch.zeros(h.numel)
        out[nz] = payload[nb:].clone().view(h.src_dtype).float()
        return out.reshape(h.shape).to(decode_dtype(dtype, h.src_dtype))

    def packed_size(self, shape, dtype):
        raise TypeError("prune is variable-size; use max_packed_size")

    def max_packed_size(self, shape, dtype):
        n = _numel(shape)
        return header_size(len(shape), _PARAMS.size) + packed_nbytes(n, 1) + n * dtype.itemsize

    def config(self):
        return {"name": self.name, "sparsity": self.sparsity}
