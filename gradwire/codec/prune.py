"""The prune codec: stochastic pruning at the analytic threshold (paper 001, Eq. 5 and 8), with a
compact encoding of the result.

After ``y = numerics.pruning.stochastic_prune(x, a, seed=seed)`` every element is 0, +-a, or
"kept" (``|x| > a``, and every non-finite element). Payload, four byte-aligned sections::

    1. nonzero bitmap        numel bits         (bitpack, 1 bit per element)
    2. is-alpha bits         one per nonzero    1 = +-a, 0 = kept
    3. sign bits             one per +-a entry  1 = negative
    4. kept values           FP codes of ``kept_bits`` (sign inside the code, NaN via the
                             reserved code) or raw values in the source dtype (kept_bits=None)

The sign of a kept value lives in its FP code only, so no element stores its sign twice. At
S=0.8 on a sigma_ln=2 lognormal (~12% +-a, ~8% kept) that is 1 + 0.2 + 0.12 + 0.08*8 = 1.96 bits
per element; at S=0.9, ~1.41 (NOTES-ON-SEEDS.md: the paper's App. A.10 claims 4 and 2).

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
    unpack_format,
    usable_fit,
)
from gradwire.codec.header import (
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


class PruneCodec(Codec):
    """Stochastic pruning to an expected ``sparsity`` with a compact, variable-size payload.

    Args:
        sparsity: expected fraction of zeros, in [0, 1) (exact zeros count towards it).
        kept_bits: bits of the kept values' FP format (2..8), or None to send them raw.
        kept_exp_bits: exponent bits of that format (default: 4 for 8 bits, i.e. E4M3; else
            roughly half the magnitude bits).
        rounding: rounding of kept values, "stochastic" (unbiased, default) or "nearest".
    """

    name = "prune"
    codec_id = 6
    fixed_rate = False

    def __init__(self, sparsity: float, kept_bits: int | None = 8, kept_exp_bits: int | None = None,
                 rounding: str = "stochastic"):
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

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sparsity": self.sparsity, "kept_bits": self.kept_bits,
                "kept_exp_bits": self.kept_exp_bits, "rounding": self.rounding}

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
        sections = [pack_bits(nonzero.to(torch.uint8), 1),
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
            packed, _ = ops.fp_encode(y, fmt, self.rounding, scale_exp=scale_exp, seed=derive_seed(seed, 1))
            codes = packed if fmt.bits == 8 else ops.unpack_bits(packed, fmt.bits, y.numel())
            sections.append(pack_bits(codes[kept], fmt.bits))
            fmt_block = pack_format(fmt, self.rounding, scale_exp)
        params = PRUNE_PARAMS.pack(a, int(self.kept_bits is not None), *FORMAT_PARAMS.unpack(fmt_block),
                                   int(nonzero.sum()), int(is_alpha.sum()))
        return build_packet(self.codec_id, x.dtype, x.shape, params, torch.cat(sections))

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        from gradwire import ops

        h, payload = parse_packet(packet)
        check_codec_id(h, self.codec_id, self.name)
        a, has_fmt, *fmt_fields, nnz, n_alpha = unpack_params(h, PRUNE_PARAMS, self.name)
        if not (math.isfinite(a) and a >= 0):
            raise PacketError(f"prune alpha: expected a finite threshold >= 0, found {a}")
        if has_fmt not in (0, 1):
            raise PacketError(f"prune kept format flag: expected 0 or 1, found {has_fmt}")
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
        sizes = [packed_nbytes(n, 1), packed_nbytes(nnz, 1), packed_nbytes(n_alpha, 1),
                 packed_nbytes(n_kept, fmt.bits) if has_fmt else n_kept * h.src_dtype.itemsize]
        # Sizes are Python ints: a corrupt shape is rejected here, before any allocation.
        check_payload_len(h, sum(sizes), self.name)
        out_dtype = decode_dtype(dtype, h.src_dtype)
        parts = torch.split(payload, sizes)
        try:
            nonzero = unpack_bits(parts[0], n, 1).bool()
            is_alpha = unpack_bits(parts[1], nnz, 1).bool()
            neg = unpack_bits(parts[2], n_alpha, 1).bool()
            if has_fmt:
                kept_vals = ops.fp_decode(parts[3], n_kept, fmt, scale_exp=scale_exp, dtype=torch.float32)
            else:
                kept_vals = parts[3].clone().view(h.src_dtype).float()
        except (ValueError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "padding" not in str(e):
                raise
            raise PacketError(f"prune payload: {e}") from None
        if int(nonzero.sum()) != nnz or int(is_alpha.sum()) != n_alpha:
            raise PacketError(
                f"prune payload: bitmaps hold {int(nonzero.sum())} nonzeros / {int(is_alpha.sum())} "
                f"alpha entries, header says {nnz} / {n_alpha}"
            )
        nz_vals = torch.empty(nnz, dtype=torch.float32, device=payload.device)
        a_t = torch.tensor(a, dtype=torch.float32, device=payload.device)
        nz_vals[is_alpha] = torch.where(neg, -a_t, a_t)
        nz_vals[~is_alpha] = kept_vals
        y = torch.zeros(n, dtype=torch.float32, device=payload.device)
        y[nonzero] = nz_vals
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
        return header_size(shape, PRUNE_PARAMS.size) + 3 * packed_nbytes(n, 1) + kept
