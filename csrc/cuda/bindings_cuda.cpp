// Thin torch bindings of the CUDA kernels: validate, allocate, call the C API on the current
// stream. Built (with gradwire_kernels.cu) only when torch.cuda.is_available().
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>

#include "../common/fp_codec.h"
#include "gradwire_cuda.h"

namespace {

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA error ", err, " (", cudaGetErrorString(static_cast<cudaError_t>(err)), ")");
}

int dtype_code(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected a CUDA tensor, got ", x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return GW_F32;
    case at::kBFloat16: return GW_BF16;
    case at::kHalf: return GW_F16;
    default: TORCH_CHECK(false, op, ": expected float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return -1;
}

GwFpArgs fp_args(int64_t exp_bits, int64_t man_bits, int64_t bias, bool subnormals,
                 int64_t scale_exp, bool stochastic) {
  TORCH_CHECK(exp_bits >= 1 && exp_bits <= 7 && man_bits >= 0 && 1 + exp_bits + man_bits <= 8,
              "fp format: need 1 <= exp_bits <= 7, man_bits >= 0, 1 + exp_bits + man_bits <= 8");
  TORCH_CHECK(((int64_t(1) << exp_bits) - 1) - bias <= 127 && (1 - bias) - man_bits >= -149,
              "fp format: bias ", bias, " puts the format outside the float32 range");
  GwFpArgs a;
  a.exp_bits = static_cast<int32_t>(exp_bits);
  a.man_bits = static_cast<int32_t>(man_bits);
  a.bias = static_cast<int32_t>(bias);
  a.subnormals = subnormals ? 1 : 0;
  a.scale_exp = static_cast<int32_t>(std::max<int64_t>(-1000, std::min<int64_t>(1000, scale_exp)));
  a.stochastic = stochastic ? 1 : 0;
  return a;
}

int64_t packed_bytes(int64_t n, int64_t bits) { return (n * bits + 7) / 8; }

std::tuple<at::Tensor, at::Tensor> fp_encode_cuda(const at::Tensor& x_in, int64_t exp_bits,
                                                  int64_t man_bits, int64_t bias, bool subnormals,
                                                  int64_t scale_exp, bool stochastic,
                                                  int64_t seed, int64_t offset, bool with_stats) {
  const int dt = dtype_code(x_in, "gradwire::fp_encode");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  const GwFpArgs a = fp_args(exp_bits, man_bits, bias, subnormals, scale_exp, stochastic);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = at::empty({packed_bytes(n, 1 + exp_bits + man_bits)}, x.options().dtype(at::kByte));
  if (!with_stats) {  // zeros: the identity of merge_stats
    check_cuda(gw_fp_encode(x.data_ptr(), dt, n, a, static_cast<uint32_t>(seed),
                            static_cast<uint64_t>(offset), out.data_ptr<uint8_t>(), nullptr,
                            nullptr, c10::cuda::getCurrentCUDAStream().stream()),
               "gradwire::fp_encode");
    return {out, at::zeros({5}, x.options().dtype(at::kDouble))};
  }
  at::Tensor scratch = at::empty({gw_stats_scratch(n)}, x.options().dtype(at::kDouble));
  at::Tensor stats = at::empty({5}, x.options().dtype(at::kDouble));
  check_cuda(gw_fp_encode(x.data_ptr(), dt, n, a, static_cast<uint32_t>(seed),
                          static_cast<uint64_t>(offset), out.data_ptr<uint8_t>(),
                          scratch.data_ptr<double>(), stats.data_ptr<double>(),
                          c10::cuda::getCurrentCUDAStream().stream()),
             "gradwire::fp_encode");
  return {out, stats};
}

at::Tensor unpack_map(const at::Tensor& packed_in, int64_t numel, int64_t bits,
                      const uint32_t* table, at::ScalarType out_type, const char* op) {
  TORCH_CHECK(packed_in.is_cuda(), op, ": expected a CUDA tensor, got ", packed_in.device());
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, op, ": packed must be uint8");
  TORCH_CHECK(numel >= 0 && packed_in.numel() == packed_bytes(numel, bits), op, ": expected ",
              packed_bytes(numel, bits), " bytes for ", numel, " codes of ", bits, " bits, got ",
              packed_in.numel());
  c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t used = (numel * bits) % 8;
  if (used) {  // same contract as the reference: padding bits are zero (one byte synchronised)
    const int last = packed[packed.numel() - 1].item<uint8_t>();
    TORCH_CHECK((last >> used) == 0, op, ": padding bits of the last byte are not zero");
  }
  at::Tensor out = at::empty({numel}, packed.options().dtype(out_type));
  const int ob = static_cast<int>(out.element_size());
  check_cuda(gw_unpack_map(packed.data_ptr<uint8_t>(), numel, static_cast<int>(bits), table, ob,
                           out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return out;
}

at::Tensor fp_decode_cuda(const at::Tensor& packed, int64_t numel, int64_t exp_bits,
                          int64_t man_bits, int64_t bias, bool subnormals, int64_t scale_exp,
                          at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gradwire::fp_decode: dtype must be float32, bfloat16 or float16");
  const GwFpArgs a = fp_args(exp_bits, man_bits, bias, subnormals, scale_exp, false);
  const int bits = 1 + a.exp_bits + a.man_bits;
  // Table of output bit patterns, computed on the host exactly as the CPU kernel does.
  const double inv = std::ldexp(1.0, -a.scale_exp);
  uint32_t table[256] = {0};
  for (uint32_t c = 0; c < (1u << bits); ++c) {
    const float v = static_cast<float>(
        static_cast<double>(gradwire::fp_code_value(c, a.man_bits, 1 - a.bias, bits, a.subnormals)) * inv);
    if (dtype == at::kFloat) {
      table[c] = gradwire::f32_bits(v);
    } else if (dtype == at::kBFloat16) {
      table[c] = c10::BFloat16(v).x;
    } else {
      table[c] = c10::Half(v).x;
    }
  }
  return unpack_map(packed, numel, bits, table, dtype, "gradwire::fp_decode");
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed, int64_t bits, int64_t numel) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "gradwire::unpack_bits: bits must be in [1, 8]");
  uint32_t ident[256];
  for (uint32_t i = 0; i < 256; ++i) ident[i] = i;
  return unpack_map(packed, numel, bits, ident, at::kByte, "gradwire::unpack_bits");
}

