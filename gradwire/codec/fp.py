"""The FP codec: lognormal-scaled low-bit floating point (paper 001, Sec. 4), codes bit-packed.

Semantics are ``gradwire.numerics.fp``: ``decode(encode(x, seed=s))`` equals
``numerics.fp.quantize(x, fmt, rounding, scale_exp=e, seed=s)`` exactly, where

* ``fmt`` is ``FPFormat(exp_bits, bits - 1 - exp_bits)``: ``exp_bits`` from the configuration, or,
  when the codec is configured with ``bits`` only, ``lognormal.optimal_split(bits, sigma_log2)``
  (Eq. 4 of paper 001, the corrected mantissa term in NOTES-ON-SEEDS.md);
* ``e`` is the power-of-two scale ``fp_error.optimal_scale_exp(fmt, mu_log2, sigma_log2, rounding)``
  (the analytic replacement of the authors' "-mean(log2|g|) - 3" shift, NOTES-ON-SEEDS.md), or
  with ``scale="amax"`` the largest power of two that leaves max|x| unsaturated;
* mu/sigma come from ``fit`` (the policy's running ``LognormalFit``) or, without a usable one,
  from fitting ``x`` itself. A tensor with no finite nonzero entry uses scale 0 and the split
  for ``DEFAULT_SIGMA_LOG2`` (every code is then 0 or the non-finite code anyway).

The random counter of stochastic rounding is the flat element index (offset 0). Payload: the
codes, ``bits`` per element, packed by ``bitpack.pack_bits`` (FP6: 4 values in 3 bytes).
"""
from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import torch

