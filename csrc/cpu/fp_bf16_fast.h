// FP encode of bfloat16 inputs: explicit AVX-512 / AVX2 lanes (gradwire_cpu.cpp includes this
// inside namespace gradwire::<anonymous>, after fp_lanes.h). The general lanes (fp_lanes.h) work
// on float32 bits and pay for every case in every lane; here the common case is cheap and the
// rare one runs only in 16-lane groups that contain it.
//
// A bf16 is the top half of a float32: 15 magnitude bits ab = ea << 7 | m7. In a *normal cell*
// of the target format (Ey = ea - 127 + scale_exp >= emin) fp_split reduces to
//   k = 7 - man_bits,  lo = (ab >> k) - C,  C = (127 - scale_exp + emin - 1) << man_bits
// (the exponent field and top mantissa bits, rebiased; a carry from rounding up walks into the
// exponent field as it should), rb = ab & (2**k - 1) the bits rounded away, and
//   nearest:    up = rb > 2**(k-1) or (rb == 2**(k-1) and lo odd)
//   stochastic: up = r24 < rb << (24 - k)        (fp_split's thresh = rem << (24 - shift))
//   code = sign | min(lo + up, max_mag)          (lo > max_mag exactly when Ey > emax: saturate).
// In a *sub-normal cell* (0 < ab < T, T = ea0 << 7, ea0 = emin + 127 - scale_exp) the cell is
// the subnormal grid (or, without subnormals, the gap between 0 and min_normal): with the 8-bit
// significand sig = 0x80 | m7 and s = sbase + ea0 - ea (sbase = k, or 7 without subnormals),
//   q = sig >> s, rem = sig - (q << s), lo = q, hi = q + 1 (or 1 << man_bits without subnormals)
//   nearest:    up = s <= 8 and (rem > 2**(s-1) or (rem == 2**(s-1) and lo odd))
//   stochastic: up = r24 < (s <= 8 ? rem << (24 - s) : ceil(rem * 2**16 / 2**min(s - 8, 25)))
//   code = mag ? sign | mag : 0,  mag = up ? hi : lo
// -- fp_split with shift = s + 16 (variable shifts give 0 for counts >= 32, as q and the
// thresholds need). Zeros -> 0 and Inf/NaN -> the non-finite code are selected last. float32
// subnormals (ea == 0, ab != 0) are counted, not encoded: the caller redoes them with fp_split,
// as for the general lanes. tests/kernels check every bf16 pattern against the reference.
#pragma once
// Included inside a namespace: <cstring>, <stdint.h> and (x86) <immintrin.h> come first in the
// translation unit (gradwire_cpu.cpp).

constexpr int kFastGroup = 16;  // lanes per loop step: one zmm, two ymm

struct Bf16FastParams {
  int32_t k, C, lowmask, half, tsh, max_mag, nonfinite, sshift, T;  // normal cells
  int32_t ea0, sbase, hi_add;                                       // sub-normal cells
};

inline Bf16FastParams bf16_fast_params(const FpParams& p) {
  Bf16FastParams f;
  f.k = 7 - p.man_bits;  // man_bits <= 6 (bits <= 8, exp_bits >= 1): k >= 1
  f.C = static_cast<int32_t>(static_cast<uint32_t>(127 - p.scale_exp + p.emin - 1) << p.man_bits);
  f.lowmask = (1 << f.k) - 1;
  f.half = 1 << (f.k - 1);
  f.tsh = 24 - f.k;
  f.max_mag = static_cast<int32_t>(p.max_mag);
  f.nonfinite = static_cast<int32_t>(p.nonfinite);
  f.sshift = p.bits - 1;
  f.ea0 = p.emin + 127 - p.scale_exp;  // |scale_exp| <= 1000: no overflow
  f.T = (f.ea0 < 1 ? 1 : (f.ea0 > 255 ? 255 : f.ea0)) << 7;
  f.sbase = p.subnormals ? f.k : 7;
  f.hi_add = p.subnormals ? 1 : (1 << p.man_bits);
  return f;
}

