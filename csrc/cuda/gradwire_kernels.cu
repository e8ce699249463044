// CUDA kernels for the gradwire ops: framework-free (no torch headers), C API in gradwire_cuda.h.
//
// Memory layout for bandwidth: a group of 8 consecutive elements is one 16-byte (bf16/fp16) or
// 2 x 16-byte (fp32) aligned vector load, and its output is the `bits` whole bytes those 8 codes
// occupy in the LSB-first stream (groups start byte-aligned). The FP encode gives each thread 4
// groups, so its output is `bits` whole 32-bit words, stored as words (see fp_encode_kernel). One pass reads x once: the codes and the
// moment statistics for the next refresh come out of the same loads. Statistics: per-thread
// float64 accumulators -> per-block tree reduction -> per-block partials -> one final block sums
// them in block order, so results do not depend on scheduling. Compile without --use_fast_math:
// the encode is integer arithmetic and must stay bit-exact with numerics/fp.py.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "../common/fp_codec.h"
#include "../common/nm.h"
#include "gradwire_cuda.h"

namespace {

using namespace gradwire;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

__device__ __forceinline__ float load_f32(const void* x, int dtype, int64_t i) {
  if (dtype == GW_F32) return static_cast<const float*>(x)[i];
  const uint16_t h = static_cast<const uint16_t*>(x)[i];
  if (dtype == GW_BF16) return f32_from_bits(static_cast<uint32_t>(h) << 16);
  return __half2float(__ushort_as_half(h));
}

// 8 consecutive elements starting at g (g % 8 == 0), with a vector load when aligned.
__device__ __forceinline__ void load8(const void* x, int dtype, int64_t g, int cnt, float v[8]) {
  const bool full = cnt == 8;
  if (full && dtype != GW_F32 &&
      (reinterpret_cast<uintptr_t>(static_cast<const uint16_t*>(x) + g) & 15u) == 0) {
    const uint4 w = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + g);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    for (int j = 0; j < 4; ++j) {
      const uint16_t lo = words[j] & 0xFFFFu, hi = words[j] >> 16;
      if (dtype == GW_BF16) {
        v[2 * j] = f32_from_bits(static_cast<uint32_t>(lo) << 16);
        v[2 * j + 1] = f32_from_bits(static_cast<uint32_t>(hi) << 16);
      } else {
        v[2 * j] = __half2float(__ushort_as_half(lo));
        v[2 * j + 1] = __half2float(__ushort_as_half(hi));
      }
    }
    return;
  }
  if (full && dtype == GW_F32 &&
      (reinterpret_cast<uintptr_t>(static_cast<const float*>(x) + g) & 15u) == 0) {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + g);
    const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + g + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    return;
  }
  for (int j = 0; j < 8; ++j) v[j] = j < cnt ? load_f32(x, dtype, g + j) : 0.0f;
}

struct Acc5 {
  double v[5];  // n_finite_nonzero, sum log2, sum log2^2, n_zero, n_nonfinite
};

// log2|x| = e + log2(m) with m in [1, 2): the exponent is exact and log2f of the mantissa is off
// by at most ~2**-23 (CUDA's log2f: 1 ulp), summed in float64. A float64 log2 per element made the
// statistics pass compute-bound (about 5x slower than reading x on an H200).
__device__ __forceinline__ void acc_add(Acc5& a, float x) {
  const uint32_t ab = f32_bits(x) & 0x7FFFFFFFu;
  if (ab >= 0x7F800000u) {
    a.v[4] += 1.0;
  } else if (ab == 0) {
    a.v[3] += 1.0;
  } else {
    int e;
    uint32_t frac;
    if (ab >= 0x00800000u) {
      e = static_cast<int>(ab >> 23) - 127;
      frac = ab & 0x7FFFFFu;
    } else {  // float32 subnormal: normalise so that bit 23 is the leading one
      const int sh = __clz(ab) - 8;
      e = -126 - sh;
      frac = (ab << sh) & 0x7FFFFFu;
    }
    const double l = static_cast<double>(e) + static_cast<double>(log2f(f32_from_bits(frac | 0x3F800000u)));
    a.v[0] += 1.0;
    a.v[1] += l;
    a.v[2] += l * l;
  }
}

