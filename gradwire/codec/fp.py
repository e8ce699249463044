"""The FP codec: lognormal-scaled low-bit floating point (paper 001, Sec. 4), codes bit-packed.

Semantics are ``gradwire.numerics.fp``: ``decode(encode(x, seed=s))`` equals
``numerics.fp.quantize(x, fmt, rounding, scale_exp=e, seed=s)`` exactly, where

* ``fmt`` is ``FPFormat(exp_bits, bits - 1 - exp_bits)``: ``exp_bits`` from the configuration, or,
  when the codec is configured with ``bits`` only, the split of ``fp_error.optimal_format`` (least
  exact error of these formats; ``split="eq4"``: ``lognormal.optimal_split``, Eq. 4 of paper 001
  with the corrected mantissa term in NOTES-ON-SEEDS.md);
* ``e`` is the power-of-two scale: by default ``min(fp_error.optimal_scale_exp(fmt, mu_log2,
  sigma_log2, rounding), amax_scale_exp(max|x|))`` -- the analytic optimum (replacing the
  authors' "-mean(log2|g|) - 3" shift, NOTES-ON-SEEDS.md) capped so that the largest finite
  magnitude stays representable (``choose_format`` has the measured reason); ``scale="optimal"``
  drops the cap, ``scale="amax"`` uses the cap alone;
* mu/sigma come from ``fit`` (the policy's running ``LognormalFit``) or, without a usable one,
  from fitting ``x`` itself. A tensor with no finite nonzero entry uses scale 0 and the split
  for ``DEFAULT_SIGMA_LOG2`` (every code is then 0 or the non-finite code anyway).

The random counter of stochastic rounding is the flat element index (offset 0). Payload: the
codes, ``bits`` per element, packed LSB-first (FP6: 4 values in 3 bytes). Encoding is one fused
``gradwire.ops.fp_encode`` pass (codes, packing and the policy's moment statistics); decoding is
``ops.fp_decode``. Decisions (fit of x, amax) are computed by the numerics reference, so the
packet does not depend on which kernel served the op.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Any, Sequence

import torch

from gradwire.codec.base import Codec, EncodeResult, check_input, decode_dtype
from gradwire.codec.bitpack import packed_nbytes
from gradwire.codec.header import (
    Expected,
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


def check_choice(name: str, value: Any, choices) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError naming the parameter and the options."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_rounding(rounding: Any) -> str:
    return check_choice("rounding", rounding, sorted(ROUNDING_CODES))


def usable_fit(x: torch.Tensor, fit: Any | None):
    """``fit`` if it is usable, else a fit of ``x`` if that is usable, else None."""
    from gradwire.numerics.lognormal import fit_lognormal

    if fit is not None and getattr(fit, "usable", False):
        return fit
    if x.numel() == 0:
        return None
    f = fit_lognormal(x)
    return f if f.usable else None


SCALE_MODES = ("optimal_capped", "optimal", "amax")
SPLIT_MODES = ("optimal", "eq4")
SPLIT_SIGMA_STEP = 1.0 / 32  # the automatic split is chosen (and cached) on this sigma grid


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


@functools.lru_cache(maxsize=4096)
def _auto_exp_bits(bits: int, sigma_q: float, rounding: str) -> int:
    """Exponent bits of the automatic ``bits``-bit split at (grid-rounded) ``sigma_q``.

    "optimal": ``fp_error.optimal_format`` -- the least exact expected relative error of OUR
    formats (IEEE bias, subnormals); ``lognormal.optimal_split`` (Eq. 4 of paper 001) describes the
    idealised format of Eq. 2 and reproduces the paper's Table 2, but is up to 47% worse here
    (fp_error.optimal_format's docstring). mu only enters through its fractional binade, which
    the choice ignores (mu = 0): that and the 1/32-binade sigma grid make the ~0.1 s search a
    cache hit for every later tensor. (split="eq4", the paper's choice, is in ``choose_format``.)
    """
    from gradwire.numerics.fp_error import optimal_format

    return optimal_format(bits, 0.0, sigma_q, rounding)[0].exp_bits


def choose_format(bits: int, exp_bits: int | None, rounding: str, fit, scale: str = "optimal_capped",
                  amax: float = 0.0, split: str = "optimal") -> tuple[Any, int]:
    """(FPFormat, scale_exp) for data described by ``fit`` (None: nothing known) whose largest
    finite magnitude is ``amax`` (0: unknown / all zero).

    Scale modes (``e`` below is the power-of-two exponent the values are multiplied by):

    * "optimal": ``fp_error.optimal_scale_exp``, the least expected *relative* error per element
      (paper 001's criterion). It lets the top tail saturate: measured cosine(x, decode(encode(x)))
      for stochastic FP6 on lognormal data was 0.54 at sigma_ln = 2 and 0.06 at sigma_ln = 3
      (bench/results/codec_bytes.md before this change), and saturation -- clamping at max_value --
      is the one source of bias of stochastic rounding, so the codec was biased on heavy tails.
    * "optimal_capped" (default): ``min(optimal, amax_scale_exp(amax))``: the analytic optimum,
      lowered just enough that the current tensor's ``amax`` stays representable. This is the
      paper's trade-off (001, Sec. 4.4 / App. A.6: "keeps the largest gradients representable but
      sacrifices the smallest"); with stochastic rounding the codec is then unbiased everywhere
      (values below the grid round stochastically to 0 or min_positive). Without an amax
      (all-zero / non-finite tensor) it is "optimal".
    * "amax": ``amax_scale_exp(amax)`` alone, the largest scale with no saturation.
    """
    from gradwire.numerics.fp import FPFormat, Rounding
    from gradwire.numerics.fp_error import optimal_scale_exp
    from gradwire.numerics.lognormal import optimal_split

    sigma = max(fit.sigma_log2, MIN_SIGMA_LOG2) if fit is not None else DEFAULT_SIGMA_LOG2
    if exp_bits is None and split == "eq4":
        exp_bits = optimal_split(bits, sigma)[0]  # cheap and closed-form: the exact sigma
    elif exp_bits is None:
        sigma_q = max(MIN_SIGMA_LOG2, round(sigma / SPLIT_SIGMA_STEP) * SPLIT_SIGMA_STEP)
        exp_bits = _auto_exp_bits(bits, sigma_q, rounding)
    fmt = FPFormat(exp_bits, bits - 1 - exp_bits)
    cap = amax_scale_exp(amax, fmt.max_value) if amax > 0 and math.isfinite(amax) else None
    if scale == "amax":
        return fmt, 0 if cap is None else cap
    if fit is None:
        return fmt, 0
    e = int(optimal_scale_exp(fmt, fit.mu_log2, sigma, Rounding(rounding)))
    if scale == "optimal_capped" and cap is not None:
        e = min(e, cap)
    return fmt, max(-MAX_SCALE_EXP, min(MAX_SCALE_EXP, e))


def check_split(split: Any) -> str:
    return check_choice("split", split, SPLIT_MODES)


def check_scale(scale: Any) -> str:
    return check_choice("scale", scale, SCALE_MODES)


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
        bits: total bits per element including the sign, 2..8. FP2 (one exponent bit, no
            mantissa) is stochastic ternary, {0, +-1} times the scale: available here for
            experiments, while the "gradwire" config section offers 3..8 for training.
        exp_bits: fixed exponent bits (1..bits-1); None chooses the split per tensor from its
            lognormal sigma (the split travels in the header, so a receiver configured with
            ``bits`` only accepts any split of that width).
        rounding: "stochastic" (unbiased, the default for neural gradients) or "nearest".
        scale: "optimal_capped" (default: the least expected relative error, lowered so that the
            tensor's amax stays representable), "optimal" (uncapped: the top tail saturates) or
            "amax"; see ``choose_format`` for the measured reason. Sender-side only: the chosen
            exponent travels in the header.
        split: how ``exp_bits=None`` picks the split: "optimal" (``fp_error.optimal_format``, exact
            error of these formats, default) or "eq4" (paper 001 Eq. 4, ``lognormal.optimal_split``).

    Encoding and decoding run on ``gradwire.ops`` (fused native kernels when loaded, else their
    pure-PyTorch references; the bytes are the same either way).
    """

    name = "fp"
    codec_id = 5
    fixed_rate = True

    def __init__(self, bits: int, exp_bits: int | None = None, rounding: str = "stochastic",
                 scale: str = "optimal_capped", split: str = "optimal"):
        self.bits = check_bits("bits", bits, 2, 8)
        self.scale = check_scale(scale)
        self.split = check_split(split)
        self.exp_bits = None if exp_bits is None else check_bits("exp_bits", exp_bits, 1, min(7, bits - 1))
        self.rounding = check_rounding(rounding)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "exp_bits": self.exp_bits, "rounding": self.rounding,
                "scale": self.scale, "split": self.split}

    def choose(self, x: torch.Tensor, fit: Any | None = None) -> tuple[Any, int]:
        """The (FPFormat, scale_exp) ``encode`` uses for ``x`` and ``fit``."""
        amax = finite_amax(x) if self.scale != "optimal" else 0.0
        return choose_format(self.bits, self.exp_bits, self.rounding, usable_fit(x, fit), self.scale, amax,
                             self.split)

    def _encode(self, x: torch.Tensor, seed: int, fit: Any | None, with_stats: bool) -> EncodeResult:
        from gradwire import ops

        x = check_input(x, self.name)
        fmt, scale_exp = self.choose(x, fit)
        payload, stats = ops.fp_encode(x, fmt, self.rounding, scale_exp=scale_exp, seed=seed,
                                       with_stats=with_stats)
        packet = build_packet(self.codec_id, x.dtype, x.shape, pack_format(fmt, self.rounding, scale_exp), payload)
        return EncodeResult(packet, stats)

    def encode_with_stats(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> EncodeResult:
        """Packet and ``moment_stats(x)`` from one fused ``ops.fp_encode`` pass."""
        return self._encode(x, seed, fit, True)

    def encode(self, x: torch.Tensor, *, seed: int = 0, fit: Any | None = None) -> torch.Tensor:
        """The packet alone: the same bytes as ``encode_with_stats``, without the statistics."""
        return self._encode(x, seed, fit, False).packet

    def decode(self, packet: torch.Tensor, *, dtype: torch.dtype | None = None,
               expect: Expected | None = None) -> torch.Tensor:
        from gradwire import ops

        h: Header
        h, payload = parse_packet(packet, expect)
        check_codec_id(h, self.codec_id, self.name)
        fmt, rounding, scale_exp = unpack_format(unpack_params(h, FORMAT_PARAMS, self.name), self.name)
        sent = {"name": self.name, "bits": fmt.bits, "exp_bits": fmt.exp_bits, "rounding": rounding}
        keys = ["bits", "rounding"] + (["exp_bits"] if self.exp_bits is not None else [])
        check_config(sent, self.config(), keys)
        # Bounds numel by the payload before anything is allocated.
        check_payload_len(h, packed_nbytes(h.numel, fmt.bits), self.name)
        out = decode_dtype(dtype, h.src_dtype)
        try:
            y = ops.fp_decode(payload, h.numel, fmt, scale_exp=scale_exp, dtype=kernel_dtype(out))
        except (ValueError, RuntimeError) as e:
            if "padding" not in str(e):
                raise
            raise PacketError(f"{self.name} payload: nonzero padding bits after the last code") from None
        return saturate_decoded(y, fmt, scale_exp).reshape(h.shape).to(out)

    def packed_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        dtype_code(dtype)
        n = 1
        for d in shape:
            n *= int(d)
        return header_size(shape, FORMAT_PARAMS.size) + packed_nbytes(n, self.bits)


def saturate_decoded(y: torch.Tensor, fmt, scale_exp: int) -> torch.Tensor:
    """Decoded FP values with overflows saturated (``numerics.fp.saturating_cast``): a finite
    gradient arrives finite. Only packets whose largest code, scaled, exceeds ``y.dtype``'s range
    pay for the extra pass (a Python check on the header's values)."""
    from gradwire.numerics.fp import saturating_cast

    if fmt.max_value * 2.0 ** -scale_exp <= torch.finfo(y.dtype).max:
        return y
    return saturating_cast(y, y.dtype, inf_is_overflow=True)


def kernel_dtype(out: torch.dtype) -> torch.dtype:
    """The dtype ``ops.fp_decode`` should produce for a decode to ``out``: ``out`` itself when the
    kernels write it (their cast equals the reference's float32 -> out cast), else float32."""
    return out if out in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