// |x|-pattern histogram of 8 16-bit floats into two banks (hist16 in gradwire_cpu.cpp loops it).
// Interleaved with the vector code of the same lanes, these scalar load-increment-stores run on
// the integer and load/store ports while the vector pipes compute codes: measured ~15 ms of 64M
// elements (one thread, Zen 4) cheaper than a separate histogram pass over the block.
inline void hist8_abs16(const uint16_t* u, uint32_t* h0, uint32_t* h1) {
  uint64_t v, w;
  std::memcpy(&v, u, 8);
  std::memcpy(&w, u + 4, 8);
  ++h0[v & 0x7FFF];
  ++h1[(v >> 16) & 0x7FFF];
  ++h0[(v >> 32) & 0x7FFF];
  ++h1[(v >> 48) & 0x7FFF];
  ++h0[w & 0x7FFF];
  ++h1[(w >> 16) & 0x7FFF];
  ++h0[(w >> 32) & 0x7FFF];
  ++h1[(w >> 48) & 0x7FFF];
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GW_HAVE_BF16_FAST 1
#define GW_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")))
#define GW_TARGET_AVX2 __attribute__((target("avx2")))

// Packed bytes of 8 byte-sized codes (LSB-first, `bits` each) at o: a whole 8-byte store while it
// fits before `limit` (the next group overwrites the spill), else exactly `bits` bytes.
GW_TARGET_AVX512 inline void pack8_bmi2(uint64_t codes8, uint64_t sel, int bits, uint8_t* o,
                                        const uint8_t* limit) {
  const uint64_t w = _pext_u64(codes8, sel);
  if (o + 8 <= limit) std::memcpy(o, &w, 8);
  else std::memcpy(o, &w, static_cast<size_t>(bits));
}

// rng.h's mix32 on 16 / 8 lanes.
GW_TARGET_AVX512 inline __m512i mix32_x16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x21F0AAAD));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x735A2D97));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}
GW_TARGET_AVX2 inline __m256i mix32_x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x21F0AAAD));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x735A2D97));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}

// Codes (one byte each) of u[0, 16 * ngroups) into codes[], their packed bytes into
// packed[0, 2 * bits * ngroups) (`limit`: the end of the bytes the calling range owns), and the
// |x| histogram of the lanes into hist (two banks of 2**15 bins; kHist false: no histogram, hist
// unused). The counter of lane j is
// hi * 2**32 + lo0 + j (the caller guarantees no carry into hi). Returns the number of
// float32-subnormal lanes: the caller redoes their codes (and then the packing).
template <bool kStochastic, bool kHist>
GW_TARGET_AVX512 int bf16_codes_avx512(const uint16_t* u, int ngroups, const Bf16FastParams& f,
                                       uint32_t lo0, uint32_t hi, uint32_t key1, uint32_t key2,
                                       uint8_t* codes, uint32_t* hist, int bits, uint8_t* packed,
                                       const uint8_t* limit) {
  const uint64_t sel = 0x0101010101010101ull * ((1u << bits) - 1u);
  const __m128i k = _mm_cvtsi32_si128(f.k);
  const __m128i tsh = _mm_cvtsi32_si128(f.tsh);
  const __m128i ssh = _mm_cvtsi32_si128(f.sshift);
  const __m512i vC = _mm512_set1_epi32(f.C), lowmask = _mm512_set1_epi32(f.lowmask);
  const __m512i half = _mm512_set1_epi32(f.half), maxmag = _mm512_set1_epi32(f.max_mag);
  const __m512i nonfin = _mm512_set1_epi32(f.nonfinite);
  const __m512i absmask = _mm512_set1_epi32(0x7FFF), infbits = _mm512_set1_epi32(0x7F80);
  const __m512i one = _mm512_set1_epi32(1), tm1 = _mm512_set1_epi32(f.T - 1);
  const __m512i ea0s = _mm512_set1_epi32(f.ea0 + f.sbase), hiadd = _mm512_set1_epi32(f.hi_add);
  const __m512i m7 = _mm512_set1_epi32(0x7F), lead = _mm512_set1_epi32(0x80);
  const __m512i eight = _mm512_set1_epi32(8), c24 = _mm512_set1_epi32(24), c25 = _mm512_set1_epi32(25);
  const __m512i k1 = _mm512_set1_epi32(static_cast<int>(key1));
  const __m512i k2h = _mm512_set1_epi32(static_cast<int>(key2 + hi));
  __m512i ctr = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo0)),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  int nsub = 0;
  for (int g = 0; g < ngroups; ++g) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 16 * g)));
    const __m512i ab = _mm512_and_si512(h, absmask);
    const __m512i lo = _mm512_sub_epi32(_mm512_srl_epi32(ab, k), vC);
    const __m512i rb = _mm512_and_si512(ab, lowmask);
    __m512i r24;
    __mmask16 up;
    if (kStochastic) {
      r24 = _mm512_srli_epi32(mix32_x16(_mm512_add_epi32(mix32_x16(_mm512_xor_si512(ctr, k1)), k2h)), 8);
      ctr = _mm512_add_epi32(ctr, _mm512_set1_epi32(16));
      up = _mm512_cmplt_epu32_mask(r24, _mm512_sll_epi32(rb, tsh));
    } else {
      up = _mm512_cmpgt_epu32_mask(rb, half) |
           (_mm512_cmpeq_epu32_mask(rb, half) & _mm512_test_epi32_mask(lo, one));
    }
    const __m512i sbit = _mm512_sll_epi32(_mm512_srli_epi32(h, 15), ssh);
    __m512i code = _mm512_or_si512(_mm512_min_epu32(_mm512_mask_add_epi32(lo, up, lo, one), maxmag), sbit);
    const __mmask16 sub = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(ab, one), tm1);
    if (sub) {  // a sub-normal cell in this group (rare for a well-scaled tensor)
      const __m512i s = _mm512_sub_epi32(ea0s, _mm512_srli_epi32(ab, 7));
      const __m512i sig = _mm512_or_si512(_mm512_and_si512(ab, m7), lead);
      const __m512i q = _mm512_srlv_epi32(sig, s);
      const __m512i rem = _mm512_sub_epi32(sig, _mm512_sllv_epi32(q, s));
      const __mmask16 narrow = _mm512_cmple_epi32_mask(s, eight);  // shift = s + 16 <= 24
      __mmask16 ups;
      if (kStochastic) {
        const __m512i d = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(s, eight), _mm512_setzero_si512()), c25);
        const __m512i wide = _mm512_srlv_epi32(
            _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(rem, 16), _mm512_sllv_epi32(one, d)), one), d);
        const __m512i thresh = _mm512_mask_mov_epi32(wide, narrow, _mm512_sllv_epi32(rem, _mm512_sub_epi32(c24, s)));
        ups = _mm512_cmplt_epu32_mask(r24, thresh);
      } else {
        const __m512i hs = _mm512_sllv_epi32(one, _mm512_sub_epi32(s, one));
        ups = narrow & (_mm512_cmpgt_epu32_mask(rem, hs) |
                        (_mm512_cmpeq_epu32_mask(rem, hs) & _mm512_test_epi32_mask(q, one)));
      }
      const __m512i mag = _mm512_mask_add_epi32(q, ups, q, hiadd);  // hi = q + hi_add (q = 0 w/o subnormals)
      const __mmask16 nz = _mm512_test_epi32_mask(mag, mag);
      code = _mm512_mask_mov_epi32(code, sub, _mm512_maskz_or_epi32(nz, mag, sbit));
      nsub += __builtin_popcount(_mm512_cmplt_epu32_mask(_mm512_sub_epi32(ab, one), m7) & sub);
    }
    code = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(ab, ab), code);
    code = _mm512_mask_mov_epi32(code, _mm512_cmpge_epu32_mask(ab, infbits), nonfin);
    const __m128i b = _mm512_cvtepi32_epi8(code);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16 * g), b);
    pack8_bmi2(static_cast<uint64_t>(_mm_cvtsi128_si64(b)), sel, bits, packed + 2 * bits * g, limit);
    pack8_bmi2(static_cast<uint64_t>(_mm_extract_epi64(b, 1)), sel, bits, packed + 2 * bits * g + bits, limit);
    if (kHist) {
      hist8_abs16(u + 16 * g, hist, hist + (1 << 15));
      hist8_abs16(u + 16 * g + 8, hist, hist + (1 << 15));
    }
  }
  return nsub;
}

