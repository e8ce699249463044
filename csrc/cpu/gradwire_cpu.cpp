// CPU kernels for the gradwire::* ops (schemas are defined in gradwire/ops.py). One translation
// unit on purpose: the torch headers dominate compile time, so the JIT build stays ~1 minute.
//
// Threading: the input is cut into fixed chunks of kChunk elements (a multiple of 8, so every
// chunk starts on a byte boundary of the packed stream and owns its output bytes). Chunks are
// independent of the thread count, and per-chunk partial statistics are merged in chunk order,
// so results are identical for any number of threads. No -ffast-math: bit-exactness with the
// reference relies on IEEE float32 multiplication and integer rounding only.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // fp_bf16_fast.h
#endif

#include "../common/fp_codec.h"
#include "../common/nm.h"

namespace gradwire {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;

// Loops written to auto-vectorise get an AVX-512 and an AVX2 copy besides the baseline one,
// picked at load time (no -march flag: the binary stays portable). Same results in every copy:
// integer math, and float32 operations without contraction (-ffp-contract=off in _build.py).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GW_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GW_SIMD_CLONES
#endif

// Store the `nb` packed bytes of one group of 8 codes. While 8 bytes fit before `limit` (the
// end of the bytes this thread's range owns), store the whole word (one constant-size store
// instead of a memcpy call): the spilled bytes belong to later groups of the same range, which
// this thread overwrites next.
inline void store_group(uint8_t* o, uint64_t w, int nb, const uint8_t* limit) {
  if (o + 8 <= limit) std::memcpy(o, &w, 8);
  else std::memcpy(o, &w, static_cast<size_t>(nb));
}

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

// log2|a| for finite nonzero a (a >= 0 as float bits), for the statistics. A 1024-entry table of
// log2 of the top 10 mantissa bits plus a 3-term series for the rest (|error| < 2**-40); exact
// table hits for bf16 and fp16 inputs, whose mantissas fit in 10 bits.
struct Log2Table {
  double t[1024];
  Log2Table() {
    for (int i = 0; i < 1024; ++i) t[i] = std::log2(1.0 + i / 1024.0);
  }
};
const Log2Table& log2_table() {
  static const Log2Table tab;
  return tab;
}

inline double log2_abs(uint32_t ab, const double* tab) {
  const int ea = static_cast<int>(ab >> 23);
  if (ea == 0) return std::log2(static_cast<double>(f32_from_bits(ab)));  // float32 subnormal
  const uint32_t idx = (ab >> 13) & 1023u;
  const uint32_t low = ab & 0x1FFFu;
  double l = (ea - 127) + tab[idx];
  if (low) {
    // log2(1 + t), t = low * 2**-23 / m0 < 2**-10: series t - t^2/2 + t^3/3 (Taylor).
    const double t = low * 0x1p-23 / (1.0 + idx / 1024.0);
    l += t * (1.0 - t * (0.5 - t / 3.0)) * 1.4426950408889634;
  }
  return l;
}

struct LocalStats {
  int64_t n_fnz = 0, n_zero = 0, n_nonfinite = 0;
  double s1 = 0.0, s2 = 0.0;
  inline void add(float v, const double* tab) {
    const uint32_t ab = f32_bits(v) & 0x7FFFFFFFu;
    if (ab >= 0x7F800000u) {
      ++n_nonfinite;
    } else if (ab == 0) {
      ++n_zero;
    } else {
      const double l = log2_abs(ab, tab);
      ++n_fnz;
      s1 += l;
      s2 += l * l;
    }
  }
};

at::Tensor merge_stats(const std::vector<LocalStats>& parts) {
  // Fixed (chunk) order: float64 sums are reproducible across runs and thread counts.
  LocalStats tot;
  for (const auto& p : parts) {
    tot.n_fnz += p.n_fnz;
    tot.n_zero += p.n_zero;
    tot.n_nonfinite += p.n_nonfinite;
    tot.s1 += p.s1;
    tot.s2 += p.s2;
  }
  at::Tensor out = at::empty({5}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = static_cast<double>(tot.n_fnz);
  o[1] = tot.s1;
  o[2] = tot.s2;
  o[3] = static_cast<double>(tot.n_zero);
  o[4] = static_cast<double>(tot.n_nonfinite);
  return out;
}

void check_float_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": expected float32, bfloat16 or float16, got ", t);
}

inline int64_t packed_bytes(int64_t n, int64_t bits) { return (n * bits + 7) / 8; }

// Same limits as numerics.fp.FPFormat: every format value is exact in float32.
FpParams make_params(int64_t exp_bits, int64_t man_bits, int64_t bias, bool subnormals,
                     int64_t scale_exp, bool stochastic) {
  TORCH_CHECK(exp_bits >= 1 && exp_bits <= 7 && man_bits >= 0 && 1 + exp_bits + man_bits <= 8,
              "fp format: need 1 <= exp_bits <= 7, man_bits >= 0, 1 + exp_bits + man_bits <= 8");
  const int64_t emax = ((int64_t(1) << exp_bits) - 1) - bias;
  TORCH_CHECK(emax <= 127 && (1 - bias) - man_bits >= -149, "fp format: bias ", bias,
              " puts the format outside the float32 range");
  FpParams p;
  p.man_bits = static_cast<int>(man_bits);
  p.emin = static_cast<int>(1 - bias);
  p.emax = static_cast<int>(emax);
  p.bits = static_cast<int>(1 + exp_bits + man_bits);
  p.subnormals = subnormals ? 1 : 0;
  // Like the oracle: beyond +-1000 every element saturates or rounds to zero anyway.
  p.scale_exp = static_cast<int>(std::max<int64_t>(-1000, std::min<int64_t>(1000, scale_exp)));
  p.stochastic = stochastic ? 1 : 0;
  p.max_mag = (1u << (p.bits - 1)) - 1u;
  p.nonfinite = 1u << (p.bits - 1);
  return p;
}

