// FP encoding vectorised across elements, for the CPU kernel (gradwire_cpu.cpp includes this
// inside namespace gradwire::<anonymous>, after GW_SIMD_CLONES is defined).
//
// fp_codes_lanes is fp_codec.h's fp_split + the stochastic/nearest decision of fp_encode_one,
// rewritten in 32-bit lanes with mask selects so the loop auto-vectorises (AVX-512/AVX2 clones:
// per-lane variable shifts, 32-bit compares). It makes the same integer decisions:
//  * sig < 2**24, so sig >> shift for shift >= 24 is 0: the shift used for q is min(shift, 24);
//  * shift >= 16 always (man_bits <= 7, eq >= ey), so half = 2**(shift - 1) >= 2**15, and for
//    shift > 24 no rounding up happens to nearest (rem = sig < 2**24 <= half);
//  * stochastic thresh: rem << (24 - shift) for shift <= 24 (< 2**24), else
//    ceil(rem / 2**d) with d = min(shift - 24, 25): for d >= 24 both are (rem > 0);
//  * float32 subnormal inputs (rare: |x| < 2**-126) are not handled here: they are counted, and
//    the caller redoes them with fp_split (normalising needs a leading-zero count, which has no
//    AVX2 form).
// Lanes that saturate, are zero or non-finite are overridden at the end, as fp_split returns early.
#pragma once
// Included inside a namespace: <stdint.h>, <algorithm>, <cstdlib> and <string> come first in the
// translation unit.

namespace fpl {
inline uint32_t m32(bool c) { return 0u - static_cast<uint32_t>(c); }
inline uint32_t selu(bool c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & m32(c)); }
inline int32_t seli(bool c, int32_t a, int32_t b) { return b ^ ((a ^ b) & static_cast<int32_t>(m32(c))); }
}  // namespace fpl

// codes[j] = fp_encode_one(f32_from_bits(src.x(j)), p, keys, ctr_j) for every j whose input is
// not a float32 subnormal; src.r24(j) = random_u32(..) >> 8 (read only when kStochastic). Returns the
// number of subnormal inputs, whose codes the caller must redo.
template <bool kStochastic, typename Src, typename OutT>
__attribute__((always_inline)) inline int fp_codes_lanes_impl(const Src& src_in, int cnt, FpParams p,
                                                              OutT* codes) {
  using namespace fpl;
  // A local copy: read through the reference, the source's fields could alias `codes` (a char
  // type), which forces a reload per element and blocks vectorisation.
  const Src src = src_in;
  const int32_t man_bits = p.man_bits, emin = p.emin, emax = p.emax;
  const int32_t scale_exp = p.scale_exp;
  const bool subn = p.subnormals != 0;
  const uint32_t max_mag = p.max_mag, nonfinite = p.nonfinite;
  const int32_t sshift = p.bits - 1;
  int nsub = 0;
  for (int j = 0; j < cnt; ++j) {
    const uint32_t x = src.x(j);
    const uint32_t ab = x & 0x7FFFFFFFu;
    const bool nonfin = (x & 0x7F800000u) == 0x7F800000u;
    const bool zero = ab == 0u;
    const uint32_t sbit = (x >> 31) << sshift;
    const int32_t ea = static_cast<int32_t>(ab >> 23);
    nsub += (ea == 0) & (ab != 0u);
    const uint32_t sig = (ab & 0x7FFFFFu) | 0x800000u;
    const int32_t ey = ea - 127 + scale_exp;
    const bool cell_normal = ey >= emin;
    const int32_t eq = seli(cell_normal, ey, emin);
    const bool grid = cell_normal | subn;              // the cell has man_bits fraction bits
    const int32_t mb = seli(grid, man_bits, 0);
    const int32_t shift = 23 - mb + (eq - ey);         // >= 16
    const int32_t sq = seli(shift > 24, 24, shift);
    const uint32_t q = sig >> sq;
    const uint32_t rem = sig - (q << sq);
    uint32_t lo = selu(grid, (static_cast<uint32_t>(eq - emin) << man_bits) + q, 0u);
    uint32_t hi = selu(grid, lo + 1u, 1u << man_bits);
    lo = selu(lo > max_mag, max_mag, lo);
    hi = selu(hi > max_mag, max_mag, hi);
    uint32_t up;
    if (kStochastic) {
      const int32_t d = shift - 24;
      const int32_t dc = seli(d > 25, 25, d) & 31;
      const uint32_t neg = static_cast<uint32_t>(-d) & 31u;
      const uint32_t thresh = selu(d <= 0, rem << neg, (rem + ((1u << dc) - 1u)) >> dc);
      up = m32(src.r24(j) < thresh);
    } else {
      const uint32_t half = 1u << ((sq - 1) & 31);
      // Masks combined as uint32, not bool: GCC does not vectorise the bool form.
      const uint32_t tie_odd = m32(rem == half) & (0u - (lo & 1u));
      up = m32(shift <= 24) & (m32(rem > half) | tie_odd);
    }
    const uint32_t mag = (hi & up) | (lo & ~up);
    uint32_t code = selu(mag != 0u, sbit | mag, 0u);
    code = selu(ey > emax, sbit | max_mag, code);      // saturate (no upper neighbour)
    code = selu(zero, 0u, code);
    code = selu(nonfin, nonfinite, code);
    codes[j] = static_cast<OutT>(code);
  }
  return nsub;
}

