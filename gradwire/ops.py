"""torch.library ops for the hot loops of the codecs: bit packing, the FP codec, statistics.

Each op is defined once here (``gradwire::<name>``) with a fake (meta) kernel and its
pure-PyTorch reference registered as the ``CompositeExplicitAutograd`` default, so it runs on any
device. Native kernels (csrc/cpu, csrc/cuda, loaded by ``gradwire._build`` on the first call)
override the default for their dispatch key and produce the same bytes. ``GRADWIRE_FORCE_REFERENCE=1``
keeps the reference; ``python -m gradwire.ops`` says which implementation serves each op and why.

Use the Python functions below (they validate arguments with clear TypeError/ValueError and
trigger the native load); ``torch.ops.gradwire.*`` is the raw, unchecked entry point.

Ops (schemas in ``SCHEMAS``):
  pack_bits(codes u8[n], bits) -> u8[ceil(n*bits/8)]      LSB-first stream (docs/architecture.md)
  unpack_bits(packed, bits, numel) -> u8[numel]
  fp_encode(x, exp_bits, man_bits, bias, scale_exp, stochastic, seed, offset)
      -> (packed u8[ceil(n*bits/8)], stats f64[5])        codes of x*2**scale_exp, packed, plus
                                                          numerics.lognormal.moment_stats(x)
  fp_decode(packed, numel, exp_bits, man_bits, bias, scale_exp, dtype) -> dtype[numel]
  moment_stats(x) -> f64[5]     (n_finite_nonzero, sum log2|x|, sum log2^2|x|, n_zero, n_nonfinite)
  rng_u32(seed, index i64) -> i64   numerics.rng.random_u32; exposes the C++ port for tests

Bit-exactness: packed bytes and decoded values are identical in every implementation; the
counts in the statistics are exact; the float64 sums agree to ~1e-12 relative (kernels sum
per-chunk partials in a fixed order, and compute log2 by table + series).
"""
from __future__ import annotations

import math

import torch

if __name__ == "__main__":  # `python -m gradwire.ops`: report from the real module, defined once
    import gradwire.ops as _ops

    print(_ops.status())
    raise SystemExit(0)

from gradwire import _build
from gradwire.numerics import rng

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATS_LEN = 5

SCHEMAS = {
    "pack_bits": "pack_bits(Tensor codes, int bits) -> Tensor",
    "unpack_bits": "unpack_bits(Tensor packed, int bits, int numel) -> Tensor",
    "fp_encode": "fp_encode(Tensor x, int exp_bits, int man_bits, int bias, int scale_exp, "
    "bool stochastic, int seed, int offset) -> (Tensor, Tensor)",
    "fp_decode": "fp_decode(Tensor packed, int numel, int exp_bits, int man_bits, int bias, "
    "int scale_exp, ScalarType dtype) -> Tensor",
    "moment_stats": "moment_stats(Tensor x) -> Tensor",
    "rng_u32": "rng_u32(int seed, Tensor index) -> Tensor",
}

_lib = torch.library.Library("gradwire", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)


def _packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