// r24 = random_u32(seed, first + j) >> 8 for j < count. Baseline x86-64 (SSE2) has no 32-bit
// vector multiply, so the hash would run scalar; target_clones compiles an AVX2 copy too and
// picks it at load time (no -march flag, the binary stays portable). Same integer results.
GW_SIMD_CLONES void hash_r24_block(RngKeys keys, uint64_t first, int count, uint32_t* out) {
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const uint32_t hi = static_cast<uint32_t>(first >> 32);
  if (static_cast<uint64_t>(lo0) + static_cast<uint64_t>(count) <= 0x100000000ull) {
    // The counter's high word is constant over the block: pure 32-bit lanes, which vectorise
    // (random_u32 below, with index = hi * 2**32 + lo0 + j, spelled out).
    for (int j = 0; j < count; ++j) {
      const uint32_t h = mix32((lo0 + static_cast<uint32_t>(j)) ^ keys.key1);
      out[j] = mix32(h + hi + keys.key2) >> 8;
    }
  } else {
    for (int j = 0; j < count; ++j)
      out[j] = random_u32(keys, first + static_cast<uint64_t>(j)) >> 8;
  }
}

// ---- FP encode: vectorised codes, packing, statistics --------------------------------------
// Per block of kEncBlock elements: widen to float32 bits, hash the block's counters (stochastic
// rounding), compute the codes in vector lanes (fp_lanes.h), pack them LSB-first; bf16 inputs
// do all of it, histogram included, in one loop (fp_bf16_fast.h, encode_bf16_block).
// 16-bit inputs take their statistics from a histogram of |x| patterns (2**15 integer bins),
// turned into exact integer sums of log2|x| in fixed point (log2_stats16.h) -- the same bits as
// moment_stats computes by either of its methods.
#include "fp_lanes.h"       // fp_codes_lanes: every input, every case, in 32-bit lanes
#include "fp_bf16_fast.h"  // bf16 inputs: explicit AVX-512 / AVX2 lanes, rare cases per group
#include "log2_stats16.h"  // 16-bit statistics: exact fixed-point sums, histogram or vector lanes

constexpr int kEncBlock = 1024;  // a multiple of 8: every block starts on a packed byte boundary
constexpr int kAbsBins = 1 << 15;

inline void widen_bits(const float* x, int cnt, uint32_t* xb) { std::memcpy(xb, x, 4 * cnt); }
inline void widen_bits(const c10::BFloat16* x, int cnt, uint32_t* xb) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);  // a bf16 is the top half of a float32
  for (int j = 0; j < cnt; ++j) xb[j] = static_cast<uint32_t>(u[j]) << 16;
}
inline void widen_bits(const c10::Half* x, int cnt, uint32_t* xb) {
  for (int j = 0; j < cnt; ++j) xb[j] = f32_bits(static_cast<float>(x[j]));
}

// Pack cnt codes (codes[cnt..] may be read: the buffer holds 8 spare zero bytes) LSB-first to o;
// `limit` is the end of the bytes the calling range owns (store_group). Eight byte-sized codes
// become one word: with BMI2 a single pext gathers the low `bits` of each byte.
__attribute__((always_inline)) inline void pack_codes_impl(const uint8_t* codes, int cnt, int bits,
                                                           uint8_t* o, const uint8_t* limit,
                                                           bool use_pext) {
  const uint64_t sel = 0x0101010101010101ull * ((1u << bits) - 1u);
  for (int g = 0; g < cnt; g += 8) {
    uint64_t v;
    std::memcpy(&v, codes + g, 8);
    uint64_t w = 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (use_pext) {
      w = __builtin_ia32_pext_di(v, sel);
    } else
#endif
    {
      (void)sel;
      for (int j = 0; j < 8; ++j) w |= ((v >> (8 * j)) & 0xFFu) << (j * bits);
    }
    const int c = std::min(8, cnt - g);
    const int nb = c == 8 ? bits : (c * bits + 7) / 8;
    store_group(o, w, nb, limit);
    o += nb;
  }
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("bmi2"))) void pack_codes_bmi2(const uint8_t* codes, int cnt, int bits,
                                                     uint8_t* o, const uint8_t* limit) {
  pack_codes_impl(codes, cnt, bits, o, limit, true);
}
#endif
inline void pack_codes(const uint8_t* codes, int cnt, int bits, uint8_t* o, const uint8_t* limit) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // Zen 1 and Zen 2 (EPYC Naples/Rome) have BMI2 but run pext as microcode taking hundreds of
  // cycles for a mask like ours: the shift-and-or loop is far faster there. GRADWIRE_CPU_SIMD=none
  // (simd_level() == 0) takes that loop too, so the tests cover it on any machine.
  static const bool fast_pext = __builtin_cpu_supports("bmi2") && !__builtin_cpu_is("znver1") &&
                                !__builtin_cpu_is("znver2") && simd_level() > 0;
  if (fast_pext) return pack_codes_bmi2(codes, cnt, bits, o, limit);
#endif
  pack_codes_impl(codes, cnt, bits, o, limit, false);
}

