// Moment statistics of 16-bit inputs (bf16, fp16) as exact integer sums (gradwire_cpu.cpp
// includes this inside namespace gradwire::<anonymous>, after fp_lanes.h for simd_level()).
//
// log2|x| of a finite nonzero 16-bit float is taken in fixed point with 28 fraction bits:
//   lf(x) = E * 2**28 + L28[M],   L28[j] = round(2**28 * log2(1 + j / 1024))   (j < 1024)
// where |x| = 2**E * (1 + M / 1024) exactly (bf16: M = m7 << 3; subnormals normalised first), so
// |lf / 2**28 - log2|x|| <= 2**-29. The statistics are the exact integers sum lf and sum lf**2
// (__int128), rounded once to float64 at the end: any summation order, thread count, chunking or
// method gives the same bits. Two methods compute them: a histogram of the 2**15 |x| patterns
// (any CPU, and the fused FP encode, which interleaves the histogram with its code lanes), and,
// for bf16 moment_stats on AVX-512 VNNI CPUs, vector lanes (below): measured ~2x faster than
// the histogram on 64M bf16 elements (one thread, Zen 4), and bit-identical to it (tested).
#pragma once
// Included inside a namespace: <cmath>, <cstring>, <stdint.h> and (x86) <immintrin.h> come first.

constexpr int kLf = 28;  // fraction bits of lf

struct Log2Fixed {
  int32_t l28[1024];
  alignas(64) int16_t bf16_hi[128];  // L28[m << 3] >> 14 and & (2**14 - 1): the vector lanes' tables
  alignas(64) int16_t bf16_lo[128];
  Log2Fixed() {
    for (int j = 0; j < 1024; ++j)
      l28[j] = static_cast<int32_t>(std::llround(std::ldexp(std::log2(1.0 + j / 1024.0), kLf)));
    for (int m = 0; m < 128; ++m) {
      bf16_hi[m] = static_cast<int16_t>(l28[m << 3] >> 14);
      bf16_lo[m] = static_cast<int16_t>(l28[m << 3] & 0x3FFF);
    }
  }
};
inline const Log2Fixed& log2_fixed() {
  static const Log2Fixed t;
  return t;
}