# ----------------------------------------------------------------------------- references
def _pack_bits_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = codes.reshape(-1).to(torch.int64)
    if c.numel() and int(c.max()) >> bits:
        raise ValueError(f"pack_bits: a code does not fit in {bits} bits")
    shifts = torch.arange(bits, device=c.device)
    stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1)  # element i -> stream bits [i*b, (i+1)*b)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = 1 << torch.arange(8, device=c.device)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def _unpack_bits_ref(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if packed.numel() != _packed_bytes(numel, bits):
        raise ValueError(f"unpack_bits: expected {_packed_bytes(numel, bits)} bytes, got {packed.numel()}")
    p = packed.reshape(-1).to(torch.int64)
    stream = ((p.unsqueeze(1) >> torch.arange(8, device=p.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << torch.arange(bits, device=p.device)).sum(1).to(torch.uint8)


def _pow2_f32(k: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**k for int k in [-149, 127], built from the bit pattern (no libm)."""
    k = k.to(torch.int32)
    normal = ((k + 127).clamp(min=1) << 23).view(torch.float32)
    sub = (torch.ones_like(k) << (k + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(k >= -126, normal, sub)


def _fmt(exp_bits: int, man_bits: int, bias: int) -> tuple[int, int, int, float]:
    """(bits, emin, max_mag, max_value) of a format with subnormals and no inf/NaN codes."""
    bits = 1 + exp_bits + man_bits
    emin = 1 - bias
    max_mag = (1 << (bits - 1)) - 1
    max_value = math.ldexp(2 - 2.0**-man_bits, (1 << exp_bits) - 1 - bias)
    return bits, emin, max_mag, max_value


def _fp_encode_codes_ref(x, exp_bits, man_bits, bias, scale_exp, stochastic, seed, offset):
    """Codes of one float tensor (uint8, flat), by a float formulation independent of the C++.

    y = float32(x) * 2**scale_exp; a = |y|; E = floor(log2 a) (frexp); quantum = 2**(max(E, emin)
    - m); q = a / quantum (exact); nearest: round half to even; stochastic: floor(q) + (u <
    frac(q)), u = rng.uniform(seed, offset + i). a > max_value saturates; non-finite x -> the -0
    code; a result of magnitude 0 is +0 (the -0 code is taken).
    """
    bits, emin, max_mag, max_value = _fmt(exp_bits, man_bits, bias)
    x32 = x.reshape(-1).to(torch.float32)
    y = x32 * _pow2_f32(torch.tensor(scale_exp))
    a = y.abs()
    _, ex = torch.frexp(a)
    eq = torch.clamp(ex.to(torch.int64) - 1, min=emin)
    q = a / _pow2_f32(eq - man_bits)
    if stochastic:
        qf = torch.floor(q)
        q = qf + (rng.uniform_like(seed, q, offset) < q - qf).to(q.dtype)
    else:
        q = torch.round(q)  # half to even
    mag = ((eq - emin) << man_bits) + q.to(torch.int64)
    mag = torch.where(a > max_value, max_mag, mag.clamp(max=max_mag))
    mag = torch.where(a == 0, 0, mag)
    code = torch.where(mag > 0, mag | (torch.signbit(y).to(torch.int64) << (bits - 1)), 0)
    code = torch.where(torch.isfinite(x32), code, 1 << (bits - 1))
    return code.to(torch.uint8)


def _code_table(exp_bits: int, man_bits: int, bias: int) -> torch.Tensor:
    """float32 value of every code (NaN at the -0 code), by exact Python float arithmetic."""
    bits, emin, _, _ = _fmt(exp_bits, man_bits, bias)
    vals = []
    for code in range(1 << bits):
        mag = code & ((1 << (bits - 1)) - 1)
        ef, mf = mag >> man_bits, mag & ((1 << man_bits) - 1)
        v = math.ldexp(mf, emin - man_bits) if ef == 0 else math.ldexp((1 << man_bits) | mf, ef - 1 + emin - man_bits)
        vals.append(-v if code >> (bits - 1) else v)
    vals[1 << (bits - 1)] = float("nan")
    return torch.tensor(vals, dtype=torch.float32)


def _moment_stats_ref(x: torch.Tensor) -> torch.Tensor:
    x64 = x.reshape(-1).to(torch.float64)
    finite = torch.isfinite(x64)
    nz = x64 != 0
    lg = torch.log2(x64[finite & nz].abs())
    out = torch.stack([
        lg.new_tensor(float(lg.numel())), lg.sum(), (lg * lg).sum(),
        (finite & ~nz).sum().to(torch.float64), (~finite).sum().to(torch.float64),
    ])
    return out.to(torch.float64)


def _fp_encode_ref(x, exp_bits, man_bits, bias, scale_exp, stochastic, seed, offset):
    codes = _fp_encode_codes_ref(x, exp_bits, man_bits, bias, scale_exp, stochastic, seed, offset)
    return _pack_bits_ref(codes, 1 + exp_bits + man_bits), _moment_stats_ref(x)


def _fp_decode_ref(packed, numel, exp_bits, man_bits, bias, scale_exp, dtype):
    codes = _unpack_bits_ref(packed, 1 + exp_bits + man_bits, numel)
    table = _code_table(exp_bits, man_bits, bias).to(packed.device)
    vals = table[codes.to(torch.int64)] * _pow2_f32(torch.tensor(-scale_exp)).to(packed.device)
    return vals.to(dtype)


def _rng_u32_ref(seed: int, index: torch.Tensor) -> torch.Tensor:
    return rng.random_u32(seed, index.contiguous())


REFERENCES = {
    "pack_bits": _pack_bits_ref,
    "unpack_bits": _unpack_bits_ref,
    "fp_encode": _fp_encode_ref,
    "fp_decode": _fp_decode_ref,
    "moment_stats": _moment_stats_ref,
    "rng_u32": _rng_u32_ref,
}
for _name, _fn in REFERENCES.items():
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("gradwire::pack_bits")
def _(codes, bits):
    return codes.new_empty(_packed_bytes(codes.numel(), bits), dtype=torch.uint8)


@torch.library.register_fake("gradwire::unpack_bits")
def _(packed, bits, numel):
    return packed.new_empty(numel, dtype=torch.uint8)


@torch.library.register_fake("gradwire::fp_encode")
def _(x, exp_bits, man_bits, bias, scale_exp, stochastic, seed, offset):
    n = _packed_bytes(x.numel(), 1 + exp_bits + man_bits)
    return x.new_empty(n, dtype=torch.uint8), x.new_empty(STATS_LEN, dtype=torch.float64)


@torch.library.register_fake("gradwire::fp_decode")
def _(packed, numel, exp_bits, man_bits, bias, scale_exp, dtype):
    return packed.new_empty(numel, dtype=dtype)


@torch.library.register_fake("gradwire::moment_stats")
def _(x):
    return x.new_empty(STATS_LEN, dtype=torch.float64)


@torch.library.register_fake("gradwire::rng_u32")
def _(seed, index):
    return torch.empty_like(index)


# ----------------------------------------------------------------------------- checked API
def _native() -> None:
    _build.load_native()  # once per process; never raises


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {x.dtype}")


def _check_format(exp_bits: int, man_bits: int, bias: int | None, scale_exp: int) -> int:
    if not (exp_bits >= 1 and man_bits >= 0 and 1 + exp_bits + man_bits <= 8):
        raise ValueError(f"need exp_bits >= 1, man_bits >= 0, 1+exp_bits+man_bits <= 8; got {exp_bits}, {man_bits}")
    bias = (1 << (exp_bits - 1)) - 1 if bias is None else int(bias)
    # Every value and quantum must be a float32 number, so the float32 algorithm is exact.
    if 1 - bias - man_bits < -140 or (1 << exp_bits) - 1 - bias > 126:
        raise ValueError(f"bias {bias} puts the format outside the float32 range")
    if not -127 <= scale_exp <= 127:
        raise ValueError(f"scale_exp must be in [-127, 127], got {scale_exp}")
    return bias


def _check_bytes(packed: torch.Tensor, numel: int, bits: int, name: str) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{name}: packed must be a uint8 tensor")
    if numel < 0:
        raise ValueError(f"{name}: numel must be >= 0, got {numel}")
    if packed.numel() != _packed_bytes(numel, bits):
        raise ValueError(f"{name}: {numel} codes of {bits} bits need {_packed_bytes(numel, bits)} bytes, got {packed.numel()}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits, any shape, row-major) into ceil(n*bits/8) bytes, LSB-first."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError("pack_bits: codes must be a uint8 tensor")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in [1, 8], got {bits}")
    _native()
    return torch.ops.gradwire.pack_bits(codes.contiguous(), bits)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: a flat uint8 tensor of ``numel`` codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits: bits must be in [1, 8], got {bits}")
    _check_bytes(packed, numel, bits, "unpack_bits")
    _native()
    return torch.ops.gradwire.unpack_bits(packed.contiguous(), bits, numel)


def fp_encode(x: torch.Tensor, exp_bits: int, man_bits: int, *, bias: int | None = None,
              scale_exp: int = 0, stochastic: bool = False, seed: int = 0,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``x * 2**scale_exp`` in a 1+exp_bits+man_bits format, packed, and the moment
    statistics of ``x`` from the same pass: ``(packed uint8, stats float64[5])``.

    Stochastic rounding draws ``rng.uniform(seed, offset + i)`` for flat element i. Non-finite
    elements get the -0 code; magnitudes above the format's max saturate. Empty ``x`` gives an
    empty payload and zero statistics. ``bias`` defaults to 2**(exp_bits-1) - 1.
    """
    _check_float(x, "fp_encode")
    bias = _check_format(exp_bits, man_bits, bias, scale_exp)
    rng.check_seed(seed)
    if offset < 0:
        raise ValueError(f"fp_encode: offset must be >= 0, got {offset}")
    _native()
    return torch.ops.gradwire.fp_encode(x.contiguous(), exp_bits, man_bits, bias, scale_exp,
                                        bool(stochastic), seed, offset)


def fp_decode(packed: torch.Tensor, numel: int, exp_bits: int, man_bits: int, *,
              bias: int | None = None, scale_exp: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values (flat, ``dtype``) of ``numel`` packed codes, times 2**-scale_exp; NaN for the -0 code."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fp_decode: dtype must be float32, bfloat16 or float16, got {dtype}")
    bias = _check_format(exp_bits, man_bits, bias, scale_exp)
    _check_bytes(packed, numel, 1 + exp_bits + man_bits, "fp_decode")
    _native()
    return torch.ops.gradwire.fp_decode(packed.contiguous(), numel, exp_bits, man_bits, bias,
                                        scale_exp, dtype)


def moment_stats(x: torch.Tensor) -> torch.Tensor:
    """float64[5]: (n_finite_nonzero, sum log2|x|, sum log2^2|x|, n_zero, n_nonfinite)."""
    _check_float(x, "moment_stats")
    _native()
    return torch.ops.gradwire.moment_stats(x.contiguous())


def implementation(op: str, device: str = "cpu") -> str:
    """Which kernel serves ``gradwire::<op>`` for tensors on ``device``: 'native' or 'reference'."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"gradwire::{op}", key)
    return "native" if has else "reference"


def status() -> str:
    """Human-readable table: for each op and device, the implementation that serves it and why."""
    _native()
    lines = [f"gradwire ops (torch {torch.__version__}; {_build.FORCE_REFERENCE_ENV}="
             f"{'1' if _build.force_reference() else 'unset'})"]
    for dev in ("cpu", "cuda"):
        ok, why = _build.STATUS[dev]
        lines.append(f"[{dev}] native kernels {'loaded' if ok else 'unavailable'}: {why}")
        for op in SCHEMAS:
            impl = implementation(op, dev)
            lines.append(f"  {op:<13} {impl}" + ("" if impl == "native" else " (pure-PyTorch reference)"))
    return "\n".join(lines)


__all__ = [
    "SCHEMAS", "REFERENCES", "pack_bits", "unpack_bits", "fp_encode", "fp_decode",
    "moment_stats", "implementation", "status",
]