// Encode elements [begin, end) of x (begin a multiple of 8) into out; `limit` as in pack_codes.
template <typename T>
void encode_range(const T* x, int64_t begin, int64_t end, const FpParams& p, RngKeys keys,
                  uint64_t offset, uint8_t* out, const uint8_t* limit) {
  uint32_t xb[kEncBlock], r[kEncBlock];
  uint8_t codes[kEncBlock + 8];
  for (int64_t g = begin; g < end; g += kEncBlock) {
    const int cnt = static_cast<int>(std::min<int64_t>(kEncBlock, end - g));
    widen_bits(x + g, cnt, xb);
    if (p.stochastic) hash_r24_block(keys, offset + static_cast<uint64_t>(g), cnt, r);
    const int nsub = p.stochastic ? fp_codes_lanes<true>(xb, r, cnt, p, codes)
                                  : fp_codes_lanes<false>(xb, r, cnt, p, codes);
    for (int j = 0; nsub && j < cnt; ++j) {  // float32 subnormals: the scalar fp_split
      if ((xb[j] & 0x7F800000u) || !(xb[j] & 0x7FFFFFFFu)) continue;
      const FpSplit sp = fp_split(f32_from_bits(xb[j]), p);
      codes[j] = static_cast<uint8_t>(p.stochastic && r[j] < sp.thresh ? sp.hi : sp.lo);
    }
    std::memset(codes + cnt, 0, 8);
    pack_codes(codes, cnt, p.bits, out + g / 8 * p.bits, limit);
  }
}

// parts empty: no statistics (fp_encode with with_stats=false).
void fp_encode_f32(const float* x, uint8_t* out, int64_t n, const FpParams& p, RngKeys keys,
                   uint64_t offset, std::vector<LocalStats>& parts) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const double* tab = log2_table().t;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      encode_range(x, begin, end, p, keys, offset, out, out + end / 8 * p.bits);
      if (parts.empty()) continue;
      LocalStats st;
      for (int64_t i = begin; i < end; ++i) st.add(x[i], tab);
      parts[c] = st;
    }
  });
}

template <typename T>
inline uint16_t raw16(T v) {
  uint16_t r;
  std::memcpy(&r, &v, 2);
  return r;
}

template <typename T>
inline float value16(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

// Runs body(begin, end, hist) over chunk ranges in parallel, each with a private uint32
// histogram flushed into the shared int64 one (integer sums: any merge order is exact).
template <typename F>
std::vector<int64_t> parallel_hist(int64_t n, const F& body) {
  std::vector<int64_t> total(kAbsBins, 0);
  std::mutex mu;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    // Two banks (even / odd elements): runs of equal values (common in gradients) would
    // otherwise serialise on one counter's load-increment-store.
    std::vector<uint32_t> h(2 * kAbsBins, 0);
    constexpr int64_t kFlush = 16384;  // chunks per flush: < 2**32 counts per bin
    for (int64_t a = c0; a < c1; a += kFlush) {
      const int64_t b = std::min(c1, a + kFlush);
      body(a * kChunk, std::min(n, b * kChunk), h.data());
      std::lock_guard<std::mutex> lock(mu);
      for (int i = 0; i < kAbsBins; ++i) {
        total[i] += static_cast<int64_t>(h[i]) + h[i + kAbsBins];
        h[i] = h[i + kAbsBins] = 0;
      }
    }
  });
  return total;
}

// Histogram of |x| patterns of u[begin, end) into two banks of h. Eight elements per step from
// two 64-bit loads: measured ~2x faster than indexing element by element with (i & 1) banks.
inline void hist16(const uint16_t* u, int64_t begin, int64_t end, uint32_t* h) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) hist8_abs16(u + i, h, h + kAbsBins);
  for (; i < end; ++i) ++h[u[i] & 0x7FFF];
}

// Large fp16 inputs: a 16-bit input has only 2**16 bit patterns, so the encode decision is
// tabulated once per call (lo/hi codes and the stochastic threshold per pattern, from fp_split),
// leaving a table load, a compare and a select per element. bf16 inputs do not use it: their
// explicit lanes (fp_bf16_fast.h) decide from the raw bits; fp16 would need a conversion per
// element there. Below kTableMinNumel the lanes are cheaper than building 64K entries.
constexpr int64_t kTableMinNumel = int64_t(1) << 18;

// One 64-bit entry per 16-bit input pattern: thresh | lo << 32 | hi << 40.
template <typename T>
std::vector<uint64_t> build_table(const FpParams& p) {
  std::vector<uint64_t> t(65536);
  at::parallel_for(0, 65536, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const FpSplit s = fp_split(value16<T>(static_cast<uint16_t>(b)), p);
      t[b] = static_cast<uint64_t>(s.thresh) | (static_cast<uint64_t>(s.lo & 0xFFu) << 32) |
             (static_cast<uint64_t>(s.hi & 0xFFu) << 40);
    }
  });
  return t;
}

// codes[j] from the table entry of pattern u[j]: lo, or hi when r24 < thresh (branch-free: r24
// is random, so a branch would mispredict half the time). Written as a plain loop so the AVX2 /
// AVX-512 copies vectorise it with gathers.
template <bool kStochastic>
GW_SIMD_CLONES void table_codes(const uint16_t* u, const uint32_t* r, int cnt, const uint64_t* tab,
                                uint8_t* codes) {
  for (int j = 0; j < cnt; ++j) {
    const uint64_t e = tab[u[j]];
    if (kStochastic) {
      const uint64_t up = static_cast<uint64_t>(r[j] < static_cast<uint32_t>(e));
      codes[j] = static_cast<uint8_t>(e >> (32 + 8 * up));
    } else {
      codes[j] = static_cast<uint8_t>(e >> 32);
    }
  }
}