// Exact sums of lf and lf**2 (|lf| < 2**36: lf**2 * count < 2**112 for any count < 2**40).
struct ExactLogSums {
  int64_t n_fnz = 0, n_zero = 0, n_nonfinite = 0;
  __int128 s1 = 0, s2 = 0;
  void add(int64_t lf, int64_t count) {
    n_fnz += count;
    s1 += static_cast<__int128>(lf) * count;
    s2 += static_cast<__int128>(lf) * lf * count;
  }
  void merge(const ExactLogSums& o) {
    n_fnz += o.n_fnz;
    n_zero += o.n_zero;
    n_nonfinite += o.n_nonfinite;
    s1 += o.s1;
    s2 += o.s2;
  }
  at::Tensor to_tensor() const {  // moment_stats layout; one rounding per sum
    at::Tensor out = at::empty({5}, at::TensorOptions().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    o[0] = static_cast<double>(n_fnz);
    o[1] = std::ldexp(static_cast<double>(s1), -kLf);
    o[2] = std::ldexp(static_cast<double>(s2), -2 * kLf);
    o[3] = static_cast<double>(n_zero);
    o[4] = static_cast<double>(n_nonfinite);
    return out;
  }
};

// lf of the magnitude pattern ab (sign cleared) of a 16-bit float with `man` mantissa bits and
// exponent bias `bias`; the caller has excluded zero and Inf/NaN.
inline int64_t lf16(uint32_t ab, int man, int bias, const int32_t* l28) {
  const int e = static_cast<int>(ab >> man);
  uint32_t m = ab & ((1u << man) - 1u);
  int E = e - bias;
  if (e == 0) {  // subnormal: m * 2**(1 - bias - man), m = 2**k * (1 + r / 2**k)
    const int k = 31 - __builtin_clz(m);
    E = k + 1 - bias - man;
    m = (m - (1u << k)) << (man - k);
  }
  return static_cast<int64_t>(E) * (int64_t(1) << kLf) + l28[m << (10 - man)];
}

template <typename T>
struct Layout16;  // mantissa bits, bias, and the first Inf/NaN magnitude pattern
template <>
struct Layout16<c10::BFloat16> {
  static constexpr int man = 7, bias = 127;
  static constexpr uint32_t inf = 0x7F80;
};
template <>
struct Layout16<c10::Half> {
  static constexpr int man = 10, bias = 15;
  static constexpr uint32_t inf = 0x7C00;
};

// The sums from a histogram of |x| patterns (2**15 bins).
template <typename T>
ExactLogSums sums_from_hist(const int64_t* hist) {
  using L = Layout16<T>;
  const int32_t* l28 = log2_fixed().l28;
  ExactLogSums s;
  for (uint32_t b = 0; b < (1u << 15); ++b) {
    const int64_t c = hist[b];
    if (!c) continue;
    if (b >= L::inf) s.n_nonfinite += c;
    else if (b == 0) s.n_zero += c;
    else s.add(lf16(b, L::man, L::bias, l28), c);
  }
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GW_HAVE_STATS_VNNI 1
#define GW_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// Per-lane int64 partial sums of the vector method, kept across calls (one chunk of a thread).
// lf = e * 2**28 + h * 2**14 + l with e = E (normal bf16), h, l the 14-bit halves of L28, so
//   sum lf   = 2**28 S(e) + 2**14 S(h) + S(l)
//   sum lf^2 = 2**56 S(ee) + 2**43 S(eh) + 2**29 S(el) + 2**28 S(hh) + 2**15 S(hl) + S(ll).
struct Bf16VecSums {
  int64_t lanes[9][8] = {};  // S(e), S(ee), S(eh), S(el), S(h), S(l), S(hh), S(hl), S(ll)
  ExactLogSums scalar;       // counts, subnormals and the tail
  ExactLogSums finish() const {
    using I = __int128;
    I t[9] = {};
    for (int k = 0; k < 9; ++k)
      for (int j = 0; j < 8; ++j) t[k] += lanes[k][j];
    const auto p2 = [](int k) { return I(1) << k; };  // multiply: t[0], t[2], t[3] may be < 0
    ExactLogSums s = scalar;
    s.s1 += t[0] * p2(28) + t[4] * p2(14) + t[5];
    s.s2 += t[1] * p2(56) + t[2] * p2(43) + t[3] * p2(29) + t[6] * p2(28) + t[7] * p2(15) + t[8];
    return s;
  }
};

inline bool stats_vnni_available() {
  static const bool ok = simd_level() == 2 && __builtin_cpu_supports("avx512vnni");
  return ok;
}

GW_TARGET_VNNI inline __m512i widen_u32_add(__m512i acc, __m512i v) {
  return _mm512_add_epi64(_mm512_add_epi64(acc, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(v))),
                          _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}
GW_TARGET_VNNI inline __m512i widen_i32_add(__m512i acc, __m512i v) {
  return _mm512_add_epi64(_mm512_add_epi64(acc, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))),
                          _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

// Adds the statistics of bf16 patterns u[0, n) to acc. 32 lanes of 16 bits per step: e and the
// two halves of L28[m] (four vpermi2w table lookups, the 7-bit m picking one of 128 entries)
// are multiplied and summed in int32 by vpdpwssd, and widened to int64 before they can overflow:
// products of halves (< 2**28 per pair of lanes) every 8 steps, the rest (< 2**22) every 256.
// Zeros and Inf/NaN are counted in 16-bit lanes too: scalar counts in the loop were spilled to
// the stack and their store-to-load chain made the loop twice as slow. Subnormal lanes (rare)
// only set a flag; a scalar pass adds them afterwards.
GW_TARGET_VNNI void bf16_stats_avx512(const uint16_t* u, int64_t n, Bf16VecSums& acc) {
  const Log2Fixed& tabs = log2_fixed();
  const int32_t* l28 = tabs.l28;
  const int16_t* th = tabs.bf16_hi;
  const int16_t* tl = tabs.bf16_lo;
  const __m512i th0 = _mm512_load_si512(th), th1 = _mm512_load_si512(th + 32);
  const __m512i th2 = _mm512_load_si512(th + 64), th3 = _mm512_load_si512(th + 96);
  const __m512i tl0 = _mm512_load_si512(tl), tl1 = _mm512_load_si512(tl + 32);
  const __m512i tl2 = _mm512_load_si512(tl + 64), tl3 = _mm512_load_si512(tl + 96);
  const __m512i absm = _mm512_set1_epi16(0x7FFF), one = _mm512_set1_epi16(1);
  const __m512i c127 = _mm512_set1_epi16(127), c254 = _mm512_set1_epi16(254);
  const __m512i inf = _mm512_set1_epi16(0x7F80), bit6 = _mm512_set1_epi16(0x40);
  __m512i W[9];
  for (int k = 0; k < 9; ++k) W[k] = _mm512_loadu_si512(acc.lanes[k]);
  int64_t nz = 0, nnf = 0;
  uint32_t any_sub = 0;
  const int64_t nv = n / 32 * 32;
  int64_t i = 0;
  while (i < nv) {
    __m512i ae = _mm512_setzero_si512(), aee = ae, aeh = ae, ael = ae, ah = ae, al = ae;
    __m512i cz = ae, cf = ae;  // per-lane counts of zeros and Inf/NaN (<= 256 each)
    const int64_t outer_end = std::min(nv, i + int64_t(32) * 256);
    while (i < outer_end) {
      __m512i ahh = _mm512_setzero_si512(), ahl = ahh, all = ahh;
      const int64_t inner_end = std::min(outer_end, i + int64_t(32) * 8);
      for (; i < inner_end; i += 32) {
        const __m512i a = _mm512_and_si512(_mm512_loadu_si512(u + i), absm);
        const __m512i e = _mm512_srli_epi16(a, 7);
        const __mmask32 kn = _mm512_cmplt_epu16_mask(_mm512_sub_epi16(e, one), c254);  // normal
        const __mmask32 kz = _mm512_cmpeq_epi16_mask(a, _mm512_setzero_si512());
        const __mmask32 kf = _mm512_cmpge_epu16_mask(a, inf);
        cz = _mm512_mask_add_epi16(cz, kz, cz, one);
        cf = _mm512_mask_add_epi16(cf, kf, cf, one);
        any_sub |= ~(kn | kz | kf);
        const __m512i ep = _mm512_maskz_sub_epi16(kn, e, c127);
        const __mmask32 k6 = _mm512_test_epi16_mask(a, bit6);
        const __mmask32 klo = kn & ~k6, khi = kn & k6;
        const __m512i h = _mm512_or_si512(_mm512_maskz_permutex2var_epi16(klo, th0, a, th1),
                                          _mm512_maskz_permutex2var_epi16(khi, th2, a, th3));
        const __m512i l = _mm512_or_si512(_mm512_maskz_permutex2var_epi16(klo, tl0, a, tl1),
                                          _mm512_maskz_permutex2var_epi16(khi, tl2, a, tl3));
        ae = _mm512_dpwssd_epi32(ae, ep, one);
        aee = _mm512_dpwssd_epi32(aee, ep, ep);
        aeh = _mm512_dpwssd_epi32(aeh, ep, h);
        ael = _mm512_dpwssd_epi32(ael, ep, l);
        ah = _mm512_dpwssd_epi32(ah, h, one);
        al = _mm512_dpwssd_epi32(al, l, one);
        ahh = _mm512_dpwssd_epi32(ahh, h, h);
        ahl = _mm512_dpwssd_epi32(ahl, h, l);
        all = _mm512_dpwssd_epi32(all, l, l);
      }
      W[6] = widen_u32_add(W[6], ahh);
      W[7] = widen_u32_add(W[7], ahl);
      W[8] = widen_u32_add(W[8], all);
    }
    W[0] = widen_i32_add(W[0], ae);
    W[1] = widen_u32_add(W[1], aee);
    W[2] = widen_i32_add(W[2], aeh);
    W[3] = widen_i32_add(W[3], ael);
    W[4] = widen_u32_add(W[4], ah);
    W[5] = widen_u32_add(W[5], al);
    nz += _mm512_reduce_add_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), cz, one));
    nnf += _mm512_reduce_add_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), cf, one));
  }
  for (int k = 0; k < 9; ++k) _mm512_storeu_si512(acc.lanes[k], W[k]);
  int64_t nsub = 0;
  for (int64_t j = 0; any_sub && j < nv; ++j) {  // subnormals (exponent field 0, not zero)
    const uint32_t ab = u[j] & 0x7FFFu;
    if (ab == 0 || ab >= 0x80u) continue;
    acc.scalar.add(lf16(ab, 7, 127, l28), 1);
    ++nsub;
  }
  acc.scalar.n_fnz += nv - nz - nnf - nsub;  // the normal lanes
  acc.scalar.n_zero += nz;
  acc.scalar.n_nonfinite += nnf;
  for (; i < n; ++i) {  // the tail
    const uint32_t ab = u[i] & 0x7FFFu;
    if (ab >= 0x7F80u) ++acc.scalar.n_nonfinite;
    else if (ab == 0) ++acc.scalar.n_zero;
    else acc.scalar.add(lf16(ab, 7, 127, l28), 1);
  }
}
#endif  // x86-64 GCC
