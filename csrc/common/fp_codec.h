// Framework-free building blocks shared by the CPU (C++) and CUDA kernels: one FP element
// encode/decode, the LSB-first bit packing of docs/architecture.md, and the moment-statistics
// accumulator. Everything here is a pure function of its arguments, so the CPU kernels, the CUDA
// kernels and the pure-PyTorch reference (gradwire/ops.py) agree bit for bit.
#pragma once
#include <stdint.h>
#include <string.h>

#include "rng.h"

namespace gradwire {

// Parameters of a sign/exponent/mantissa format (gradwire/numerics/fp.py is the oracle): every
// exponent field encodes finite numbers and the "-0" code (sign bit alone) means "non-finite".
// bits = 1 + exp_bits + man_bits <= 8.
struct FpParams {
  int man_bits;
  int emin;            // 1 - bias: exponent of the smallest normal (and of the subnormal grid)
  int emax;            // 2**exp_bits - 1 - bias: exponent of the top binade
  int bits;            // total bits per code
  int subnormals;      // 0: exponent-field-0 codes are all zero (values round between 0 and min_normal)
  int scale_exp;       // the value encoded is x * 2**scale_exp, applied to the exponent (exact)
  int stochastic;      // 0: round to nearest, ties to even; 1: stochastic rounding
  uint32_t max_mag;    // all-ones magnitude: the largest finite value
  uint32_t nonfinite;  // 1 << (bits - 1)
};

GW_HD uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}

GW_HD float f32_from_bits(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

GW_HD int clz32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __clz(v);
#else
  return __builtin_clz(v);  // v != 0 at every call site
#endif
}

// The two candidate codes of one element and the stochastic threshold between them:
//   code = (r24 < thresh) ? hi : lo,   r24 = random_u32(seed, counter) >> 8.
// For round-to-nearest (and for saturated / non-finite / zero inputs) lo is the final code and
// thresh = 0. Splitting the decision this way lets the CPU kernel tabulate lo/hi/thresh once per
// 16-bit input pattern (bf16/fp16) and leave only the hash and a compare per element.
struct FpSplit {
  uint32_t lo, hi, thresh;
};

// The decision of numerics/fp.py::encode_codes, made in integers.
// |x| = sig * 2**(e - 23) with sig in [2**23, 2**24) (float32 subnormals normalised), so
// |x| * 2**scale_exp has exponent Ey = e + scale_exp: the scale never touches a float.
// The grid cell has exponent Eq = max(Ey, emin) and spacing 2**(Eq - m) (2**emin for the
// flush-to-zero cell of a format without subnormals), i.e. the code grid is sig >> shift with
//   shift = 23 - m' + (Eq - Ey),   m' = m (or 0 in the no-subnormal cell).
// q = sig >> shift is the lower neighbour, rem / 2**shift the exact fraction towards the upper:
//   nearest: up iff rem > half or (rem == half and the lower code is odd)
//   stochastic: up iff u < rem / 2**shift with u = r24 * 2**-24, i.e. r24 * 2**shift < rem * 2**24,
//     i.e. r24 < thresh with thresh = rem << (24 - shift)            (shift <= 24)
//                                 or ceil(rem / 2**(shift - 24))     (shift > 24, r24 integer).
// Shifts are capped at 63: sig < 2**24, so every shift >= 25 takes the same decisions (the
// oracle's n >= -25 clamp is the same observation).
GW_HD FpSplit fp_split(float x, const FpParams& p) {
  FpSplit out;
  out.thresh = 0u;
  const uint32_t xb = f32_bits(x);
  if ((xb & 0x7F800000u) == 0x7F800000u) {  // Inf/NaN are data
    out.lo = out.hi = p.nonfinite;
    return out;
  }
  const uint32_t ab = xb & 0x7FFFFFFFu;
  if (ab == 0) {
    out.lo = out.hi = 0u;
    return out;
  }
  const uint32_t sbit = (xb >> 31) << (p.bits - 1);
  const int ea = static_cast<int>(ab >> 23);
  uint64_t sig;
  int e;
  if (ea) {
    sig = (ab & 0x7FFFFFu) | 0x800000u;
    e = ea - 127;
  } else {  // float32 subnormal: normalise so that bit 23 is the leading one
    const int sh = clz32(ab) - 8;
    sig = static_cast<uint64_t>(ab) << sh;
    e = -126 - sh;
  }
  const int ey = e + p.scale_exp;
  if (ey > p.emax) {  // saturate: there is no upper neighbour
    out.lo = out.hi = sbit | p.max_mag;
    return out;
  }
  const int cell_normal = ey >= p.emin;
  const int eq = cell_normal ? ey : p.emin;
  const int mb = (cell_normal || p.subnormals) ? p.man_bits : 0;
  int shift = 23 - mb + (eq - ey);
  if (shift > 63) shift = 63;
  const uint64_t q = sig >> shift;
  const uint64_t rem = sig - (q << shift);
  // Magnitudes of the neighbours (the flush-to-zero cell lies between 0 and min_normal).
  uint32_t lo = (cell_normal || p.subnormals)
                    ? (static_cast<uint32_t>(eq - p.emin) << p.man_bits) + static_cast<uint32_t>(q)
                    : 0u;
  uint32_t hi = (cell_normal || p.subnormals) ? lo + 1u : (1u << p.man_bits);
  if (lo > p.max_mag) lo = p.max_mag;
  if (hi > p.max_mag) hi = p.max_mag;
  if (p.stochastic) {
    const int d = shift - 24;
    out.thresh = d <= 0 ? static_cast<uint32_t>(rem << (-d))
                        : static_cast<uint32_t>((rem + ((uint64_t(1) << d) - 1)) >> d);
  } else {
    const uint64_t half = uint64_t(1) << (shift - 1);
    // Ties go to the even *code* (with man_bits = 0 the exponent field's LSB decides).
    if ((rem > half) || (rem == half && (lo & 1u))) lo = hi;
    hi = lo;
  }
  // -0 is the non-finite code, so a value that rounds to zero is +0 whatever its sign.
  out.lo = lo ? (sbit | lo) : 0u;
  out.hi = hi ? (sbit | hi) : 0u;
  return out;
}