// Element sources for fp_codes_lanes_impl: float32 bits and r24 = random_u32(..) >> 8 of lane j.
// ArraySrc reads precomputed arrays. Bf16HashSrc widens bf16 bits in the lane (a bf16 is the top
// half of a float32) and hashes the counter there (hash_r24_block's loop spelled inline, valid
// while the counter's high word is constant over the block), so the block is one pass: no xb /
// r24 arrays written and read back.
struct ArraySrc {
  const uint32_t* xb;
  const uint32_t* r;
  __attribute__((always_inline)) uint32_t x(int j) const { return xb[j]; }
  __attribute__((always_inline)) uint32_t r24(int j) const { return r[j]; }
};
struct Bf16HashSrc {
  const uint16_t* u;
  uint32_t lo0, hi, key1, key2;  // counter of lane j: hi * 2**32 + lo0 + j
  __attribute__((always_inline)) uint32_t x(int j) const { return static_cast<uint32_t>(u[j]) << 16; }
  __attribute__((always_inline)) uint32_t r24(int j) const {
    const uint32_t h = mix32((lo0 + static_cast<uint32_t>(j)) ^ key1);
    return mix32(h + hi + key2) >> 8;
  }
};

// Dispatch: an AVX-512 copy with 512-bit vectors (GCC defaults to 256-bit ones even with
// AVX-512; this loop has no reductions across lanes, so the wide form halves the instructions),
// an AVX2 copy, and the baseline one. The CPU is probed once; no -march flag is needed.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <bool kStochastic, typename Src, typename OutT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"))) int
fp_codes_lanes_avx512(const Src& src, int cnt, FpParams p, OutT* codes) {
  return fp_codes_lanes_impl<kStochastic>(src, cnt, p, codes);
}
template <bool kStochastic, typename Src, typename OutT>
__attribute__((target("avx2"))) int fp_codes_lanes_avx2(const Src& src, int cnt, FpParams p,
                                                        OutT* codes) {
  return fp_codes_lanes_impl<kStochastic>(src, cnt, p, codes);
}
// 2: AVX-512 (F/BW/VL/DQ) with BMI2, 1: AVX2, 0: baseline. GRADWIRE_CPU_SIMD=avx2|none caps it (to test
// or compare the narrower paths on a wider CPU); it never raises the level above the CPU's.
inline int simd_level() {
  static const int level = [] {
    int cpu = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2")
                  ? 2
                  : (__builtin_cpu_supports("avx2") ? 1 : 0);
    const char* env = std::getenv("GRADWIRE_CPU_SIMD");
    const std::string cap = env ? env : "";
    TORCH_CHECK(cap.empty() || cap == "avx512" || cap == "avx2" || cap == "none",
                "GRADWIRE_CPU_SIMD must be avx512, avx2 or none (or unset), got '", cap, "'");
    if (cap == "avx2") cpu = std::min(cpu, 1);
    if (cap == "none") cpu = 0;
    return cpu;
  }();
  return level;
}
#else
inline int simd_level() { return 0; }
#endif

// codes: uint8_t, or uint32_t (one 32-bit lane per code: the loop then vectorises at 16 lanes
// per zmm; with byte outputs GCC widens it to 64 elements per iteration and spills registers).
template <bool kStochastic, typename Src, typename OutT>
int fp_codes_lanes_src(const Src& src, int cnt, const FpParams& p, OutT* codes) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const int level = simd_level();
  if (level == 2) return fp_codes_lanes_avx512<kStochastic>(src, cnt, p, codes);
  if (level == 1) return fp_codes_lanes_avx2<kStochastic>(src, cnt, p, codes);
#endif
  return fp_codes_lanes_impl<kStochastic>(src, cnt, p, codes);
}

template <bool kStochastic>
int fp_codes_lanes(const uint32_t* xb, const uint32_t* r24, int cnt, const FpParams& p, uint8_t* codes) {
  return fp_codes_lanes_src<kStochastic>(ArraySrc{xb, r24}, cnt, p, codes);
}