at::Tensor pack_bits_cuda(const at::Tensor& codes_in, int64_t bits) {
  TORCH_CHECK(codes_in.is_cuda(), "gradwire::pack_bits: expected a CUDA tensor");
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "gradwire::pack_bits: codes must be uint8");
  TORCH_CHECK(bits >= 1 && bits <= 8, "gradwire::pack_bits: bits must be in [1, 8]");
  c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.numel();
  at::Tensor out = at::empty({packed_bytes(n, bits)}, codes.options());
  at::Tensor bad = at::zeros({1}, codes.options().dtype(at::kInt));
  check_cuda(gw_pack_bits(codes.data_ptr<uint8_t>(), n, static_cast<int>(bits),
                          out.data_ptr<uint8_t>(), bad.data_ptr<int>(),
                          c10::cuda::getCurrentCUDAStream().stream()),
             "gradwire::pack_bits");
  TORCH_CHECK(bad.item<int>() == 0, "gradwire::pack_bits: a code does not fit in ", bits, " bits");
  return out;
}

at::Tensor moment_stats_cuda(const at::Tensor& x_in) {
  const int dt = dtype_code(x_in, "gradwire::moment_stats");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor scratch = at::empty({gw_stats_scratch(x.numel())}, x.options().dtype(at::kDouble));
  at::Tensor stats = at::empty({5}, x.options().dtype(at::kDouble));
  check_cuda(gw_moment_stats(x.data_ptr(), dt, x.numel(), scratch.data_ptr<double>(),
                             stats.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream()),
             "gradwire::moment_stats");
  return stats;
}

at::Tensor stochastic_prune_cuda(const at::Tensor& x_in, double alpha, int64_t seed, int64_t offset) {
  const int dt = dtype_code(x_in, "gradwire::stochastic_prune");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  TORCH_CHECK(std::isfinite(alpha), "gradwire::stochastic_prune: alpha must be finite");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  if (alpha <= 0.0) return x.clone();
  at::Tensor y = at::empty_like(x);
  check_cuda(gw_stochastic_prune(x.data_ptr(), dt, x.numel(), static_cast<float>(alpha),
                                 static_cast<uint32_t>(seed), static_cast<uint64_t>(offset),
                                 y.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
             "gradwire::stochastic_prune");
  return y;
}

std::tuple<at::Tensor, at::Tensor> nm_select_cuda(const at::Tensor& x_in, int64_t scheme,
                                                  int64_t seed, int64_t offset) {
  const int dt = dtype_code(x_in, "gradwire::nm_select");
  TORCH_CHECK(scheme >= 0 && scheme <= 2, "gradwire::nm_select: scheme must be 0, 1 or 2");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  const int m = scheme == 0 ? 2 : 4, n = scheme == 0 ? 1 : 2;
  TORCH_CHECK(x_in.numel() % m == 0, "gradwire::nm_select: numel ", x_in.numel(),
              " is not a multiple of the block size ", m);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t nb = x.numel() / m;
  at::Tensor val = at::empty({nb, n}, x.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({nb, n}, x.options().dtype(at::kByte));
  check_cuda(gw_nm_select(x.data_ptr(), dt, nb, static_cast<int>(scheme),
                          static_cast<uint32_t>(seed), static_cast<uint64_t>(offset),
                          val.data_ptr<float>(), idx.data_ptr<uint8_t>(),
                          c10::cuda::getCurrentCUDAStream().stream()),
             "gradwire::nm_select");
  return {val, idx};
}

at::Tensor rng_u32_cuda(int64_t seed, const at::Tensor& index_in) {
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFll, "seed must be in [0, 2**32)");
  TORCH_CHECK(index_in.is_cuda() && index_in.scalar_type() == at::kLong,
              "gradwire::rng_u32: index must be an int64 CUDA tensor");
  c10::cuda::CUDAGuard guard(index_in.device());
  const at::Tensor index = index_in.contiguous();
  at::Tensor out = at::empty_like(index);
  check_cuda(gw_rng_u32(static_cast<uint32_t>(seed), index.data_ptr<int64_t>(), index.numel(),
                        out.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()),
             "gradwire::rng_u32");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradwire, CUDA, m) {
  m.impl("fp_encode", &fp_encode_cuda);
  m.impl("fp_decode", &fp_decode_cuda);
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
  m.impl("moment_stats", &moment_stats_cuda);
  m.impl("rng_u32", &rng_u32_cuda);
  m.impl("stochastic_prune", &stochastic_prune_cuda);
  m.impl("nm_select", &nm_select_cuda);
}