template <typename T, bool kStochastic, bool kHist>
void encode16_table_range(const uint16_t* u, int64_t begin, int64_t end, const uint64_t* tab,
                          const FpParams& p, RngKeys keys, uint64_t offset, uint8_t* out,
                          const uint8_t* limit, uint32_t* h) {
  uint32_t r[kEncBlock];
  uint8_t codes[kEncBlock + 8];
  for (int64_t g = begin; g < end; g += kEncBlock) {
    const int cnt = static_cast<int>(std::min<int64_t>(kEncBlock, end - g));
    if (kStochastic) hash_r24_block(keys, offset + static_cast<uint64_t>(g), cnt, r);
    if (kHist) hist16(u, g, g + cnt, h);
    table_codes<kStochastic>(u + g, r, cnt, tab, codes);
    std::memset(codes + cnt, 0, 8);
    pack_codes(codes, cnt, p.bits, out + g / 8 * p.bits, limit);
  }
}

GW_SIMD_CLONES void narrow_codes(const uint32_t* c32, int cnt, uint8_t* codes) {
  for (int j = 0; j < cnt; ++j) codes[j] = static_cast<uint8_t>(c32[j]);
}

// One bf16 block u[0, cnt) (cnt <= kEncBlock), counters first + j: codes, the |x| histogram into
// h (kHist), packed bytes to o (`limit` as in pack_codes). Whole 16-lane groups take the explicit lanes of
// fp_bf16_fast.h (which also histogram them and, with AVX-512, pack them); the rest, and blocks
// whose counters cross a 2**32 boundary, take the general lanes.
template <bool kStochastic, bool kHist>
void encode_bf16_block(const uint16_t* u, int cnt, const FpParams& p, const Bf16FastParams& fast,
                       RngKeys keys, uint64_t first, uint8_t* codes, uint32_t* h, uint8_t* o,
                       const uint8_t* limit) {
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const uint32_t hi = static_cast<uint32_t>(first >> 32);
  int done = 0;    // codes (and histogram) done by the explicit lanes
  int packed = 0;  // of which also packed
  int nsub = 0;
  if (!kStochastic || static_cast<uint64_t>(lo0) + static_cast<uint64_t>(cnt) <= 0x100000000ull) {
#ifdef GW_HAVE_BF16_FAST
    const int level = simd_level();
    const int ngroups = cnt / kFastGroup;
    if (level == 2) {
      nsub = bf16_codes_avx512<kStochastic, kHist>(u, ngroups, fast, lo0, hi, keys.key1, keys.key2, codes,
                                            h, p.bits, o, limit);
      done = packed = ngroups * kFastGroup;
    } else if (level == 1) {
      nsub = bf16_codes_avx2<kStochastic, kHist>(u, ngroups, fast, lo0, hi, keys.key1, keys.key2, codes, h);
      done = ngroups * kFastGroup;
    }
#else
    (void)fast;
#endif
    if (done < cnt) {
      uint32_t c32[kEncBlock];
      const Bf16HashSrc src{u + done, lo0 + static_cast<uint32_t>(done), hi, keys.key1, keys.key2};
      nsub += fp_codes_lanes_src<kStochastic>(src, cnt - done, p, c32);
      narrow_codes(c32, cnt - done, codes + done);
    }
  } else {  // the counter's high word changes inside this block (once per 2**32 elements)
    uint32_t xb[kEncBlock], r[kEncBlock];
    widen_bits(reinterpret_cast<const c10::BFloat16*>(u), cnt, xb);
    hash_r24_block(keys, first, cnt, r);
    nsub = fp_codes_lanes<kStochastic>(xb, r, cnt, p, codes);
  }
  if (kHist) hist16(u, done, cnt, h);
  if (nsub) {  // float32 subnormals: the scalar fp_split, then pack the whole block again
    for (int j = 0; j < cnt; ++j) {
      const uint32_t xj = static_cast<uint32_t>(u[j]) << 16;
      if ((xj & 0x7F800000u) || !(xj & 0x7FFFFFFFu)) continue;
      const FpSplit sp = fp_split(f32_from_bits(xj), p);
      codes[j] = static_cast<uint8_t>(kStochastic && (random_u32(keys, first + j) >> 8) < sp.thresh
                                          ? sp.hi : sp.lo);
    }
    packed = 0;
  }
  std::memset(codes + cnt, 0, 8);
  pack_codes(codes + packed, cnt - packed, p.bits, o + packed / 8 * p.bits, limit);
}

// bf16 elements [begin, end) (begin a multiple of 8), block by block.
template <bool kStochastic, bool kHist>
void encode_bf16_range(const uint16_t* u, int64_t begin, int64_t end, const FpParams& p,
                       RngKeys keys, uint64_t offset, uint8_t* out, const uint8_t* limit,
                       uint32_t* h) {
  uint8_t codes[kEncBlock + 8];
  const Bf16FastParams fast = bf16_fast_params(p);
  for (int64_t g = begin; g < end; g += kEncBlock) {
    const int cnt = static_cast<int>(std::min<int64_t>(kEncBlock, end - g));
    encode_bf16_block<kStochastic, kHist>(u + g, cnt, p, fast, keys, offset + static_cast<uint64_t>(g),
                                   codes, h, out + g / 8 * p.bits, limit);
  }
}

