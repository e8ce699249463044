// Counter-based random bits, identical to gradwire/numerics/rng.py (the reference).
// Framework-free: included by the C++ (CPU) and CUDA kernels alike.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define GW_HD __host__ __device__ __forceinline__
#else
#define GW_HD inline
#endif

namespace gradwire {

GW_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

struct RngKeys {
  uint32_t key1, key2;
};

GW_HD RngKeys rng_keys(uint32_t seed) {
  RngKeys k;
  k.key1 = mix32(seed ^ 0x9E3779B9u);
  k.key2 = mix32(k.key1 ^ 0x85EBCA6Bu);
  return k;
}

// 32 random bits for counter `index` (flat element or block index).
GW_HD uint32_t random_u32(RngKeys k, uint64_t index) {
  uint32_t h = mix32(static_cast<uint32_t>(index) ^ k.key1);
  return mix32(h + static_cast<uint32_t>(index >> 32) + k.key2);
}

// Uniform in [0, 1): 24 random bits scaled by 2^-24, exact in float.
GW_HD float uniform01(RngKeys k, uint64_t index) {
  return static_cast<float>(random_u32(k, index) >> 8) * 5.9604644775390625e-08f;
}

}  // namespace gradwire