// Block-wide tree reduction (fixed shape) of each thread's Acc5 into scratch[blockIdx.x * 5 + k].
__device__ void block_reduce_store(Acc5& a, double* scratch) {
  __shared__ double sh[5][kThreads];
  for (int k = 0; k < 5; ++k) sh[k][threadIdx.x] = a.v[k];
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      for (int k = 0; k < 5; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int k = 0; k < 5; ++k) scratch[blockIdx.x * 5 + k] = sh[k][0];
}

__global__ void finalize_stats(const double* scratch, int64_t nblocks, double* stats) {
  const int k = threadIdx.x;
  if (k < 5) {
    double s = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) s += scratch[b * 5 + k];  // block order
    stats[k] = s;
  }
}

int64_t blocks_for(int64_t groups) {
  int64_t b = (groups + kThreads - 1) / kThreads;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return b < 1 ? 1 : b;
}

// One thread owns 4 groups of 8 elements (32 codes = 4 * kBits bytes = kBits 32-bit words, which
// start 4-byte aligned because every thread's output starts at a multiple of 4 * kBits bytes):
// the packed output of a full quad is written with kBits 32-bit stores (consecutive threads,
// consecutive words: coalesced) instead of 4 * kBits byte stores. The last, partial quad and a
// misaligned `out` keep the byte stores. kBits is a template parameter, so the byte-to-word
// shuffle unrolls into shifts (a runtime width costs an integer division per byte and a stack
// array). Measured on an H200 (bench/results/gpu_check_h200) the encode is still compute-bound,
// 5.5x the time of copying its input: the per-element integer work of fp_split dominates.
template <int kBits, bool kStats>
__global__ void fp_encode_kernel(const void* x, int dtype, int64_t n, FpParams p, RngKeys keys,
                                 uint64_t offset, uint8_t* out, double* scratch) {
  Acc5 acc = {{0, 0, 0, 0, 0}};
  const int64_t quads = (n + 31) / 32;
  const bool out_aligned = (reinterpret_cast<uintptr_t>(out) & 3u) == 0;
  for (int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; qi < quads;
       qi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[q] = 0;
      const int64_t g = qi * 32 + q * 8;
      if (g >= n) continue;
      const int cnt = n - g < 8 ? static_cast<int>(n - g) : 8;
      float v[8];
      load8(x, dtype, g, cnt, v);
      uint32_t codes[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        codes[j] = 0;
        if (j < cnt) {
          if (kStats) acc_add(acc, v[j]);
          codes[j] = fp_encode_one(v[j], p, keys, offset + static_cast<uint64_t>(g + j));
        }
      }
      w[q] = pack8(codes, kBits);
    }
    uint8_t* o = out + qi * 4 * kBits;
    if (out_aligned && n - qi * 32 >= 32) {
      // Byte k of the quad's stream is byte (k % kBits) of w[k / kBits] (groups are byte-aligned).
      uint32_t* o32 = reinterpret_cast<uint32_t*>(o);
#pragma unroll
      for (int k4 = 0; k4 < kBits; ++k4) {
        uint32_t word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int k = 4 * k4 + b;
          word |= static_cast<uint32_t>((w[k / kBits] >> (8 * (k % kBits))) & 0xFFu) << (8 * b);
        }
        o32[k4] = word;
      }
    } else {
      for (int q = 0; q < 4; ++q) {
        const int64_t g = qi * 32 + q * 8;
        if (g >= n) break;
        const int cnt = n - g < 8 ? static_cast<int>(n - g) : 8;
        const int nb = cnt == 8 ? kBits : (cnt * kBits + 7) / 8;
        for (int b = 0; b < nb; ++b) o[q * kBits + b] = static_cast<uint8_t>(w[q] >> (8 * b));
      }
    }
  }
  if (kStats) block_reduce_store(acc, scratch);
}

__global__ void moment_stats_kernel(const void* x, int dtype, int64_t n, double* scratch) {
  Acc5 acc = {{0, 0, 0, 0, 0}};
  const int64_t groups = (n + 7) / 8;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = gi * 8;
    const int cnt = n - g < 8 ? static_cast<int>(n - g) : 8;
    float v[8];
    load8(x, dtype, g, cnt, v);
    for (int j = 0; j < cnt; ++j) acc_add(acc, v[j]);
  }
  block_reduce_store(acc, scratch);
}

struct Table256 {
  uint32_t v[256];
};

