"""Low-bit floating-point formats and their rounding: the oracle the codec and kernels reproduce.

A format ``1-e-m`` (``FPFormat(exp_bits=e, man_bits=m, bias=b)``) has ``bits = 1 + e + m <= 8``
and codes laid out as ``sign | exponent field f | mantissa field M`` (sign is the MSB)::

    f >= 1            value = 2**(f - b) * (1 + M / 2**m)          (normal; every f is finite)
    f == 0, subnormals=True    value = M * 2**(1 - b - m)           (subnormal, M=0 is zero)
    f == 0, subnormals=False   value = 0                            (like DAZ hardware: the
                               2**m - 1 codes with M != 0 are never produced by encoding)
    code 1 << (bits-1)  ("-0")  = NaN: the one reserved code, for non-finite inputs.

No other code is reserved: the top exponent field holds ordinary finite values (1-5-2 with bias
15 covers 2**-16 .. 1.75 * 2**16). Positive codes are in increasing order of value, so the
successor of a value on the grid is the next code (except 0 -> min_normal without subnormals).

Encoding, exactly as a C/CUDA kernel must do it (all integer or exact float32 steps; no libm
transcendental on the hot path)::

    emin = 1 - b; emax = 2**e - 1 - b; max_code = 2**(bits-1) - 1
    if x is NaN or +-Inf:           return 1 << (bits-1)
    a = |float32(x)|;  if a == 0:   return 0                  # +0 and -0 both give code 0
    mant, ex = frexpf(a)            # a = mant * 2**ex, mant in [0.5, 1), exact (bit ops)
    Ey = clamp(ex - 1 + scale_exp, emin - 64, emax + 1)      # floor(log2|x * 2**scale_exp|)
    Eq = max(Ey, emin)                                       # exponent of the grid cell
    n  = (Ey >= emin or subnormals) ? m + Ey - Eq : Ey - emin   # log2 of (cell ulp)^-1 * 2**Ey
    n  = max(n, -25)                # below 2**-24 every decision is the same (see below)
    t  = mant * 2**(n + 1)          # = |x| * 2**scale_exp / ulp, exact float32 (2**k from bits)
    k  = floor(t); frac = t - k     # both exact; frac in [0, 1) = position between neighbours
    lo = ((Eq + b - 1) << m) + k    # code of the lower neighbour
    hi = (Ey < emin and not subnormals) ? 1 << m : lo + 1
    NEAREST_EVEN: up = frac > 0.5 or (frac == 0.5 and lo is odd)
    STOCHASTIC:   up = u < frac,  u = rng.uniform(seed, offset + flat_index)  (= r24 * 2**-24)
    mag = min(up ? hi : lo, max_code)                        # saturate, never overflow
    return mag == 0 ? 0 : mag | (signbit(x) << (bits-1))

Why the ``n >= -25`` clamp is exact: when the true ``t`` is below ``2**-24`` then ``k = 0``,
``frac < 0.5`` and ``u < frac`` holds only for ``u == 0``; the clamped ``t`` in ``[2**-25, 2**-24)``
gives the same decisions. The scale is never materialised as a float: it only shifts the integer
exponent, so any ``scale_exp`` is exact (no float32 overflow of ``2**scale_exp``, no double
rounding when ``x * 2**scale_exp`` would be a float32 subnormal). A kernel that multiplies
``x * 2**scale_exp`` in float32 first differs from this oracle when the product is subnormal or
``|scale_exp| >= 128``.

Decoding: ``table[code] * 2**-scale_exp`` computed exactly (C: ``ldexpf``; here in float64 then one
rounding to float32, which only matters when the result leaves the float32 range).
"""
from __future__ import annotations

import enum
import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from gradwire.numerics import rng

# Integer exponent arithmetic is exact for any scale, but Python ints must fit int32 tensors;
# beyond +-1000 every element saturates or rounds below min_positive / 2**24 anyway.
_SCALE_CLAMP = 1000
_T_EXP_FLOOR = -25  # see the module docstring: clamping n here does not change any decision
_CHUNK = 1 << 22  # elements per pass of the reference encoder (bounds temporary memory)


