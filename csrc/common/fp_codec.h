// Framework-free building blocks shared by the CPU (C++) and CUDA kernels: one FP element
// encode/decode, the LSB-first bit packing of docs/architecture.md, and the moment-statistics
// accumulator. Everything here is a pure function of its arguments, so the CPU kernels, the CUDA
// kernels and the pure-PyTorch reference (gradwire/ops.py) agree bit for bit.
#pragma once
#include <stdint.h>
#include <string.h>

#include "rng.h"

namespace gradwire {

// Parameters of a sign/exponent/mantissa format with subnormals and no inf/NaN codes: every
// exponent field value encodes finite numbers and the "-0" code (sign bit alone) means
// "non-finite" (docs/architecture.md, numerics.fp). bits = 1 + exp_bits + man_bits <= 8.
struct FpParams {
  int man_bits;
  int emin;            // 1 - bias: exponent of the smallest normal (and of the subnormal grid)
  int bits;            // total bits per code
  uint32_t max_mag;    // all-ones magnitude: the largest finite value
  uint32_t nonfinite;  // 1 << (bits - 1)
  float max_value;     // value of max_mag (exact in float32 for every supported format)
  float scale;         // 2**scale_exp, applied to x before rounding (exact power of two)
  int stochastic;      // 0: round to nearest, ties to even; 1: stochastic rounding
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

// Code of one element. The decision is the exact real-number one (see gradwire/ops.py,
// `_fp_encode_reference`, for the float formulation it matches):
//   a = |x * 2**scale_exp| (float32 multiply); a > max_value saturates to max_mag;
//   lo, lo + quantum = the two representable neighbours of a, quantum = 2**(max(E, emin) - m);
//   nearest: round half to even; stochastic: round up iff u < (a - lo) / quantum,
//   u = uniform01(seed, index) = (random_u32 >> 8) * 2**-24.
// Both sides of that comparison are exact, so it is done here in integers:
//   u < rem / 2**shift  <=>  r24 * 2**shift < rem * 2**24.
GW_HD uint32_t fp_encode_one(float x, const FpParams& p, RngKeys keys, uint64_t index) {
  const uint32_t xb = f32_bits(x);
  if ((xb & 0x7F800000u) == 0x7F800000u) return p.nonfinite;  // Inf/NaN are data
  const uint32_t yb = f32_bits(x * p.scale);
  const uint32_t sign = yb >> 31;
  const uint32_t ab = yb & 0x7FFFFFFFu;
  uint32_t mag;
  if (!(f32_from_bits(ab) <= p.max_value)) {
    mag = p.max_mag;  // saturate (also catches overflow of the scaling to +inf)
  } else {
    const int ea = static_cast<int>(ab >> 23);
    const uint64_t sig = (ab & 0x7FFFFFu) | (ea ? 0x800000u : 0u);
    const int e = ea ? ea - 127 : -126;
    const int eq = e > p.emin ? e : p.emin;
    int shift = 23 - p.man_bits + (eq - e);
    if (shift > 63) shift = 63;  // sig < 2**24: every shift >= 25 rounds alike
    const uint64_t q = sig >> shift;
    const uint64_t rem = sig - (q << shift);
    uint32_t up;
    if (p.stochastic) {
      const uint64_t r24 = random_u32(keys, index) >> 8;
      up = shift <= 24 ? (r24 < (rem << (24 - shift))) : ((r24 << (shift - 24)) < rem);
    } else {
      const uint64_t half = uint64_t(1) << (shift - 1);
      up = (rem > half) || (rem == half && (q & 1u));
    }
    mag = (static_cast<uint32_t>(eq - p.emin) << p.man_bits) + static_cast<uint32_t>(q) + up;
    if (mag > p.max_mag) mag = p.max_mag;
  }
  // -0 is the non-finite code, so a value that rounds to zero is +0 whatever its sign.
  return mag ? (sign << (p.bits - 1)) | mag : 0u;
}

// float32 value of a code, before the 2**-scale_exp of decoding (NaN for the non-finite code).
GW_HD float fp_code_value(uint32_t code, int man_bits, int emin, int bits) {
  const uint32_t nonfinite = 1u << (bits - 1);
  if (code == nonfinite) return f32_from_bits(0x7FC00000u);
  const uint32_t mag = code & (nonfinite - 1u);
  const uint32_t ef = mag >> man_bits;
  const uint32_t mf = mag & ((1u << man_bits) - 1u);
  // value = significand * 2**(exp - man_bits); built from bits so it is exact (no libm).
  const uint32_t sigv = ef ? (mf | (1u << man_bits)) : mf;
  const int exp2 = (ef ? static_cast<int>(ef) - 1 : 0) + emin - man_bits;
  // sigv < 2**8 and exp2 >= -149 + 8 for every supported format: sigv * 2**exp2 is exact.
  float v = static_cast<float>(sigv);
  float s = exp2 >= -126 ? f32_from_bits(static_cast<uint32_t>(exp2 + 127) << 23)
                         : f32_from_bits(1u << (exp2 + 149));
  v = v * s;
  return (code & nonfinite) ? -v : v;
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
