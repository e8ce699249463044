// C API of the framework-free CUDA kernels (csrc/cuda/gradwire_kernels.cu). Raw pointers, sizes
// and a cudaStream_t passed as void*; every launcher returns a cudaError_t as int (0 = success).
// Torch bindings: csrc/cuda/bindings_cuda.cpp. The CI compiles the .cu with nvcc alone.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Input dtypes of the float kernels.
enum { GW_F32 = 0, GW_BF16 = 1, GW_F16 = 2 };

typedef struct {
  int32_t exp_bits, man_bits, bias, subnormals, scale_exp, stochastic;
} GwFpArgs;

// Doubles of scratch the statistics need for n elements (per-block partials).
int64_t gw_stats_scratch(int64_t n);

// Fused FP encode: packed codes (ceil(n*bits/8) bytes) + moment statistics (double[5]) of x.
// scratch and stats null: the codes alone (no statistics pass, no reduction).
int gw_fp_encode(const void* x, int dtype, int64_t n, GwFpArgs args, uint32_t seed,
                 uint64_t offset, uint8_t* out, double* scratch, double* stats, void* stream);

// Unpack n codes of `bits` bits and map each through table (entries of out_bytes = 1, 2 or 4
// bytes: identity for unpack_bits, the decoded value bit patterns for fp_decode).
int gw_unpack_map(const uint8_t* in, int64_t n, int bits, const uint32_t* table256,
                  int out_bytes, void* out, void* stream);

// Pack n uint8 codes into ceil(n*bits/8) bytes; *bad (device int, zeroed by the caller) is set
// to 1 if a code does not fit in `bits` bits.
int gw_pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out, int* bad, void* stream);

// Moment statistics alone.
int gw_moment_stats(const void* x, int dtype, int64_t n, double* scratch, double* stats,
                    void* stream);

// Stochastic pruning (numerics.pruning.stochastic_prune) with effective threshold a > 0;
// y has x's dtype and size.
int gw_stochastic_prune(const void* x, int dtype, int64_t n, float a, uint32_t seed,
                        uint64_t offset, void* y, void* stream);

// MVUE N:M compact form (scheme 0: 1:2, 1: 2:4 exact, 2: 2:4 approx) of nb consecutive blocks
// of x: values float32 [nb, N], indices uint8 [nb, N]; block counter offset + b.
int gw_nm_select(const void* x, int dtype, int64_t nb, int scheme, uint32_t seed, uint64_t offset,
                 float* values, uint8_t* indices, void* stream);

// random_u32 of numerics.rng for each int64 counter (test binding of csrc/common/rng.h).
int gw_rng_u32(uint32_t seed, const int64_t* index, int64_t n, int64_t* out, void* stream);

#ifdef __cplusplus
}
#endif