// Unpack + table map. One thread owns a quad of 32 codes = kBits 32-bit input words (4-byte
// aligned: each quad starts at a multiple of 4 * kBits bytes) and writes its 32 outputs with
// 16-byte stores; the partial last quad and misaligned buffers take the byte-wise path. The
// table goes to shared memory: lookups with a different code in every lane would be serialised
// if they read the kernel-parameter (constant) bank directly.
template <int kBits, int kOutBytes>
__global__ void unpack_map_kernel(const uint8_t* in, int64_t n, Table256 table, void* out) {
  __shared__ uint32_t sh_table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) sh_table[i] = table.v[i];
  __syncthreads();
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  const int64_t quads = (n + 31) / 32;
  const bool aligned = (reinterpret_cast<uintptr_t>(in) & 3u) == 0 &&
                       (reinterpret_cast<uintptr_t>(out) & 15u) == 0;
  for (int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; qi < quads;
       qi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g0 = qi * 32;
    if (aligned && n - g0 >= 32) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(in + qi * 4 * kBits);
      uint32_t words[kBits + 1];
#pragma unroll
      for (int k = 0; k < kBits; ++k) words[k] = src[k];
      words[kBits] = 0;
      uint32_t t[32];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int bit = j * kBits, wi = bit >> 5, off = bit & 31;
        uint32_t c = words[wi] >> off;
        if (off + kBits > 32) c |= words[wi + 1] << (32 - off);
        t[j] = sh_table[c & kMask];
      }
      uint4* dst = reinterpret_cast<uint4*>(static_cast<uint8_t*>(out) + g0 * kOutBytes);
      if (kOutBytes == 4) {
#pragma unroll
        for (int k = 0; k < 8; ++k) dst[k] = make_uint4(t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
      } else if (kOutBytes == 2) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
          dst[k] = make_uint4(t[8 * k] | (t[8 * k + 1] << 16), t[8 * k + 2] | (t[8 * k + 3] << 16),
                              t[8 * k + 4] | (t[8 * k + 5] << 16), t[8 * k + 6] | (t[8 * k + 7] << 16));
      } else {
        uint32_t b[8];
#pragma unroll
        for (int k = 0; k < 8; ++k)
          b[k] = t[4 * k] | (t[4 * k + 1] << 8) | (t[4 * k + 2] << 16) | (t[4 * k + 3] << 24);
        dst[0] = make_uint4(b[0], b[1], b[2], b[3]);
        dst[1] = make_uint4(b[4], b[5], b[6], b[7]);
      }
      continue;
    }
    for (int q = 0; q < 4; ++q) {  // byte-wise: groups of 8 codes start byte-aligned
      const int64_t g = g0 + q * 8;
      if (g >= n) break;
      const int cnt = n - g < 8 ? static_cast<int>(n - g) : 8;
      const int nb = cnt == 8 ? kBits : (cnt * kBits + 7) / 8;
      const uint8_t* src = in + (g / 8) * kBits;
      uint64_t w = 0;
      for (int b = 0; b < nb; ++b) w |= static_cast<uint64_t>(src[b]) << (8 * b);
      for (int j = 0; j < cnt; ++j) {
        const uint32_t v = sh_table[(w >> (j * kBits)) & kMask];
        if (kOutBytes == 1) static_cast<uint8_t*>(out)[g + j] = static_cast<uint8_t>(v);
        else if (kOutBytes == 2) static_cast<uint16_t*>(out)[g + j] = static_cast<uint16_t>(v);
        else static_cast<uint32_t*>(out)[g + j] = v;
      }
    }
  }
}

__global__ void pack_bits_kernel(const uint8_t* codes, int64_t n, int bits, uint8_t* out,
                                 int* bad) {
  const int64_t groups = (n + 7) / 8;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = gi * 8;
    const int cnt = n - g < 8 ? static_cast<int>(n - g) : 8;
    uint32_t c[8];
    uint32_t ored = 0;
    for (int j = 0; j < 8; ++j) {
      c[j] = j < cnt ? codes[g + j] : 0u;
      ored |= c[j];
    }
    if (ored >> bits) *bad = 1;
    const uint64_t w = pack8(c, bits);
    const int nb = cnt == 8 ? bits : (cnt * bits + 7) / 8;
    for (int b = 0; b < nb; ++b) out[gi * bits + b] = static_cast<uint8_t>(w >> (8 * b));
  }
}

