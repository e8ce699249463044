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
  fp_encode(x, exp_bits, man_bits, bias, subnormals, scale_exp, stochastic, seed, offset,
            with_stats=True)
      -> (packed u8[ceil(n*bits/8)], stats f64[5])        numerics.fp.encode_codes, packed, plus
                                                          numerics.lognormal.moment_stats(x)
                                                          (zeros without with_stats)
  fp_decode(packed, numel, exp_bits, man_bits, bias, subnormals, scale_exp, dtype) -> dtype[numel]
  moment_stats(x) -> f64[5]     (n_finite_nonzero, sum log2|x|, sum log2^2|x|, n_zero, n_nonfinite)
  rng_u32(seed, index i64) -> i64   numerics.rng.random_u32; exposes the C++ port for tests
  stochastic_prune(x, alpha, seed, offset) -> like x   numerics.pruning.stochastic_prune, with
                                alpha already effective (rounded to x.dtype; <= 0: identity)
  nm_select(x, scheme, seed, offset) -> (values f32[nb, N], indices u8[nb, N])
                                numerics.nm.<scheme>_select on consecutive blocks of x's flat
                                order (the wrapper moves the block dim last); NM_SCHEMES

References: numerics.fp (encode_codes/decode_codes), numerics.lognormal.moment_stats,
numerics.pruning.stochastic_prune, numerics.nm.*_select, numerics.rng, and the LSB-first
packing of docs/architecture.md (implemented here: codec.bitpack sits above ops).