class Rounding(enum.Enum):
    """How a value between two neighbouring grid points ``lo < v < hi`` is rounded."""

    NEAREST_EVEN = "nearest"
    """Round to the nearer of lo/hi; an exact tie goes to the neighbour whose code is even
    (IEEE round-half-to-even on the code, which is the mantissa LSB when man_bits > 0)."""

    STOCHASTIC = "stochastic"
    """Round up iff ``u < (v - lo) / (hi - lo)`` with ``u = rng.uniform(seed, counter)``: so
    ``P(up) = (v - lo) / (hi - lo)``, ``E[Q(v)] = v`` (unbiased, up to the 2**-24 resolution of u)
    and ``Var = (hi - v)(v - lo)``. Above ``max_value`` there is no upper neighbour: saturate."""


def _as_rounding(rounding) -> Rounding:
    if isinstance(rounding, Rounding):
        return rounding
    if isinstance(rounding, str):
        try:
            return Rounding(rounding)
        except ValueError:
            pass
    raise ValueError(f"rounding must be a Rounding or one of {[r.value for r in Rounding]}, got {rounding!r}")


def _check_int(name: str, v) -> int:
    """Accept Python and numpy integers (not bool); return a Python int."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


@dataclass(frozen=True)
class FPFormat:
    """A sign / exponent / mantissa format of 2..8 bits; see the module docstring for the layout.

    ``bias`` defaults to ``2**(exp_bits-1) - 1`` (IEEE). ``subnormals=False`` makes every
    exponent-field-0 code decode to zero (values below ``min_normal`` round between 0 and
    ``min_normal``). Every value of the format must be exact in float32.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    subnormals: bool = True

    def __post_init__(self):
        # Normalise numpy integers to int so equal formats hash and print alike.
        object.__setattr__(self, "exp_bits", _check_int("exp_bits", self.exp_bits))
        object.__setattr__(self, "man_bits", _check_int("man_bits", self.man_bits))
        if not 1 <= self.exp_bits <= 7:
            raise ValueError(f"exp_bits must be in 1..7, got {self.exp_bits}")
        if self.man_bits < 0:
            raise ValueError(f"man_bits must be >= 0, got {self.man_bits}")
        if not 2 <= 1 + self.exp_bits + self.man_bits <= 8:
            raise ValueError(
                f"1 + exp_bits + man_bits must be in 2..8 (codes fit uint8), got "
                f"{1 + self.exp_bits + self.man_bits}"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        object.__setattr__(self, "bias", _check_int("bias", self.bias))
        if not isinstance(self.subnormals, bool):
            raise TypeError(f"subnormals must be a bool, got {type(self.subnormals).__name__}")
        if self.emax > 127:
            raise ValueError(f"bias {self.bias} puts max_value above the float32 range (emax {self.emax} > 127)")
        if self.emin - self.man_bits < -149:
            raise ValueError(f"bias {self.bias} puts the grid below float32 resolution (2**-149)")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (exponent field 1)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (exponent field all ones; finite, not inf)."""
        return 2**self.exp_bits - 1 - self.bias

    @property
    def max_code(self) -> int:
        """The positive code of ``max_value`` (all magnitude bits set)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def nonfinite_code(self) -> int:
        """The "-0" code, reserved: decodes to NaN, produced only by NaN/Inf inputs."""
        return 1 << (self.bits - 1)

    @property
    def max_value(self) -> float:
        return 2.0**self.emax * (2.0 - 2.0**-self.man_bits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_positive(self) -> float:
        if self.subnormals and self.man_bits > 0:
            return 2.0 ** (self.emin - self.man_bits)
        return self.min_normal

    @property
    def name(self) -> str:
        sub = "" if self.subnormals else "_nosub"
        return f"fp{self.bits}_e{self.exp_bits}m{self.man_bits}_b{self.bias}{sub}"

    def code_table(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2**bits - 1 (NaN at ``nonfinite_code``); a copy."""
        return _code_table(self).clone()

    def grid(self) -> tuple[float, ...]:
        """The sorted distinct finite non-negative values (0 first, ``max_value`` last)."""
        return _grid(self)


def _code_value(fmt: FPFormat, mag: int) -> float:
    f, M = mag >> fmt.man_bits, mag & ((1 << fmt.man_bits) - 1)
    if f == 0:
        return M * 2.0 ** (fmt.emin - fmt.man_bits) if fmt.subnormals else 0.0
    return 2.0 ** (f - fmt.bias) * (1.0 + M * 2.0**-fmt.man_bits)


@functools.lru_cache(maxsize=None)
def _code_table(fmt: FPFormat) -> torch.Tensor:
    # Python floats are float64; every value is exact in float32 (checked in __post_init__).
    pos = [_code_value(fmt, c) for c in range(fmt.nonfinite_code)]
    vals = pos + [float("nan")] + [-v for v in pos[1:]]
    return torch.tensor(vals, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _grid(fmt: FPFormat) -> tuple[float, ...]:
    return tuple(sorted({_code_value(fmt, c) for c in range(fmt.nonfinite_code)}))


def _pow2_f32(n: torch.Tensor) -> torch.Tensor:
    """Exact 2**n as float32 for int32 n in [-126, 127], built from the exponent bits."""
    return ((n + 127) << 23).to(torch.int32).view(torch.float32)


def _to_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast (exact for 16-bit and float8 dtypes); float64 rounds to nearest float32, and a
    finite float64 beyond the float32 range is clamped to the largest float32 (so it saturates
    instead of becoming a non-finite code)."""
    if x.dtype == torch.float32:
        return x
    if x.dtype == torch.float64:
        fmax = torch.finfo(torch.float32).max
        return torch.where(torch.isfinite(x), x.clamp(-fmax, fmax), x).to(torch.float32)
    return x.to(torch.float32)


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"x must have a real floating-point dtype, got {x.dtype}")


def _check_fmt(fmt) -> None:
    if not isinstance(fmt, FPFormat):
        raise TypeError(f"fmt must be an FPFormat, got {type(fmt).__name__}")


def encode_codes(
    x: torch.Tensor,
    fmt: FPFormat,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
    *,
    scale_exp: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """uint8 codes (shape of ``x``) of ``x * 2**scale_exp`` in ``fmt``; algorithm in the module doc.

    Saturates at ``max_value``; NaN/Inf -> ``fmt.nonfinite_code``; +-0 and anything rounding to
    zero -> code 0. Stochastic rounding uses counter ``offset + flat row-major index`` under
    ``seed``. Raises TypeError for non-tensors and integer/bool/complex dtypes. Empty and 0-d
    tensors are fine.
    """
    _check_input(x)
    _check_fmt(fmt)
    rounding = _as_rounding(rounding)
    scale_exp = max(-_SCALE_CLAMP, min(_SCALE_CLAMP, _check_int("scale_exp", scale_exp)))
    rng.check_seed(seed)
    offset = _check_int("offset", offset)
    if offset < 0 or offset + x.numel() > 2**63 - 1:
        raise ValueError(f"offset must be >= 0 with offset + numel < 2**63, got {offset}")
    xf = _to_float32(x).reshape(-1)
    if xf.numel() <= _CHUNK:
        return _encode_flat(xf, fmt, rounding, scale_exp, seed, offset).reshape(x.shape)
    # Chunks bound the ~a dozen full-size temporaries (and keep them in cache); counters carry on.
    out = torch.empty(xf.numel(), dtype=torch.uint8, device=x.device)
    for start in range(0, xf.numel(), _CHUNK):
        chunk = xf[start : start + _CHUNK]
        out[start : start + _CHUNK] = _encode_flat(chunk, fmt, rounding, scale_exp, seed, offset + start)
    return out.reshape(x.shape)


def _encode_flat(
    xf: torch.Tensor, fmt: FPFormat, rounding: Rounding, scale_exp: int, seed: int, offset: int
) -> torch.Tensor:
    """The algorithm of the module docstring on a 1-D float32 tensor (counters offset + i)."""
    m, b = fmt.man_bits, fmt.bias
    emin, emax = fmt.emin, fmt.emax
    finite = torch.isfinite(xf)
    a = torch.where(finite, xf.abs(), 0.0)
    mant, ex = torch.frexp(a)  # a = mant * 2**ex, mant in [0.5, 1); zero -> (0, 0)
    ey = (ex - 1 + scale_exp).clamp_(emin - 64, emax + 1)
    eq = ey.clamp(min=emin)
    normal_cell = ey >= emin
    if fmt.subnormals:
        n = m + ey - eq
    else:
        n = torch.where(normal_cell, m, ey - emin)
    t = mant * _pow2_f32(n.clamp_(min=_T_EXP_FLOOR) + 1)
    k = t.floor()
    frac = t - k
    lo = ((eq + (b - 1)) << m) + k.to(torch.int32)
    hi = lo + 1 if fmt.subnormals else torch.where(normal_cell, lo + 1, 1 << m)
    if rounding is Rounding.NEAREST_EVEN:
        up = (frac > 0.5) | ((frac == 0.5) & ((lo & 1) == 1))
    else:
        up = rng.uniform_like(seed, xf, offset=offset) < frac
    mag = torch.where(up, hi, lo).clamp_(max=fmt.max_code)
    mag = torch.where(a == 0, 0, mag)
    code = torch.where(torch.signbit(xf) & (mag != 0), mag | fmt.nonfinite_code, mag)
    code = torch.where(finite, code, fmt.nonfinite_code)
    return code.to(torch.uint8)


def decode_codes(codes: torch.Tensor, fmt: FPFormat, *, scale_exp: int = 0) -> torch.Tensor:
    """float32 values ``code_table[codes] * 2**-scale_exp`` (exact unless the product leaves the
    float32 range). ``codes`` must be uint8 with every code < ``2**fmt.bits`` (ValueError)."""
    _check_fmt(fmt)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    scale_exp = max(-_SCALE_CLAMP, min(_SCALE_CLAMP, _check_int("scale_exp", scale_exp)))
    if codes.numel() and fmt.bits < 8 and int(codes.max()) >= 1 << fmt.bits:
        raise ValueError(f"codes must be < 2**{fmt.bits} for {fmt.name}, got {int(codes.max())}")
    values = _code_table(fmt).to(codes.device)[codes.long()]
    if scale_exp == 0:
        return values
    # float64 holds every table value * 2**-scale_exp exactly (|scale_exp| <= 1000); one rounding.
    return (values.double() * 2.0**-scale_exp).to(torch.float32)


def saturating_cast(y: torch.Tensor, dtype: torch.dtype, *, inf_is_overflow: bool = False) -> torch.Tensor:
    """``y.to(dtype)``, except that a finite value lands finite: beyond ``finfo(dtype).max`` it
    saturates to ``+-finfo(dtype).max`` instead of becoming inf. NaN passes through, and so does
    +-inf unless ``inf_is_overflow`` (FP codes carry every non-finite input as NaN, so an inf in
    their decoded values is an overflow of ``value * 2**-scale_exp``, and saturates too).

    Why: a finite gradient must arrive finite (an inf would make the loss scaler skip the step).
    Rounding near a dtype's top can land above its largest finite value (stochastic rounding up
    of fp16 61000 in FP6; float32 max rounded to bf16), and saturating there is the one bias this
    introduces: only for values within one grid step of the dtype's largest finite value.
    """
    big = torch.finfo(dtype).max
    own = torch.finfo(y.dtype).max
    if inf_is_overflow:
        cap = min(big, own)
        y = torch.nan_to_num(y, nan=math.nan, posinf=cap, neginf=-cap)
    if own > big:
        if y.element_size() < 4:  # bf16 cannot hold fp16's 65504: clamp where it is exact
            y = y.float()
        y = torch.where(torch.isfinite(y), y.clamp(-big, big), y)
    return y.to(dtype)


def quantize(
    x: torch.Tensor,
    fmt: FPFormat,
    rounding: Rounding | str = Rounding.NEAREST_EVEN,
    *,
    scale_exp: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """``decode_codes(encode_codes(x, ...))`` cast to ``x.dtype`` (exact whenever the format's
    values scaled by ``2**-scale_exp`` are representable in that dtype); finite values beyond
    the dtype's range saturate at its largest finite value (``saturating_cast``)."""
    codes = encode_codes(x, fmt, rounding, scale_exp=scale_exp, seed=seed, offset=offset)
    return saturating_cast(decode_codes(codes, fmt, scale_exp=scale_exp), x.dtype, inf_is_overflow=True)
