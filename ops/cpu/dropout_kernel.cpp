// CPU registration of `detrx::dropout` (ops/dropout.cpp): validation, allocation, and the call of
// the kernel (dropout_kernel_impl.h) at the instruction-set level chosen when the library loaded.
// torch's CPU dropout fills a float mask with bernoulli_ (one Mersenne-Twister draw per element),
// divides it by 1 - p, multiplies, and saves the mask; this is one pass that reads the input and
// writes the output, and its backward is the same call on the gradient.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu/cpu_capability.h"
#include "cpu/dropout_kernel.h"

namespace detrx {
namespace {

void (*const kDropoutKernels[3])(const cpu::DropoutArgs&) = DETRX_CPU_LEVEL_KERNELS(dropout);

at::Tensor dropout_cpu(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.0 && p <= 1.0,
                    "detrx::dropout: p must be a probability in [0, 1], got ", p);
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "detrx::dropout: input must be a floating-point tensor (float32, float64, "
                   "float16 or bfloat16), got ", dtype);
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::empty_like(source, at::MemoryFormat::Contiguous);
  if (source.numel() == 0) return output;
  // P(draw < threshold) = threshold / 2^32 = p, rounded to the nearest representable value;
  // p within 2^-33 of 1 keeps 1 draw in 2^32.
  const double scaled = std::nearbyint(p * 4294967296.0);
  const uint32_t threshold =
      scaled >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(scaled);
  const bool keep_none = p == 1.0;
  const cpu::DropoutArgs args{source.const_data_ptr(),
                              output.mutable_data_ptr(),
                              source.numel(),
                              threshold,
                              keep_none,
                              keep_none ? 0.0 : 1.0 / (1.0 - p),
                              static_cast<uint64_t>(seed),
                              dtype};
  cpu::run_at_chosen_level(kDropoutKernels, args);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(detrx, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace detrx