Bit-exactness: packed bytes and decoded values are identical in every implementation. In the
statistics the counts are exact; the float64 sums are not bit-identical: the reference takes
log2 in float32 (error <= 2**-24 |log2|x|| per element) while the kernels take it in float64
(C++: float32 inputs by table + series, |err| < 2**-40; bf16/fp16 inputs in fixed point with
2**-28 resolution, |err| <= 2**-29, summed exactly in integers -- by a histogram of their 2**15
magnitudes or, for bf16 on AVX-512 VNNI, vector lanes: the same bits either way; CUDA: exact
exponent + float32 log2f of the mantissa, |err| <= 2**-22, float64 sums in a fixed-shape block
reduction) and are reproducible run to run and for any thread count;
the two agree within 2**-23 * sum |log2|x|| (+ 2**-29 per element for 16-bit inputs on the CPU,
+ 2**-22 per element on CUDA; tested).
"""
from __future__ import annotations


import torch

if __name__ == "__main__":  # `python -m gradwire.ops`: report from the real module, defined once
    import gradwire.ops as _ops

    print(_ops.status())
    raise SystemExit(0)

from gradwire import _build
from gradwire.numerics import lognormal, nm, pruning, rng
from gradwire.numerics.fp import FPFormat, Rounding, decode_codes, encode_codes

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATS_LEN = 5

SCHEMAS = {
    "pack_bits": "pack_bits(Tensor codes, int bits) -> Tensor",
    "unpack_bits": "unpack_bits(Tensor packed, int bits, int numel) -> Tensor",
    "fp_encode": "fp_encode(Tensor x, int exp_bits, int man_bits, int bias, bool subnormals, "
    "int scale_exp, bool stochastic, int seed, int offset, bool with_stats=True) -> (Tensor, Tensor)",
    "fp_decode": "fp_decode(Tensor packed, int numel, int exp_bits, int man_bits, int bias, "
    "bool subnormals, int scale_exp, ScalarType dtype) -> Tensor",
    "moment_stats": "moment_stats(Tensor x) -> Tensor",
    "rng_u32": "rng_u32(int seed, Tensor index) -> Tensor",
    "stochastic_prune": "stochastic_prune(Tensor x, float alpha, int seed, int offset) -> Tensor",
    "nm_select": "nm_select(Tensor x, int scheme, int seed, int offset) -> (Tensor, Tensor)",
}
NM_SCHEMES = {"mvue_12": 0, "mvue_24_exact": 1, "mvue_24_approx": 2}  # nm_select's `scheme`
_NM_MN = {0: (2, 1), 1: (4, 2), 2: (4, 2)}  # scheme -> (M, N)

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
    used = (numel * bits) % 8
    if used and int(p[-1]) >> used:
        raise ValueError("unpack_bits: padding bits of the last byte are not zero")
    stream = ((p.unsqueeze(1) >> torch.arange(8, device=p.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << torch.arange(bits, device=p.device)).sum(1).to(torch.uint8)


def _fp_encode_ref(x, exp_bits, man_bits, bias, subnormals, scale_exp, stochastic, seed, offset,
                   with_stats=True):
    fmt = FPFormat(exp_bits, man_bits, bias, subnormals)
    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST_EVEN
    codes = encode_codes(x, fmt, rounding, scale_exp=scale_exp, seed=seed, offset=offset)
    stats = (lognormal.moment_stats(x) if with_stats
             else torch.zeros(STATS_LEN, dtype=torch.float64))
    return _pack_bits_ref(codes, fmt.bits), stats.to(x.device)


def _fp_decode_ref(packed, numel, exp_bits, man_bits, bias, subnormals, scale_exp, dtype):
    fmt = FPFormat(exp_bits, man_bits, bias, subnormals)
    codes = _unpack_bits_ref(packed, fmt.bits, numel)
    return decode_codes(codes, fmt, scale_exp=scale_exp).to(dtype)


def _moment_stats_ref(x: torch.Tensor) -> torch.Tensor:
    return lognormal.moment_stats(x).to(x.device)


def _stochastic_prune_ref(x, alpha, seed, offset):
    return pruning.stochastic_prune(x, alpha, seed=seed, offset=offset)


def _nm_select_ref(x, scheme, seed, offset):
    m, n = _NM_MN[scheme]
    fn = {0: nm.mvue_12_select, 1: nm.mvue_24_exact_select, 2: nm.mvue_24_approx_select}[scheme]
    values, indices = fn(x.reshape(-1, m), dim=-1, seed=seed, offset=offset)
    return values.reshape(-1, n).clone(), indices.reshape(-1, n).clone()


def _rng_u32_ref(seed: int, index: torch.Tensor) -> torch.Tensor:
    return rng.random_u32(seed, index.contiguous())


REFERENCES = {
    "pack_bits": _pack_bits_ref,
    "unpack_bits": _unpack_bits_ref,
    "fp_encode": _fp_encode_ref,
    "fp_decode": _fp_decode_ref,
    "moment_stats": _moment_stats_ref,
    "rng_u32": _rng_u32_ref,
    "stochastic_prune": _stochastic_prune_ref,
    "nm_select": _nm_select_ref,
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
def _(x, exp_bits, man_bits, bias, subnormals, scale_exp, stochastic, seed, offset, with_stats=True):
    n = _packed_bytes(x.numel(), 1 + exp_bits + man_bits)
    return x.new_empty(n, dtype=torch.uint8), x.new_empty(STATS_LEN, dtype=torch.float64)


@torch.library.register_fake("gradwire::fp_decode")
def _(packed, numel, exp_bits, man_bits, bias, subnormals, scale_exp, dtype):
    return packed.new_empty(numel, dtype=dtype)


@torch.library.register_fake("gradwire::moment_stats")
def _(x):
    return x.new_empty(STATS_LEN, dtype=torch.float64)


@torch.library.register_fake("gradwire::stochastic_prune")
def _(x, alpha, seed, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("gradwire::nm_select")
def _(x, scheme, seed, offset):
    m, n = _NM_MN[scheme]
    nb = x.numel() // m
    return x.new_empty((nb, n), dtype=torch.float32), x.new_empty((nb, n), dtype=torch.uint8)


@torch.library.register_fake("gradwire::rng_u32")
def _(seed, index):
    return torch.empty_like(index)


# ----------------------------------------------------------------------------- checked API
def _native() -> None:
    _build.load_native(tuple(SCHEMAS))  # once per process; never raises


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name}: expected float32, bfloat16, float16 (or float64), got {x.dtype}")


def _check_fmt(fmt) -> FPFormat:
    if not isinstance(fmt, FPFormat):
        raise TypeError(f"fmt must be a numerics.fp.FPFormat, got {type(fmt).__name__}")
    return fmt  # FPFormat validated its own fields (float32 range, bits <= 8)


def _check_scale(scale_exp) -> int:
    if isinstance(scale_exp, bool) or not isinstance(scale_exp, int):
        raise TypeError(f"scale_exp must be an int, got {type(scale_exp).__name__}")
    return max(-1000, min(1000, scale_exp))  # as numerics.fp: beyond, nothing changes


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


def fp_encode(x: torch.Tensor, fmt: FPFormat, rounding: Rounding | str = Rounding.NEAREST_EVEN, *,
              scale_exp: int = 0, seed: int = 0, offset: int = 0,
              with_stats: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerics.fp.encode_codes`` packed, plus ``lognormal.moment_stats(x)`` from the same pass.

    Returns ``(packed uint8[ceil(numel*fmt.bits/8)], stats float64[5])`` on ``x.device``.
    ``with_stats=False`` skips the statistics (10-22% of a bf16 encode on the CPU kernels)
    and returns zeros in their place: the identity of ``merge_stats``, so a caller that adds
    them up loses nothing. The packed bytes are the same either way.
    Stochastic rounding draws ``rng.uniform(seed, offset + i)`` for flat element i. Accepts
    float32/bfloat16/float16 (TypeError otherwise; float64 is rounded to float32 first, finite
    values clamped to the float32 range as numerics.fp does). Any shape and strides; empty ``x``
    gives an empty payload and zero statistics.
    """
    _check_float(x, "fp_encode")
    if x.dtype == torch.float64:  # kernels read 16/32-bit floats; same rounding as numerics.fp
        fmax = torch.finfo(torch.float32).max
        x = torch.where(torch.isfinite(x), x.clamp(-fmax, fmax), x).to(torch.float32)
    fmt = _check_fmt(fmt)
    rounding = Rounding(rounding) if isinstance(rounding, str) else rounding
    if not isinstance(rounding, Rounding):
        raise TypeError(f"rounding must be a Rounding, got {type(rounding).__name__}")
    scale_exp = _check_scale(scale_exp)
    rng.check_seed(seed)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"fp_encode: offset must be an int >= 0, got {offset!r}")
    if not isinstance(with_stats, bool):
        raise TypeError(f"fp_encode: with_stats must be a bool, got {type(with_stats).__name__}")
    _native()
    return torch.ops.gradwire.fp_encode(
        x.contiguous(), fmt.exp_bits, fmt.man_bits, fmt.bias, fmt.subnormals, scale_exp,
        rounding is Rounding.STOCHASTIC, seed, offset, with_stats)