// Elements [begin, end) of a 16-bit input: codes, packed bytes and (kHist) the |x| histogram h.
template <typename T, bool kHist>
void encode16_range(const T* x, int64_t begin, int64_t end, const uint64_t* tab, const FpParams& p,
                    RngKeys keys, uint64_t offset, uint8_t* out, uint32_t* h) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
  uint8_t* limit = out + end / 8 * p.bits;
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (p.stochastic)
      encode_bf16_range<true, kHist>(u, begin, end, p, keys, offset, out, limit, h);
    else
      encode_bf16_range<false, kHist>(u, begin, end, p, keys, offset, out, limit, h);
    return;
  }
  if (tab) {
    if (p.stochastic)
      encode16_table_range<T, true, kHist>(u, begin, end, tab, p, keys, offset, out, limit, h);
    else
      encode16_table_range<T, false, kHist>(u, begin, end, tab, p, keys, offset, out, limit, h);
    return;
  }
  encode_range(x, begin, end, p, keys, offset, out, limit);
  if (kHist) hist16(u, begin, end, h);
}

// Encodes a 16-bit input; returns its statistics (an undefined tensor when !with_stats).
template <typename T>
at::Tensor fp_encode16(const T* x, uint8_t* out, int64_t n, const FpParams& p, RngKeys keys,
                       uint64_t offset, bool with_stats) {
  constexpr bool kBf16 = std::is_same<T, c10::BFloat16>::value;
  // bf16 takes its explicit lanes at every size; fp16 widens through a conversion, so large fp16
  // inputs keep the per-pattern table.
  std::vector<uint64_t> table;
  if (!kBf16 && n >= kTableMinNumel) table = build_table<T>(p);
  const uint64_t* tab = table.data();
  if (!with_stats) {
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      encode16_range<T, false>(x, c0 * kChunk, std::min(n, c1 * kChunk), tab, p, keys, offset,
                               out, nullptr);
    });
    return at::Tensor();
  }
#ifdef GW_HAVE_STATS_VNNI
  // bf16 on AVX-512 VNNI: encode a chunk, then its statistics by the vector lanes while the chunk
  // is still in L2: 55-57 ms against 59 ms for the histogram interleaved with the code lanes
  // (64M, one thread; 4096-element sub-chunks in L1 measured no faster).
  if (std::is_same<T, c10::BFloat16>::value && stats_vnni_available()) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
    std::vector<ExactLogSums> parts((n + kChunk - 1) / kChunk);
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      Bf16VecSums acc;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
        encode16_range<T, false>(x, begin, end, tab, p, keys, offset, out, nullptr);
        bf16_stats_avx512(u + begin, end - begin, acc);
      }
      parts[c0] = acc.finish();
    });
    ExactLogSums tot;
    for (const auto& s : parts) tot.merge(s);
    return tot.to_tensor();
  }
#endif
  const std::vector<int64_t> hist = parallel_hist(n, [&](int64_t begin, int64_t end, uint32_t* h) {
    encode16_range<T, true>(x, begin, end, tab, p, keys, offset, out, h);
  });
  return sums_from_hist<T>(hist.data()).to_tensor();
}

// moment_stats of a 16-bit input: vector lanes for bf16 on AVX-512 VNNI, else the histogram.
// Both give the same exact sums (log2_stats16.h).
template <typename T>
at::Tensor stats16(const T* x, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
#ifdef GW_HAVE_STATS_VNNI
  if (std::is_same<T, c10::BFloat16>::value && stats_vnni_available()) {
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
    std::vector<ExactLogSums> parts(nchunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      Bf16VecSums acc;  // an int64 lane grows < 2**33 per 256 elements: no overflow below 2**38
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk;
        bf16_stats_avx512(u + begin, std::min(n, begin + kChunk) - begin, acc);
      }
      parts[c0] = acc.finish();
    });
    ExactLogSums tot;
    for (const auto& s : parts) tot.merge(s);  // integers: any order, any thread count
    return tot.to_tensor();
  }
#endif
  const std::vector<int64_t> hist = parallel_hist(
      n, [&](int64_t begin, int64_t end, uint32_t* h) { hist16(u, begin, end, h); });
  return sums_from_hist<T>(hist.data()).to_tensor();
}

std::tuple<at::Tensor, at::Tensor> fp_encode_cpu(const at::Tensor& x_in, int64_t exp_bits,
                                                 int64_t man_bits, int64_t bias,
                                                 bool subnormals, int64_t scale_exp,
                                                 bool stochastic, int64_t seed, int64_t offset,
                                                 bool with_stats) {
  check_float_input(x_in, "gradwire::fp_encode");
  simd_level();  // a bad GRADWIRE_CPU_SIMD is reported here, not from inside a worker thread
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  const FpParams p = make_params(exp_bits, man_bits, bias, subnormals, scale_exp, stochastic);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = at::empty({packed_bytes(n, p.bits)}, x.options().dtype(at::kByte));
  const RngKeys keys = rng_keys(static_cast<uint32_t>(seed));
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint64_t off = static_cast<uint64_t>(offset);
  const auto st = x.scalar_type();
  // 16-bit inputs: codes and the |x| histogram in one pass (the same statistics, bit for bit, as
  // moment_stats on the same tensor). Without statistics: zeros, the identity of merge_stats.
  at::Tensor stats;
  if (st == at::kBFloat16) {
    stats = fp_encode16(x.data_ptr<c10::BFloat16>(), o, n, p, keys, off, with_stats);
  } else if (st == at::kHalf) {
    stats = fp_encode16(x.data_ptr<c10::Half>(), o, n, p, keys, off, with_stats);
  } else {
    std::vector<LocalStats> parts(with_stats ? (n + kChunk - 1) / kChunk : 0);
    fp_encode_f32(x.data_ptr<float>(), o, n, p, keys, off, parts);
    if (with_stats) stats = merge_stats(parts);
  }
  if (!with_stats) stats = at::zeros({5}, at::TensorOptions().dtype(at::kDouble));
  return {out, stats};
}

