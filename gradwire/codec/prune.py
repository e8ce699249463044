"""The prune codec: stochastic pruning at the analytic threshold (paper 001, Eq. 5 and 8), with a
compact encoding of the result.

After ``y = numerics.pruning.stochastic_prune(x, a, seed=seed)`` every element is 0, +-a, or
"kept" (``|x| > a``, and every non-finite element). Payload, four byte-aligned sections::

    1. nonzero positions     a bitmap (numel bits) or two Rice streams (below), whichever is smaller
    2. is-alpha bits         one per nonzero    1 = +-a, 0 = kept
    3. sign bits             one per +-a entry  1 = negative
    4. kept values           FP codes of ``kept_bits`` (sign inside the code, NaN via the
                             reserved code) or raw values in the source dtype (kept_bits=None)

The sign of a kept value lives in its FP code only, so no element stores its sign twice. At
S=0.8 on a sigma_ln=2 lognormal (~12% +-a, ~8% kept) that is 1 + 0.2 + 0.12 + 0.08*8 = 1.96 bits
per element; at S=0.9, ~1.41 (NOTES-ON-SEEDS.md: the paper's App. A.10 claims 4 and 2).

Positions (section 1). The bitmap costs 1 bit per element, but the positions' entropy at density
d is only H(d) (0.72 bits at d=0.2, 0.47 at d=0.1), and heavier tails (sigma_ln=3, 4) keep more
values and need the saving. The alternative is Rice coding (Golomb with divisor 2**k) of the
m = nnz+1 gaps g: g_0 = index of the first nonzero, g_i = zeros between nonzeros i-1 and i,
g_nnz = zeros after the last one (this closing gap makes the gaps sum to numel - nnz, which both
checks the stream and bounds numel by the payload). Each gap is q = g >> k, r = g & (2**k - 1),
laid out as two streams so that both directions vectorise (no Python loop over elements)::

    1a. quotients   sum(q) + m bits: q zero-bits then a one-bit per gap, zero-padded to a byte
    1b. remainders  m codes of k bits (bitpack; absent for k = 0)

Decoding finds the one-bits (``nonzero``), differences them into q, adds r and cumsums. The
terminator is a one-bit (not a zero-bit) so that the stream's bit length needs no field: it ends at
its last one-bit, the zero padding after it is bitpack's, and its byte length is what the payload
has left after the other sections. k in 0..8 (bitpack's widths) minimises the exact stream size.

Header compatibility: the parameter block keeps its size and layout. Its kept-format byte was 0/1;
bit 1 now flags Rice positions and bits 4..7 carry k (``FLAG_*``). Packets written before Rice
existed have bits 1..7 clear and decode unchanged, so FORMAT_VERSION stays 1; an older receiver
rejects a Rice packet with its "kept format flag" PacketError rather than misreading it. The
encoder (``positions="auto"``) picks Rice only when it is strictly smaller than the bitmap (the
header is the same size); ``"bitmap"`` / ``"rice"`` force one.

Reference semantics (what ``decode(encode(x, seed=s))`` equals exactly): ``y`` as above with
``a = pruning.effective_alpha(lognormal.pruning_threshold_for(fit, S), x.dtype)``; kept entries
replaced by ``numerics.fp.quantize(y, fmt, rounding, scale_exp=e, seed=rng.derive_seed(s, 1))``
(flat element index as counter; the derived seed keeps rounding independent of the pruning draws).
``e`` is the largest power of two that keeps the largest finite kept magnitude within
``fmt.max_value`` (kept values are the upper tail, so the scale is anchored at the top).

Kernels: pruning, FP coding and packing run on ``gradwire.ops`` (``stochastic_prune``,
``fp_encode`` / ``fp_decode``, ``pack_bits``): native when loaded, same bytes either way.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import torch

from gradwire.codec.base import Codec, check_input, decode_dtype
from gradwire.codec.bitpack import pack_bits, packed_nbytes, unpack_bits
from gradwire.codec.fp import (
    FORMAT_PARAMS,
    amax_scale_exp,
    check_bits,
    check_rounding,
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
    parse_packet,
    unpack_params,
)

# alpha (float32), kept-format flag (1 = FP codes, 0 = raw), FP format block, nnz, n_alpha.
PRUNE_PARAMS = struct.Struct("<fB" + FORMAT_PARAMS.format[1:] + "QQ")
# The kept-format byte of PRUNE_PARAMS: bit 0 kept values are FP codes (else raw), bit 1 Rice
# positions (else bitmap), bits 4..7 the Rice k; bits 2..3 must be zero.
FLAG_FMT, FLAG_RICE, K_SHIFT = 1, 2, 4
MAX_RICE_K = 8  # remainders go through bitpack, 1..8 bits
POSITIONS = ("auto", "bitmap", "rice")


def rice_gaps(nonzero: torch.Tensor) -> torch.Tensor:
    """The nnz+1 gaps (int64) of a flat bool mask: zeros before each nonzero, then after the last."""
    n = nonzero.numel()
    idx = torch.nonzero(nonzero).reshape(-1)
    ends = torch.tensor([-1], dtype=torch.int64, device=idx.device), torch.tensor([n], dtype=torch.int64, device=idx.device)
    return torch.diff(torch.cat([ends[0], idx, ends[1]])) - 1


def rice_size(gaps: torch.Tensor) -> tuple[int, int, int]:
    """(bytes, k, quotient bits) of the smallest Rice coding of ``gaps`` over k in 0..MAX_RICE_K.

    Exact: quotient bits = sum(g >> k) + len(gaps), remainder bytes = ceil(len * k / 8).
    """
    m = gaps.numel()
    best = None
    for k in range(MAX_RICE_K + 1):
        qbits = int((gaps >> k).sum()) + m
        size = (qbits + 7) // 8 + (m * k + 7) // 8
        if best is None or size < best[0]:
            best = (size, k, qbits)
    return best


def rice_encode(gaps: torch.Tensor, k: int, qbits: int) -> torch.Tensor:
    """Streams 1a and 1b (module doc) as one uint8 tensor."""
    q = gaps >> k
    bits = torch.zeros(qbits, dtype=torch.uint8, device=gaps.device)
    bits[torch.cumsum(q + 1, 0) - 1] = 1  # each code ends with its one-bit
    streams = [pack_bits(bits, 1)]
    if k:
        streams.append(pack_bits((gaps & ((1 << k) - 1)).to(torch.uint8), k))
    return torch.cat(streams)


def rice_decode(qstream: torch.Tensor, rstream: torch.Tensor, m: int, k: int, total: int) -> torch.Tensor:
    """The m gaps from the two streams; PacketError unless there are exactly m codes, the last
    one-bit lies in the stream's last byte (no stray trailing bytes) and the gaps sum to ``total``
    (= numel - nnz: the positions neither run past numel nor stop short of it)."""
    nbits = 8 * qstream.numel()
    ends = torch.nonzero(unpack_bits(qstream, nbits, 1)).reshape(-1)
    last = int(ends[-1]) if ends.numel() else -1
    if ends.numel() != m or last < nbits - 8:
        raise PacketError(f"prune rice quotients: expected {m} codes, the last ending in the final byte of "
                          f"{qstream.numel()}; found {ends.numel()} codes, the last ending at bit {last}")
    q = torch.diff(ends, prepend=torch.tensor([-1], dtype=torch.int64, device=ends.device)) - 1
    gaps = q << k
    if k:
        gaps |= unpack_bits(rstream, m, k).to(torch.int64)
    got = int(gaps.sum())
    if got != total:
        raise PacketError(f"prune rice positions: gaps sum to {got}, expected numel - nnz = {total} "
                          f"(positions would run past numel or stop short of it)")
    return gaps


class PruneCodec(Codec):
    """Stochastic pruning to an expected ``sparsity`` with a compact, variable-size payload.

    Args:
        sparsity: expected fraction of zeros, in [0, 1) (exact zeros count towards it).
        kept_bits: bits of the kept values' FP format (2..8), or None to send them raw.
        kept_exp_bits: exponent bits of that format (default: 4 for 8 bits, i.e. E4M3; else
            roughly half the magnitude bits).
        rounding: rounding of kept values, "stochastic" (unbiased, default) or "nearest".
        positions: encoding of the nonzero positions: "auto" (default: Rice when the packet is
            smaller, else the bitmap; meets the issue-3 size goals at sigma_ln 2..4), "bitmap" or
            "rice" (forced). Any receiver decodes all of them.

    At very high sparsity the packet gets small enough that the fixed header (~60 bytes) is no
    longer negligible: S=0.99 on 64K elements is ~0.88 KiB (0.11 bits/element), header 6.8%.
    """

    name = "prune"
    codec_id = 6
    fixed_rate = False

    def __init__(self, sparsity: float, kept_bits: int | None = 8, kept_exp_bits: int | None = None,
                 rounding: str = "stochastic", positions: str = "auto"):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        self.sparsity = float(sparsity)
        self.kept_bits = None if kept_bits is None else check_bits("kept_bits", kept_bits, 2, 8)
        if kept_bits is None:
            if kept_exp_bits is not None:
                raise ValueError("kept_exp_bits needs kept_bits (raw kept values have no format)")
            self.kept_exp_bits = None
        else:
            default = 4 if kept_bits == 8 else max(1, kept_bits // 2)
            e = default if kept_exp_bits is None else kept_exp_bits
            self.kept_exp_bits = check_bits("kept_exp_bits", e, 1, min(7, kept_bits - 1))
        self.rounding = check_rounding(rounding)
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.positions = positions

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sparsity": self.sparsity, "kept_bits": self.kept_bits,
                "kept_exp_bits": self.kept_exp_bits, "rounding": self.rounding,
                "positions": self.positions}

    def _fmt(self):
        from gradwire.numerics.fp import FPFormat

        return FPFormat(self.kept_exp_bits, self.kept_bits - 1 - self.kept_exp_bits)

    def threshold(self, x: torch.Tensor, fit: Any | None = None) -> float:
        """The effective threshold a (exact in x.dtype and float32) ``encode`` uses."""
        from gradwire.numerics.lognormal import pruning_threshold_for
        from gradwire.numerics.pruning import effective_alpha

        if self.sparsity == 0 or x.numel() == 0:
            return 0.0
        f = usable_fit(x, fit)
        if f is None:  # all zeros / non-finite: nothing to prune
            return 0.0
        # Capped at the dtype's largest finite value (fp16: 65504) so that a target near 1 prunes
        # everything finite instead of failing on an unrepresentable threshold.
        alpha = min(pruning_threshold_for(f, self.sparsity), torch.finfo(x.dtype).max)
        return effective_alpha(alpha, x.dtype)

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        from gradwire import ops
        from gradwire.numerics.rng import derive_seed

        x = check_input(x, self.name)
        a = self.threshold(x, fit)
        y = ops.stochastic_prune(x, a, seed=seed).reshape(-1)
        nonzero = y != 0  # NaN != 0: non-finite entries are nonzero
        yf = y.float()
        is_alpha = (yf.abs() == a) & nonzero if a > 0 else torch.zeros_like(nonzero)
        kept = nonzero & ~is_alpha
        nnz = int(nonzero.sum())
        rice = None
        if self.positions != "bitmap":
            gaps = rice_gaps(nonzero)
            size, k, qbits = rice_size(gaps)
            if self.positions == "rice" or size < packed_nbytes(nonzero.numel(), 1):
                rice = (k, qbits)
                pos_section = rice_encode(gaps, k, qbits)
        if rice is None:
            pos_section = pack_bits(nonzero.to(torch.uint8), 1)
        sections = [pos_section,
                    pack_bits(is_alpha[nonzero].to(torch.uint8), 1),
                    pack_bits(torch.signbit(yf[is_alpha]).to(torch.uint8), 1)]
        if self.kept_bits is None:
            sections.append(y[kept].contiguous().view(torch.uint8))
            fmt_block = FORMAT_PARAMS.pack(0, 0, 0, 0, 0, 0)
        else:
            fmt = self._fmt()
            kv = yf[kept]
            finite = kv[torch.isfinite(kv)]
            amax = float(finite.abs().max()) if finite.numel() else 0.0
            scale_exp = amax_scale_exp(amax, fmt.max_value)
            # The rounding counter is the flat index into y (not into the kept values), so the
            # whole of y goes through the fused kernel and the kept codes are picked afterwards.
            packed, _ = ops.fp_encode(y, fmt, self.rounding, scale_exp=scale_exp, seed=derive_seed(seed, 1),
                                      with_stats=False)
            codes = packed if fmt.bits == 8 else ops.unpack_bits(packed, fmt.bits, y.numel())
            sections.append(pack_bits(codes[kept], fmt.bits))
            fmt_block = pack_format(fmt, self.rounding, scale_exp)
        flag = (FLAG_FMT if self.kept_bits is not None else 0) | (0 if rice is None else FLAG_RICE | rice[0] << K_SHIFT)
        params = PRUNE_PARAMS.pack(a, flag, *FORMAT_PARAMS.unpack(fmt_block), nnz, int(is_alpha.sum()))
        return build_packet(self.codec_id, x.dtype, x.shape, params, torch.cat(sections))

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Expected | None = None) -> torch.Tensor:
        from gradwire import ops

        h, payload = parse_packet(packet, expect)
        check_codec_id(h, self.codec_id, self.name)
        a, flag, *fmt_fields, nnz, n_alpha = unpack_params(h, PRUNE_PARAMS, self.name)
        if not (math.isfinite(a) and a >= 0):
            raise PacketError(f"prune alpha: expected a finite threshold >= 0, found {a}")
        has_fmt, rice, k = flag & FLAG_FMT, bool(flag & FLAG_RICE), flag >> K_SHIFT
        if flag & 0b1100 or k > (MAX_RICE_K if rice else 0):
            raise PacketError(f"prune kept format flag: expected bit 0 = FP codes, bit 1 = Rice positions, "
                              f"bits 4..7 = Rice k <= {MAX_RICE_K} (0 without Rice), found {flag:#04x}")
        if has_fmt:
            fmt, rounding, scale_exp = unpack_format(tuple(fmt_fields), self.name)
            sent = {"kept_bits": fmt.bits, "kept_exp_bits": fmt.exp_bits, "rounding": rounding}
        else:
            if any(fmt_fields):
                raise PacketError(f"prune kept format: raw kept values need a zero format block, found {fmt_fields}")
            sent = {"kept_bits": None, "kept_exp_bits": None, "rounding": self.rounding}
        check_config({"name": self.name, **sent}, self.config(), ["kept_bits", "kept_exp_bits", "rounding"])
        n = h.numel
        if not (nnz <= n and n_alpha <= nnz):
            raise PacketError(f"prune counts: expected n_alpha <= nnz <= numel={n}, found nnz={nnz}, n_alpha={n_alpha}")
        n_kept = nnz - n_alpha
        m = nnz + 1
        tail = [packed_nbytes(nnz, 1), packed_nbytes(n_alpha, 1),
                packed_nbytes(n_kept, fmt.bits) if has_fmt else n_kept * h.src_dtype.itemsize]
        if rice:
            # The quotient stream takes what the other sections leave. Its sum(q) + m bits fill
            # its last byte partly: qbytes = ceil((sum(q) + m) / 8) and sum(q) = sum(g >> k),
            # with sum(g) = numel - nnz, so sum(q) lies in [(numel - nnz) >> k - m, (numel - nnz) >> k].
            # Checked with Python ints before anything is allocated, which also bounds numel by
            # ~2**k * 8 * payload bytes: a forged huge shape cannot allocate.
            rbytes = packed_nbytes(m, k) if k else 0
            qbytes = h.payload_len - rbytes - sum(tail)
            lo, hi = max(0, ((n - nnz) >> k) - m) + m, ((n - nnz) >> k) + m
            if qbytes < 1 or not (lo + 7) // 8 <= qbytes <= (hi + 7) // 8:
                raise PacketError(f"prune rice streams: the payload leaves {qbytes} quotient bytes; nnz={nnz}, "
                                  f"k={k}, numel={n} need {(lo + 7) // 8}..{(hi + 7) // 8}")
            sizes = [qbytes, rbytes] + tail
        else:
            sizes = [packed_nbytes(n, 1)] + tail
        # Sizes are Python ints: a corrupt shape is rejected here, before any allocation.
        check_payload_len(h, sum(sizes), self.name)
        out_dtype = decode_dtype(dtype, h.src_dtype)
        parts = torch.split(payload, sizes)
        if rice:
            qstream, parts = parts[0], parts[1:]  # parts[0] is now the remainder stream
        try:
            if rice:
                gaps = rice_decode(qstream, parts[0], m, k, n - nnz)
                # gaps >= 0, so positions are strictly increasing; the sum check keeps them < numel.
                positions = torch.cumsum(gaps[:-1] + 1, 0) - 1
            else:
                nonzero = unpack_bits(parts[0], n, 1).bool()
            is_alpha = unpack_bits(parts[1], nnz, 1).bool()
            neg = unpack_bits(parts[2], n_alpha, 1).bool()
            if has_fmt:
                kept_vals = saturate_decoded(
                    ops.fp_decode(parts[3], n_kept, fmt, scale_exp=scale_exp, dtype=torch.float32), fmt, scale_exp)
            else:
                kept_vals = parts[3].clone().view(h.src_dtype).float()
        except (ValueError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "padding" not in str(e):
                raise
            raise PacketError(f"prune payload: {e}") from None
        n_nz = nnz if rice else int(nonzero.sum())  # rice_decode has checked its code count
        if n_nz != nnz or int(is_alpha.sum()) != n_alpha:
            raise PacketError(
                f"prune payload: bitmaps hold {n_nz} nonzeros / {int(is_alpha.sum())} "
                f"alpha entries, header says {nnz} / {n_alpha}"
            )
        nz_vals = torch.empty(nnz, dtype=torch.float32, device=payload.device)
        a_t = torch.tensor(a, dtype=torch.float32, device=payload.device)
        nz_vals[is_alpha] = torch.where(neg, -a_t, a_t)
        nz_vals[~is_alpha] = kept_vals
        y = torch.zeros(n, dtype=torch.float32, device=payload.device)
        y[positions if rice else nonzero] = nz_vals
        # A finite value arrives finite (numerics.fp.saturating_cast); the pass is paid only when
        # the largest value the packet can hold exceeds the output dtype's range.
        top = max(a, fmt.max_value * 2.0 ** -scale_exp if has_fmt else torch.finfo(h.src_dtype).max)
        if top > torch.finfo(out_dtype).max:
            return saturating_cast(y, out_dtype).reshape(h.shape)
        return y.reshape(h.shape).to(out_dtype)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        raise TypeError("the prune codec is variable-size: use max_packed_size or the packet's length")

    def max_packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Upper bound: every element nonzero, with a sign bit and a kept value each (more than
        any real packet, which has one or the other per nonzero)."""
        from gradwire.codec.header import dtype_code, header_size

        dtype_code(dtype)
        n = 1
        for d in shape:
            n *= int(d)
        kept = packed_nbytes(n, self.kept_bits) if self.kept_bits else n * dtype.itemsize
        # Positions: the bitmap's n bits, or Rice streams, which at k = 0 take n + 1 bits (one
        # terminator per gap, nnz + 1 gaps, sum(q) = n - nnz) and at the chosen k no more.
        return header_size(shape, PRUNE_PARAMS.size) + packed_nbytes(n + 1, 1) + 2 * packed_nbytes(n, 1) + kept