from gradwire.codec.base import Codec, check_input, decode_dtype
from gradwire.codec.bitpack import pack_bits, packed_nbytes, unpack_bits
from gradwire.codec.header import (
    Header,
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

DEFAULT_SIGMA_LOG2 = 3.0  # split used when nothing is known about the data (no finite nonzero)
# The analytic error (Eq. 4) needs sigma > 0, but a constant-magnitude tensor (or one element) has
# sigma 0: floor it. Below ~1/16 binade every split and scale decision is the same anyway.
MIN_SIGMA_LOG2 = 1.0 / 16
MAX_SCALE_EXP = 1000  # numerics.fp clamps scale exponents to +-1000; larger ones are corrupt
ROUNDING_CODES = {"nearest": 0, "stochastic": 1}
ROUNDING_NAMES = {v: k for k, v in ROUNDING_CODES.items()}

# An FP format on the wire: exp_bits, man_bits, bias, subnormals, rounding, scale_exp.
FORMAT_PARAMS = struct.Struct("<BBhBBh")


def check_bits(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def check_rounding(rounding: Any) -> str:
    if rounding not in ROUNDING_CODES:
        raise ValueError(f"rounding must be one of {sorted(ROUNDING_CODES)}, got {rounding!r}")
    return rounding


def usable_fit(x: torch.Tensor, fit: Any | None):
    """``fit`` if it is usable, else a fit of ``x`` if that is usable, else None."""
    from gradwire.numerics.lognormal import fit_lognormal

    if fit is not None and getattr(fit, "usable", False):
        return fit
    if x.numel() == 0:
        return None
    f = fit_lognormal(x)
    return f if f.usable else None


SCALE_MODES = ("optimal", "amax")


def amax_scale_exp(amax: float, max_value: float) -> int:
    """Largest integer e with amax * 2**e <= max_value (0 when amax is 0 or not finite)."""
    if not (amax > 0 and math.isfinite(amax)):
        return 0
    e = math.floor(math.log2(max_value / amax))
    while amax * 2.0 ** (e + 1) <= max_value:  # guard against log2 rounding either way
        e += 1
    while amax * 2.0**e > max_value:
        e -= 1
    return max(-MAX_SCALE_EXP, min(MAX_SCALE_EXP, e))


def finite_amax(x: torch.Tensor) -> float:
    """max |x| over the finite entries (0.0 if none)."""
    if x.numel() == 0:
        return 0.0
    xf = x.float()
    return float(torch.where(torch.isfinite(xf), xf.abs(), 0.0).max())


def choose_format(bits: int, exp_bits: int | None, rounding: str, fit, scale: str = "optimal",
                  amax: float = 0.0) -> tuple[Any, int]:
    """(FPFormat, scale_exp) for data described by ``fit`` (None: nothing known).

    scale="optimal": ``fp_error.optimal_scale_exp`` (minimum expected *relative* error per element,
    paper 001's criterion; it lets the top tail saturate, which costs L2 error / cosine on heavy
    tails, see bench/results/codec_bytes.md). scale="amax": the largest power of two that keeps
    ``amax`` (the largest finite magnitude) unsaturated; with stochastic rounding the codec is then
    unbiased everywhere (values below the grid round stochastically to 0 or min_positive).
    """
    from gradwire.numerics.fp import FPFormat, Rounding
    from gradwire.numerics.fp_error import optimal_scale_exp
    from gradwire.numerics.lognormal import optimal_split

    sigma = max(fit.sigma_log2, MIN_SIGMA_LOG2) if fit is not None else DEFAULT_SIGMA_LOG2
    if exp_bits is None:
        exp_bits, _ = optimal_split(bits, sigma)
    fmt = FPFormat(exp_bits, bits - 1 - exp_bits)
    if scale == "amax":
        return fmt, amax_scale_exp(amax, fmt.max_value)
    if fit is None:
        return fmt, 0
    e = optimal_scale_exp(fmt, fit.mu_log2, sigma, Rounding(rounding))
    return fmt, max(-MAX_SCALE_EXP, min(MAX_SCALE_EXP, int(e)))


def check_scale(scale: Any) -> str:
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    return scale


def pack_format(fmt, rounding: str, scale_exp: int) -> bytes:
    return FORMAT_PARAMS.pack(fmt.exp_bits, fmt.man_bits, fmt.bias, int(fmt.subnormals),
                              ROUNDING_CODES[rounding], scale_exp)


def unpack_format(raw: tuple, what: str) -> tuple[Any, str, int]:
    """(FPFormat, rounding, scale_exp) from the fields of ``FORMAT_PARAMS``, validated."""
    from gradwire.numerics.fp import FPFormat

    e, m, bias, sub, rcode, scale_exp = raw
    if not (1 <= e <= 7 and 2 <= 1 + e + m <= 8):
        raise PacketError(f"{what} format: expected 1 <= exp_bits <= 7 and 2..8 bits, found e={e}, m={m}")
    if bias != 2 ** (e - 1) - 1 or sub != 1:
        raise PacketError(
            f"{what} format: expected the default bias {2 ** (e - 1) - 1} with subnormals, "
            f"found bias={bias}, subnormals={sub}"
        )
    if rcode not in ROUNDING_NAMES:
        raise PacketError(f"{what} rounding: expected one of {sorted(ROUNDING_NAMES)}, found {rcode}")
    if abs(scale_exp) > MAX_SCALE_EXP:
        raise PacketError(f"{what} scale_exp: expected |scale_exp| <= {MAX_SCALE_EXP}, found {scale_exp}")
    return FPFormat(e, m), ROUNDING_NAMES[rcode], scale_exp


class FPCodec(Codec):
    """Low-bit FP with a lognormal-chosen power-of-two scale; ``bits`` per element + header.

    Args:
        bits: total bits per element including the sign, 2..8.
        exp_bits: fixed exponent bits (1..bits-1); None chooses the split per tensor from its
            lognormal sigma (the split travels in the header, so a receiver configured with
            ``bits`` only accepts any split of that width).
        rounding: "stochastic" (unbiased, the default for neural gradients) or "nearest".
        scale: "optimal" (``fp_error.optimal_scale_exp``: least expected relative error, the
            paper's criterion) or "amax" (no saturation; see ``choose_format``). Sender-side
            only: the chosen exponent travels in the header.
    """

    name = "fp"
    codec_id = 5
    fixed_rate = True

    def __init__(self, bits: int, exp_bits: int | None = None, rounding: str = "stochastic",
                 scale: str = "optimal"):
        self.bits = check_bits("bits", bits, 2, 8)
        self.scale = check_scale(scale)
        self.exp_bits = None if exp_bits is None else check_bits("exp_bits", exp_bits, 1, min(7, bits - 1))
        self.rounding = check_rounding(rounding)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "exp_bits": self.exp_bits, "rounding": self.rounding,
                "scale": self.scale}

    def choose(self, x: torch.Tensor, fit: Any | None = None) -> tuple[Any, int]:
        """The (FPFormat, scale_exp) ``encode`` uses for ``x`` and ``fit``."""
        amax = finite_amax(x) if self.scale == "amax" else 0.0
        return choose_format(self.bits, self.exp_bits, self.rounding, usable_fit(x, fit), self.scale, amax)

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        from gradwire.numerics.fp import encode_codes

        x = check_input(x, self.name)
        fmt, scale_exp = self.choose(x, fit)
        codes = encode_codes(x, fmt, self.rounding, scale_exp=scale_exp, seed=seed)
        payload = pack_bits(codes, self.bits)
        return build_packet(self.codec_id, x.dtype, x.shape, pack_format(fmt, self.rounding, scale_exp), payload)

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        from gradwire.numerics.fp import decode_codes

        h: Header
        h, payload = parse_packet(packet)
        check_codec_id(h, self.codec_id, self.name)
        fmt, rounding, scale_exp = unpack_format(unpack_params(h, FORMAT_PARAMS, self.name), self.name)
        sent = {"name": self.name, "bits": fmt.bits, "exp_bits": fmt.exp_bits, "rounding": rounding}
        keys = ["bits", "rounding"] + (["exp_bits"] if self.exp_bits is not None else [])
        check_config(sent, self.config(), keys)
        # Bounds numel by the payload before anything is allocated.
        check_payload_len(h, packed_nbytes(h.numel, fmt.bits), self.name)
        out = decode_dtype(dtype, h.src_dtype)
        try:
            codes = unpack_bits(payload, h.numel, fmt.bits)
        except ValueError as e:
            raise PacketError(f"{self.name} payload: {e}") from None
        return decode_codes(codes, fmt, scale_exp=scale_exp).reshape(h.shape).to(out)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        dtype_code(dtype)
        n = 1
        for d in shape:
            n *= int(d)
        return header_size(shape, FORMAT_PARAMS.size) + packed_nbytes(n, self.bits)