// y[i] = table[code i] for the n codes of `bits` bits packed at in (table null, for byte outputs
// only: y[i] = code i).
template <typename T>
void fp_decode_chunks(const uint8_t* in, T* y, int64_t n, int bits, const T* table) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const uint8_t* in_end = in + (n * bits + 7) / 8;
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      const uint8_t* src = in + begin / 8 * bits;
      for (int64_t g = begin; g < end; g += 8) {
        const int cnt = static_cast<int>(std::min<int64_t>(8, end - g));
        const int nb = cnt == 8 ? bits : static_cast<int>((cnt * bits + 7) / 8);
        uint64_t w = 0;
        if (src + 8 <= in_end) std::memcpy(&w, src, 8);  // extra bytes are masked off below
        else std::memcpy(&w, src, static_cast<size_t>(nb));
        src += nb;
        if constexpr (sizeof(T) == 1) {
          // Byte outputs (unpack_bits): gather 8 codes in a register and store once. Stored one
          // at a time through a char type, every store may alias `table` and `in`, which the
          // compiler then re-reads per byte (measured 2x slower than the bf16 decode).
          uint64_t o = 0;
          if (table == nullptr) {  // the identity: the codes themselves
            for (int j = 0; j < 8; ++j) o |= ((w >> (j * bits)) & mask) << (8 * j);
          } else {
            for (int j = 0; j < 8; ++j)
              o |= static_cast<uint64_t>(table[(w >> (j * bits)) & mask]) << (8 * j);
          }
          if (cnt == 8) std::memcpy(y + g, &o, 8);  // a constant size: one 8-byte store
          else std::memcpy(y + g, &o, static_cast<size_t>(cnt));
        } else {
          for (int j = 0; j < cnt; ++j) y[g + j] = table[(w >> (j * bits)) & mask];
        }
      }
    }
  });
}

at::Tensor fp_decode_cpu(const at::Tensor& packed_in, int64_t numel, int64_t exp_bits,
                         int64_t man_bits, int64_t bias, bool subnormals, int64_t scale_exp,
                         at::ScalarType dtype) {
  TORCH_CHECK(packed_in.device().is_cpu(), "gradwire::fp_decode: expected a CPU tensor");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, "gradwire::fp_decode: packed must be uint8");
  TORCH_CHECK(numel >= 0, "gradwire::fp_decode: numel must be >= 0");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gradwire::fp_decode: dtype must be float32, bfloat16 or float16");
  const FpParams p = make_params(exp_bits, man_bits, bias, subnormals, scale_exp, false);
  TORCH_CHECK(packed_in.numel() == packed_bytes(numel, p.bits), "gradwire::fp_decode: expected ",
              packed_bytes(numel, p.bits), " bytes for ", numel, " codes of ", p.bits,
              " bits, got ", packed_in.numel());
  const at::Tensor packed = packed_in.contiguous();
  // The decoded value is a pure function of the code: one table of 2**bits entries, computed
  // as the oracle does (numerics.fp.decode_codes): float32 value times 2**-scale_exp in
  // float64 (exact), one rounding to float32, then the cast to dtype.
  const double inv = std::ldexp(1.0, -p.scale_exp);
  float tf[256];
  for (int c = 0; c < 256; ++c) tf[c] = 0.0f;
  for (uint32_t c = 0; c < (1u << p.bits); ++c)
    tf[c] = static_cast<float>(
        static_cast<double>(fp_code_value(c, p.man_bits, p.emin, p.bits, p.subnormals)) * inv);
  at::Tensor y = at::empty({numel}, packed.options().dtype(dtype));
  const uint8_t* in = packed.data_ptr<uint8_t>();
  if (dtype == at::kFloat) {
    fp_decode_chunks(in, y.data_ptr<float>(), numel, p.bits, tf);
  } else if (dtype == at::kBFloat16) {
    c10::BFloat16 tb[256];
    for (int c = 0; c < 256; ++c) tb[c] = c10::BFloat16(tf[c]);
    fp_decode_chunks(in, y.data_ptr<c10::BFloat16>(), numel, p.bits, tb);
  } else {
    c10::Half th[256];
    for (int c = 0; c < 256; ++c) th[c] = c10::Half(tf[c]);
    fp_decode_chunks(in, y.data_ptr<c10::Half>(), numel, p.bits, th);
  }
  return y;
}