def fp_decode(packed: torch.Tensor, numel: int, fmt: FPFormat, *, scale_exp: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``numerics.fp.decode_codes`` of ``numel`` packed codes, cast to ``dtype``: flat, on
    ``packed.device``; NaN for the non-finite code. ValueError if the byte count is not
    ceil(numel*bits/8) or the last byte's padding bits are not zero."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fp_decode: dtype must be float32, bfloat16 or float16, got {dtype}")
    fmt = _check_fmt(fmt)
    scale_exp = _check_scale(scale_exp)
    _check_bytes(packed, numel, fmt.bits, "fp_decode")
    _native()
    return torch.ops.gradwire.fp_decode(packed.contiguous(), numel, fmt.exp_bits, fmt.man_bits,
                                        fmt.bias, fmt.subnormals, scale_exp, dtype)


def moment_stats(x: torch.Tensor) -> torch.Tensor:
    """float64[5]: (n_finite_nonzero, sum log2|x|, sum log2^2|x|, n_zero, n_nonfinite).

    float64 input goes to the reference (``lognormal.moment_stats``) as it is."""
    _check_float(x, "moment_stats")
    if x.dtype == torch.float64:
        return lognormal.moment_stats(x).to(x.device)
    _native()
    return torch.ops.gradwire.moment_stats(x.contiguous())


def stochastic_prune(x: torch.Tensor, alpha, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """``numerics.pruning.stochastic_prune`` (paper 001, Eq. 5), same bits, on the fastest kernel.

    ``alpha`` is rounded to ``x.dtype`` first (``pruning.effective_alpha``); <= 0 is identity.
    Returns a new contiguous tensor of x's shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"stochastic_prune: x must be a float32/bfloat16/float16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    a = pruning.effective_alpha(alpha, x.dtype)
    rng.check_seed(seed)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"stochastic_prune: offset must be an int >= 0, got {offset!r}")
    _native()
    return torch.ops.gradwire.stochastic_prune(x.contiguous(), a, seed, offset)


def nm_select(x: torch.Tensor, scheme: str, *, dim: int = -1, seed: int = 0,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerics.nm.<scheme>_select`` (scheme in ``NM_SCHEMES``), same bits, fastest kernel:
    ``(values float32 [..., nb, N], indices uint8 [..., nb, N])`` with ``dim`` moved last.

    ValueError when ``x.shape[dim]`` is not a multiple of M (2 or 4), TypeError for dtypes
    other than float32/bfloat16/float16.
    """
    if scheme not in NM_SCHEMES:
        raise ValueError(f"nm_select: scheme must be one of {sorted(NM_SCHEMES)}, got {scheme!r}")
    code = NM_SCHEMES[scheme]
    m, n = _NM_MN[code]
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"nm_select: x must be a float32/bfloat16/float16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"nm_select: dim={dim!r} is out of range for a {x.dim()}-d tensor")
    if x.shape[dim] % m:
        raise ValueError(f"nm_select: N:M blocks of M={m} need x.shape[dim] divisible by {m}, "
                         f"got shape {tuple(x.shape)}, dim={dim}")
    rng.check_seed(seed)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"nm_select: offset must be an int >= 0, got {offset!r}")
    xm = x.movedim(dim, -1).contiguous()
    _native()
    values, indices = torch.ops.gradwire.nm_select(xm, code, seed, offset)
    lead = tuple(xm.shape[:-1]) + (xm.shape[-1] // m, n)
    return values.reshape(lead), indices.reshape(lead)


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
    "moment_stats", "stochastic_prune", "nm_select", "NM_SCHEMES", "implementation", "status",
]