// Groups of 8 elements: one vector load (load8) and, when aligned, one 16-byte (bf16/fp16) or
// two 16-byte (fp32) stores.
__global__ void prune_kernel(const void* x, int dtype, int64_t n, float a, RngKeys keys,
                             uint64_t offset, void* y) {
  const int64_t groups = (n + 7) / 8;
  const bool y_aligned = (reinterpret_cast<uintptr_t>(y) & 15u) == 0;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = gi * 8;
    const int cnt = n - g < 8 ? static_cast<int>(n - g) : 8;
    float v[8];
    load8(x, dtype, g, cnt, v);
    uint32_t bits[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      // v is x, +-a or 0: exact in the input dtype, so truncating the float32 bits is exact.
      const float r = j < cnt ? prune_one(v[j], a, keys, offset + static_cast<uint64_t>(g + j)) : 0.0f;
      bits[j] = dtype == GW_F32 ? f32_bits(r)
                : dtype == GW_BF16 ? (f32_bits(r) >> 16)
                                   : static_cast<uint32_t>(__half_as_ushort(__float2half_rn(r)));
    }
    if (cnt == 8 && y_aligned) {
      if (dtype == GW_F32) {
        uint4* d = reinterpret_cast<uint4*>(static_cast<float*>(y) + g);
        d[0] = make_uint4(bits[0], bits[1], bits[2], bits[3]);
        d[1] = make_uint4(bits[4], bits[5], bits[6], bits[7]);
      } else {
        *reinterpret_cast<uint4*>(static_cast<uint16_t*>(y) + g) =
            make_uint4(bits[0] | (bits[1] << 16), bits[2] | (bits[3] << 16), bits[4] | (bits[5] << 16),
                       bits[6] | (bits[7] << 16));
      }
      continue;
    }
    for (int j = 0; j < cnt; ++j) {
      if (dtype == GW_F32) static_cast<uint32_t*>(y)[g + j] = bits[j];
      else static_cast<uint16_t*>(y)[g + j] = static_cast<uint16_t>(bits[j]);
    }
  }
}

__global__ void nm_kernel(const void* x, int dtype, int64_t nb, int scheme, RngKeys keys,
                          uint64_t offset, float* values, uint8_t* indices) {
  const int m = scheme == NM_MVUE12 ? 2 : 4, n = scheme == NM_MVUE12 ? 1 : 2;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nb;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[4];
    for (int k = 0; k < m; ++k) v[k] = load_f32(x, dtype, b * m + k);
    nm_block(v, scheme, keys, offset + static_cast<uint64_t>(b), values + b * n, indices + b * n);
  }
}

__global__ void rng_kernel(RngKeys k, const int64_t* index, int64_t n, int64_t* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<int64_t>(random_u32(k, static_cast<uint64_t>(index[i])));
}

FpParams to_params(const GwFpArgs& a) {
  FpParams p;
  p.man_bits = a.man_bits;
  p.emin = 1 - a.bias;
  p.emax = ((1 << a.exp_bits) - 1) - a.bias;
  p.bits = 1 + a.exp_bits + a.man_bits;
  p.subnormals = a.subnormals;
  p.scale_exp = a.scale_exp;
  p.stochastic = a.stochastic;
  p.max_mag = (1u << (p.bits - 1)) - 1u;
  p.nonfinite = 1u << (p.bits - 1);
  return p;
}