at::Tensor pack_bits_cpu(const at::Tensor& codes_in, int64_t bits) {
  TORCH_CHECK(codes_in.device().is_cpu(), "gradwire::pack_bits: expected a CPU tensor");
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "gradwire::pack_bits: codes must be uint8");
  TORCH_CHECK(bits >= 1 && bits <= 8, "gradwire::pack_bits: bits must be in [1, 8]");
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.numel();
  at::Tensor out = at::empty({packed_bytes(n, bits)}, codes.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int b = static_cast<int>(bits);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<uint8_t> bad(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t begin = ch * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      uint8_t* dst = o + begin / 8 * b;
      uint32_t ored = 0;
      for (int64_t g = begin; g < end; g += 8) {
        const int cnt = static_cast<int>(std::min<int64_t>(8, end - g));
        uint32_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < cnt; ++j) {
          v[j] = c[g + j];
          ored |= v[j];
        }
        const uint64_t w = pack8(v, b);
        const int nb = cnt == 8 ? b : (cnt * b + 7) / 8;
        store_group(dst, w, nb, o + end / 8 * b);
        dst += nb;
      }
      bad[ch] = (ored >> b) != 0;
    }
  });
  for (auto f : bad) TORCH_CHECK(!f, "gradwire::pack_bits: a code does not fit in ", bits, " bits");
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed_in, int64_t bits, int64_t numel) {
  TORCH_CHECK(packed_in.device().is_cpu(), "gradwire::unpack_bits: expected a CPU tensor");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, "gradwire::unpack_bits: packed must be uint8");
  TORCH_CHECK(bits >= 1 && bits <= 8, "gradwire::unpack_bits: bits must be in [1, 8]");
  TORCH_CHECK(numel >= 0, "gradwire::unpack_bits: numel must be >= 0");
  TORCH_CHECK(packed_in.numel() == packed_bytes(numel, bits), "gradwire::unpack_bits: expected ",
              packed_bytes(numel, bits), " bytes, got ", packed_in.numel());
  const at::Tensor packed_c = packed_in.contiguous();
  const int64_t used = (numel * bits) % 8;
  if (used) {
    const uint8_t last = packed_c.data_ptr<uint8_t>()[packed_c.numel() - 1];
    TORCH_CHECK((last >> used) == 0, "gradwire::unpack_bits: padding bits of the last byte are not zero");
  }
  const at::Tensor& packed = packed_c;
  at::Tensor out = at::empty({numel}, packed.options());
  fp_decode_chunks<uint8_t>(packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), numel,
                            static_cast<int>(bits), nullptr);  // null table: identity
  return out;
}

at::Tensor moment_stats_cpu(const at::Tensor& x_in) {
  check_float_input(x_in, "gradwire::moment_stats");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kBFloat16) return stats16(x.data_ptr<c10::BFloat16>(), n);
  if (x.scalar_type() == at::kHalf) return stats16(x.data_ptr<c10::Half>(), n);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<LocalStats> parts(nchunks);
  const double* tab = log2_table().t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moment_stats", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        LocalStats st;
        const int64_t end = std::min(n, (c + 1) * kChunk);
        for (int64_t i = c * kChunk; i < end; ++i) st.add(static_cast<float>(px[i]), tab);
        parts[c] = st;
      }
    });
  });
  return merge_stats(parts);
}


// prune_one_u on bit patterns, branch-free so the loop vectorises: U is uint32_t (float32, kShift
// 0) or uint16_t (bfloat16, kShift 16: a bf16 is the top half of a float32). The result x, +-a or
// +0 is written as bits: a is already rounded to the input dtype (its low 16 bits are 0 for
// bf16), so `>> kShift` is exact, as the cast back to T is in prune_one_u.
template <typename U, int kShift>
GW_SIMD_CLONES void prune_bits(const U* x, U* y, int cnt, float a, const uint32_t* r24) {
  const uint32_t abits = f32_bits(a);
  for (int j = 0; j < cnt; ++j) {
    const uint32_t xb = static_cast<uint32_t>(x[j]) << kShift;
    const float ax = f32_from_bits(xb & 0x7FFFFFFFu);
    // eps = uniform01 (r24 < 2**24: exact in float, and in int32, which vectorises), t = a * eps.
    const float t = a * (static_cast<float>(static_cast<int32_t>(r24[j])) * 5.9604644775390625e-08f);
    const uint32_t low = (ax >= t && ax > 0.0f) ? (abits | (xb & 0x80000000u)) : 0u;
    y[j] = static_cast<U>(((ax <= a) ? low : xb) >> kShift);
  }
}

template <typename T>
void prune_range(const T* x, T* y, int64_t begin, int64_t end, float a, RngKeys keys,
                 uint64_t offset) {
  constexpr int kBlock = 1024;  // hash a block at a time (vectorised), then prune
  uint32_t rbuf[kBlock];
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int cnt = static_cast<int>(std::min<int64_t>(kBlock, end - i0));
    hash_r24_block(keys, offset + static_cast<uint64_t>(i0), cnt, rbuf);
    if constexpr (std::is_same<T, c10::BFloat16>::value) {
      prune_bits<uint16_t, 16>(reinterpret_cast<const uint16_t*>(x + i0),
                               reinterpret_cast<uint16_t*>(y + i0), cnt, a, rbuf);
    } else if constexpr (std::is_same<T, float>::value) {
      prune_bits<uint32_t, 0>(reinterpret_cast<const uint32_t*>(x + i0),
                              reinterpret_cast<uint32_t*>(y + i0), cnt, a, rbuf);
    } else {
      for (int j = 0; j < cnt; ++j) {
        const float eps = static_cast<float>(rbuf[j]) * 5.9604644775390625e-08f;  // uniform01
        y[i0 + j] = static_cast<T>(prune_one_u(to_f32(x[i0 + j]), a, eps));
      }
    }
  }
}

// The result is x, +-a or 0, all exact in T (a was rounded to T by the caller), so the cast
// back to T is exact.
at::Tensor stochastic_prune_cpu(const at::Tensor& x_in, double alpha, int64_t seed, int64_t offset) {
  check_float_input(x_in, "gradwire::stochastic_prune");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  TORCH_CHECK(std::isfinite(alpha), "gradwire::stochastic_prune: alpha must be finite");
  const at::Tensor x = x_in.contiguous();
  if (alpha <= 0.0) return x.clone();
  const float a = static_cast<float>(alpha);
  at::Tensor y = at::empty_like(x);
  const RngKeys keys = rng_keys(static_cast<uint32_t>(seed));
  const uint64_t off = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "prune", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kChunk, [&](int64_t b, int64_t e) {
      prune_range(px, py, b, e, a, keys, off);
    });
  });
  return y;
}