// Code of one element (counter `index` for stochastic rounding).
GW_HD uint32_t fp_encode_one(float x, const FpParams& p, RngKeys keys, uint64_t index) {
  const FpSplit s = fp_split(x, p);
  if (s.thresh == 0u) return s.lo;
  return (random_u32(keys, index) >> 8) < s.thresh ? s.hi : s.lo;
}

// float32 value of a code, before the 2**-scale_exp of decoding (NaN for the non-finite code).
GW_HD float fp_code_value(uint32_t code, int man_bits, int emin, int bits, int subnormals) {
  const uint32_t nonfinite = 1u << (bits - 1);
  if (code == nonfinite) return f32_from_bits(0x7FC00000u);
  const uint32_t mag = code & (nonfinite - 1u);
  const uint32_t ef = mag >> man_bits;
  const uint32_t mf = mag & ((1u << man_bits) - 1u);
  // value = significand * 2**exp2, built from bits so it is exact (no libm).
  const uint32_t sigv = ef ? (mf | (1u << man_bits)) : (subnormals ? mf : 0u);
  const int exp2 = (ef ? static_cast<int>(ef) - 1 : 0) + emin - man_bits;
  // sigv < 2**8 and exp2 >= -149 for every format the oracle accepts: the product is exact.
  const float s = exp2 >= -126 ? f32_from_bits(static_cast<uint32_t>(exp2 + 127) << 23)
                               : f32_from_bits(1u << (exp2 + 149));
  const float v = static_cast<float>(sigv) * s;
  return (code & nonfinite) ? -v : v;
}

// Stochastic pruning of one element, numerics/pruning.py::stochastic_prune (paper 001, Eq. 5):
// |x| > a, Inf and NaN pass through; otherwise x becomes copysign(a, x) when
// |x| >= a * eps (one float32 multiply, eps = uniform01(seed, index)) and |x| > 0, else +0.
// `a` is the effective threshold (alpha rounded to x's dtype), > 0.
GW_HD float prune_one_u(float x, float a, float eps) {
  const float ax = f32_from_bits(f32_bits(x) & 0x7FFFFFFFu);
  if (!(ax <= a)) return x;
  const float t = a * eps;
  if (ax >= t && ax > 0.0f) return f32_from_bits(f32_bits(a) | (f32_bits(x) & 0x80000000u));
  return 0.0f;
}

GW_HD float prune_one(float x, float a, RngKeys keys, uint64_t index) {
  return prune_one_u(x, a, uniform01(keys, index));
}

// Pack 8 codes of `bits` bits LSB-first into the low 8*bits bits of a word (architecture.md).
GW_HD uint64_t pack8(const uint32_t* codes, int bits) {
  uint64_t w = 0;
  for (int j = 0; j < 8; ++j) w |= static_cast<uint64_t>(codes[j]) << (j * bits);
  return w;
}

// Moment statistics, numerics.lognormal layout:
// (n_finite_nonzero, sum log2|x|, sum log2^2|x|, n_zero, n_nonfinite).
struct MomentAcc {
  double n_fnz, s1, s2, n_zero, n_nonfinite;
};

GW_HD void acc_init(MomentAcc& a) { a.n_fnz = a.s1 = a.s2 = a.n_zero = a.n_nonfinite = 0.0; }

}  // namespace gradwire