// bf16_codes_avx512 in 8-lane halves, without the packing (the caller packs: pack_codes). AVX2
// compares are signed: every compared value here is
// below 2**24 (or ab - 1 >= -1), so they are exact; lo - up with up = -1 adds one.
template <bool kStochastic, bool kHist>
GW_TARGET_AVX2 int bf16_codes_avx2(const uint16_t* u, int ngroups, const Bf16FastParams& f,
                                   uint32_t lo0, uint32_t hi, uint32_t key1, uint32_t key2,
                                   uint8_t* codes, uint32_t* hist) {
  const __m128i k = _mm_cvtsi32_si128(f.k);
  const __m128i tsh = _mm_cvtsi32_si128(f.tsh);
  const __m128i ssh = _mm_cvtsi32_si128(f.sshift);
  const __m256i vC = _mm256_set1_epi32(f.C), lowmask = _mm256_set1_epi32(f.lowmask);
  const __m256i half = _mm256_set1_epi32(f.half), maxmag = _mm256_set1_epi32(f.max_mag);
  const __m256i nonfin = _mm256_set1_epi32(f.nonfinite);
  const __m256i absmask = _mm256_set1_epi32(0x7FFF), infm1 = _mm256_set1_epi32(0x7F7F);
  const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const __m256i tT = _mm256_set1_epi32(f.T);
  const __m256i ea0s = _mm256_set1_epi32(f.ea0 + f.sbase), hiadd = _mm256_set1_epi32(f.hi_add);
  const __m256i m7 = _mm256_set1_epi32(0x7F), lead = _mm256_set1_epi32(0x80);
  const __m256i nine = _mm256_set1_epi32(9), eight = _mm256_set1_epi32(8);
  const __m256i c24 = _mm256_set1_epi32(24), c25 = _mm256_set1_epi32(25);
  const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key1));
  const __m256i k2h = _mm256_set1_epi32(static_cast<int>(key2 + hi));
  // byte 0 of each 32-bit lane to the low 4 bytes of each 128-bit half
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  __m256i ctr = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  int nsub = 0;
  for (int g = 0; g < 2 * ngroups; ++g) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 8 * g)));
    const __m256i ab = _mm256_and_si256(h, absmask);
    const __m256i lo = _mm256_sub_epi32(_mm256_srl_epi32(ab, k), vC);
    const __m256i rb = _mm256_and_si256(ab, lowmask);
    __m256i r24, up;  // up: all-ones lanes round up
    if (kStochastic) {
      r24 = _mm256_srli_epi32(mix32_x8(_mm256_add_epi32(mix32_x8(_mm256_xor_si256(ctr, k1)), k2h)), 8);
      ctr = _mm256_add_epi32(ctr, eight);
      up = _mm256_cmpgt_epi32(_mm256_sll_epi32(rb, tsh), r24);
    } else {
      const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(lo, one), one);
      up = _mm256_or_si256(_mm256_cmpgt_epi32(rb, half), _mm256_and_si256(_mm256_cmpeq_epi32(rb, half), odd));
    }
    const __m256i sbit = _mm256_sll_epi32(_mm256_srli_epi32(h, 15), ssh);
    __m256i code = _mm256_or_si256(_mm256_min_epu32(_mm256_sub_epi32(lo, up), maxmag), sbit);
    const __m256i nonzero = _mm256_cmpgt_epi32(ab, zero);
    const __m256i sub = _mm256_and_si256(nonzero, _mm256_cmpgt_epi32(tT, ab));
    if (!_mm256_testz_si256(sub, sub)) {  // a sub-normal cell in these 8 lanes
      const __m256i s = _mm256_sub_epi32(ea0s, _mm256_srli_epi32(ab, 7));
      const __m256i sig = _mm256_or_si256(_mm256_and_si256(ab, m7), lead);
      const __m256i q = _mm256_srlv_epi32(sig, s);
      const __m256i rem = _mm256_sub_epi32(sig, _mm256_sllv_epi32(q, s));
      const __m256i narrow = _mm256_cmpgt_epi32(nine, s);  // s <= 8
      __m256i ups;
      if (kStochastic) {
        const __m256i d = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(s, eight), zero), c25);
        const __m256i wide = _mm256_srlv_epi32(
            _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32(rem, 16), _mm256_sllv_epi32(one, d)), one), d);
        const __m256i thresh = _mm256_blendv_epi8(wide, _mm256_sllv_epi32(rem, _mm256_sub_epi32(c24, s)), narrow);
        ups = _mm256_cmpgt_epi32(thresh, r24);
      } else {
        const __m256i hs = _mm256_sllv_epi32(one, _mm256_sub_epi32(s, one));
        const __m256i qodd = _mm256_cmpeq_epi32(_mm256_and_si256(q, one), one);
        ups = _mm256_and_si256(narrow, _mm256_or_si256(_mm256_cmpgt_epi32(rem, hs),
                                                       _mm256_and_si256(_mm256_cmpeq_epi32(rem, hs), qodd)));
      }
      const __m256i mag = _mm256_add_epi32(q, _mm256_and_si256(ups, hiadd));
      const __m256i codes_s = _mm256_andnot_si256(_mm256_cmpeq_epi32(mag, zero), _mm256_or_si256(mag, sbit));
      code = _mm256_blendv_epi8(code, codes_s, sub);
      const __m256i f32sub = _mm256_and_si256(nonzero, _mm256_cmpgt_epi32(lead, ab));
      nsub += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(f32sub)));
    }
    code = _mm256_and_si256(code, nonzero);
    code = _mm256_blendv_epi8(code, nonfin, _mm256_cmpgt_epi32(ab, infm1));
    const __m256i b = _mm256_shuffle_epi8(code, pick);
    const uint64_t eight_codes = static_cast<uint32_t>(_mm256_cvtsi256_si32(b)) |
                                 (static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(b, 4))) << 32);
    std::memcpy(codes + 8 * g, &eight_codes, 8);
    if (kHist) hist8_abs16(u + 8 * g, hist, hist + (1 << 15));
  }
  return nsub;
}
#endif  // x86-64 GCC