#include "nm_lanes.h"  // nm12_lanes, nm24e_lanes, nm24a_lanes

// Blocks [b0, b1): per batch, hash the blocks' uniforms (vectorised, hash_r24_block), widen the
// input to float32 (a bf16/fp16 input is never copied to a float32 tensor), run the lanes, then
// redo the flagged blocks with nm_block_u (rules 1-2).
template <typename T>
void nm_range(const T* x, int sch, int m, int n, RngKeys keys, uint64_t off, int64_t b0,
              int64_t b1, float* pv, uint8_t* pi) {
  constexpr int kNmBatch = 256;
  uint32_t r[2 * kNmBatch];
  float xf[4 * kNmBatch];
  uint8_t sp[kNmBatch];
  const bool approx = sch == NM_MVUE24_APPROX;
  constexpr float k2m24 = 5.9604644775390625e-08f;  // uniform01 = r24 * 2**-24
  for (int64_t bb = b0; bb < b1; bb += kNmBatch) {
    const int cnt = static_cast<int>(std::min<int64_t>(kNmBatch, b1 - bb));
    const uint64_t ctr = off + static_cast<uint64_t>(bb);
    // approx 2:4 draws counters 2 ctr and 2 ctr + 1: one contiguous run (mod 2**64, as nm_block).
    if (approx) hash_r24_block(keys, 2 * ctr, 2 * cnt, r);
    else hash_r24_block(keys, ctr, cnt, r);
    const T* xb = x + bb * m;
    for (int e = 0; e < cnt * m; ++e) xf[e] = to_f32(xb[e]);
    float* v = pv + bb * n;
    uint8_t* ix = pi + bb * n;
    if (sch == NM_MVUE12) nm12_lanes(xf, r, cnt, v, ix, sp);
    else if (sch == NM_MVUE24_EXACT) nm24e_lanes(xf, r, cnt, v, ix, sp);
    else nm24a_lanes(xf, r, cnt, v, ix, sp);
    for (int k = 0; k < cnt; ++k) {
      if (!sp[k]) continue;
      const float u1 = static_cast<float>(approx ? r[2 * k] : r[k]) * k2m24;
      const float u2 = approx ? static_cast<float>(r[2 * k + 1]) * k2m24 : 0.0f;
      nm_block_u(xf + k * m, sch, u1, u2, v + k * n, ix + k * n);
    }
  }
}

// MVUE N:M compact form of x, whose last dim holds consecutive blocks of M (the wrapper moves
// the block dim last): values float32 [nb, N], indices uint8 [nb, N], block counter offset + b.
std::tuple<at::Tensor, at::Tensor> nm_select_cpu(const at::Tensor& x_in, int64_t scheme,
                                                 int64_t seed, int64_t offset) {
  check_float_input(x_in, "gradwire::nm_select");
  TORCH_CHECK(scheme >= 0 && scheme <= 2, "gradwire::nm_select: scheme must be 0 (1:2), 1 (2:4 exact) or 2 (2:4 approx)");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  const int m = scheme == 0 ? 2 : 4, n = scheme == 0 ? 1 : 2;
  TORCH_CHECK(x_in.numel() % m == 0, "gradwire::nm_select: numel ", x_in.numel(),
              " is not a multiple of the block size ", m);
  const at::Tensor x = x_in.contiguous();
  const int64_t nb = x.numel() / m;
  at::Tensor val = at::empty({nb, n}, x.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({nb, n}, x.options().dtype(at::kByte));
  float* pv = val.data_ptr<float>();
  uint8_t* pi = idx.data_ptr<uint8_t>();
  const RngKeys keys = rng_keys(static_cast<uint32_t>(seed));
  const uint64_t off = static_cast<uint64_t>(offset);
  const int sch = static_cast<int>(scheme);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_select", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, nb, 16384, [&](int64_t b0, int64_t b1) {
      nm_range(px, sch, m, n, keys, off, b0, b1, pv, pi);
    });
  });
  return {val, idx};
}

at::Tensor rng_u32_cpu(int64_t seed, const at::Tensor& index_in) {
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(index_in.scalar_type() == at::kLong, "gradwire::rng_u32: index must be int64");
  const at::Tensor index = index_in.contiguous();
  at::Tensor out = at::empty_like(index);
  const int64_t* ix = index.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const RngKeys k = rng_keys(static_cast<uint32_t>(seed));
  for (int64_t i = 0; i < index.numel(); ++i)
    o[i] = static_cast<int64_t>(random_u32(k, static_cast<uint64_t>(ix[i])));
  return out;
}

}  // namespace
}  // namespace gradwire

TORCH_LIBRARY_IMPL(gradwire, CPU, m) {
  m.impl("fp_encode", &gradwire::fp_encode_cpu);
  m.impl("fp_decode", &gradwire::fp_decode_cpu);
  m.impl("pack_bits", &gradwire::pack_bits_cpu);
  m.impl("unpack_bits", &gradwire::unpack_bits_cpu);
  m.impl("moment_stats", &gradwire::moment_stats_cpu);
  m.impl("rng_u32", &gradwire::rng_u32_cpu);
  m.impl("stochastic_prune", &gradwire::stochastic_prune_cpu);
  m.impl("nm_select", &gradwire::nm_select_cpu);
}