template <bool kStats>
int launch_fp_encode(const void* x, int dtype, int64_t n, const FpParams& p, RngKeys keys,
                     uint64_t offset, uint8_t* out, double* scratch, int64_t nb, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(nb);
  switch (p.bits) {
#define GW_ENCODE_CASE(B) \
    case B: fp_encode_kernel<B, kStats><<<grid, kThreads, 0, s>>>(x, dtype, n, p, keys, offset, out, scratch); break;
    GW_ENCODE_CASE(2) GW_ENCODE_CASE(3) GW_ENCODE_CASE(4) GW_ENCODE_CASE(5)
    GW_ENCODE_CASE(6) GW_ENCODE_CASE(7) GW_ENCODE_CASE(8)
#undef GW_ENCODE_CASE
    default: return static_cast<int>(cudaErrorInvalidValue);  // the bindings allow 2..8 bits
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

// blocks_for(n) >= blocks_for(groups): enough for both the encode and the stats kernel.
int64_t gw_stats_scratch(int64_t n) { return 5 * blocks_for(n); }

int gw_fp_encode(const void* x, int dtype, int64_t n, GwFpArgs args, uint32_t seed,
                 uint64_t offset, uint8_t* out, double* scratch, double* stats, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t nb = blocks_for((n + 31) / 32);  // one thread per 32 elements
  const FpParams p = to_params(args);
  if (stats == nullptr)
    return launch_fp_encode<false>(x, dtype, n, p, rng_keys(seed), offset, out, nullptr, nb, s);
  const int err = launch_fp_encode<true>(x, dtype, n, p, rng_keys(seed), offset, out, scratch, nb, s);
  if (err) return err;
  finalize_stats<<<1, 32, 0, s>>>(scratch, nb, stats);
  return static_cast<int>(cudaGetLastError());
}

int gw_moment_stats(const void* x, int dtype, int64_t n, double* scratch, double* stats,
                    void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t nb = blocks_for((n + 7) / 8);  // one thread per group of 8
  moment_stats_kernel<<<static_cast<unsigned>(nb), kThreads, 0, s>>>(x, dtype, n, scratch);
  finalize_stats<<<1, 32, 0, s>>>(scratch, nb, stats);
  return static_cast<int>(cudaGetLastError());
}

int gw_unpack_map(const uint8_t* in, int64_t n, int bits, const uint32_t* table256,
                  int out_bytes, void* out, void* stream) {
  if (n == 0) return 0;
  Table256 t;
  for (int i = 0; i < 256; ++i) t.v[i] = table256[i];
  const unsigned grid = static_cast<unsigned>(blocks_for((n + 31) / 32));  // one thread per 32 codes
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define GW_UNPACK_CASE(B)                                                              \
  case B:                                                                              \
    if (out_bytes == 1) unpack_map_kernel<B, 1><<<grid, kThreads, 0, s>>>(in, n, t, out);      \
    else if (out_bytes == 2) unpack_map_kernel<B, 2><<<grid, kThreads, 0, s>>>(in, n, t, out); \
    else unpack_map_kernel<B, 4><<<grid, kThreads, 0, s>>>(in, n, t, out);                     \
    break;
  switch (bits) {
    GW_UNPACK_CASE(1) GW_UNPACK_CASE(2) GW_UNPACK_CASE(3) GW_UNPACK_CASE(4)
    GW_UNPACK_CASE(5) GW_UNPACK_CASE(6) GW_UNPACK_CASE(7) GW_UNPACK_CASE(8)
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
#undef GW_UNPACK_CASE
  return static_cast<int>(cudaGetLastError());
}

int gw_pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out, int* bad, void* stream) {
  if (n == 0) return 0;
  pack_bits_kernel<<<static_cast<unsigned>(blocks_for((n + 7) / 8)), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(codes, n, bits, out, bad);
  return static_cast<int>(cudaGetLastError());
}

int gw_stochastic_prune(const void* x, int dtype, int64_t n, float a, uint32_t seed,
                        uint64_t offset, void* y, void* stream) {
  if (n == 0) return 0;
  prune_kernel<<<static_cast<unsigned>(blocks_for((n + 7) / 8)), kThreads, 0,
                 static_cast<cudaStream_t>(stream)>>>(x, dtype, n, a, rng_keys(seed), offset, y);
  return static_cast<int>(cudaGetLastError());
}

int gw_nm_select(const void* x, int dtype, int64_t nb, int scheme, uint32_t seed, uint64_t offset,
                 float* values, uint8_t* indices, void* stream) {
  if (nb == 0) return 0;
  nm_kernel<<<static_cast<unsigned>(blocks_for(nb)), kThreads, 0,
              static_cast<cudaStream_t>(stream)>>>(x, dtype, nb, scheme, rng_keys(seed), offset,
                                                   values, indices);
  return static_cast<int>(cudaGetLastError());
}

int gw_rng_u32(uint32_t seed, const int64_t* index, int64_t n, int64_t* out, void* stream) {
  if (n == 0) return 0;
  rng_kernel<<<static_cast<unsigned>(blocks_for(n)), kThreads, 0,
               static_cast<cudaStream_t>(stream)>>>(rng_keys(seed), index, n, out);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
