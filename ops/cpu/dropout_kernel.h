// The CPU kernel of `detrx::dropout` (ops/dropout.cpp), compiled once per instruction-set level
// (ops/cpu/dropout_kernel_impl.h, ops/cpu/isa/dropout_kernel_<ISA>.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace detrx {
namespace cpu {

struct DropoutArgs {
  const void* input;   // numel elements of dtype, contiguous
  void* output;        // numel elements of dtype, contiguous; every element written
  int64_t numel;
  uint32_t threshold;  // element i is kept when its 32-bit draw is >= threshold
  bool keep_none;      // p = 1: every element is multiplied by 0
  double scale;        // 1 / (1 - p): the factor of a kept element
  uint64_t seed;
  at::ScalarType dtype;  // float, double, half, bfloat16
};

#define DETRX_DECLARE_DROPOUT_CPU_KERNEL(ISA) \
  namespace ISA {                             \
  void dropout(const DropoutArgs&);           \
  }

DETRX_DECLARE_DROPOUT_CPU_KERNEL(DEFAULT)
#ifdef DETRX_CPU_AVX2
DETRX_DECLARE_DROPOUT_CPU_KERNEL(AVX2)
#endif
#ifdef DETRX_CPU_AVX512
DETRX_DECLARE_DROPOUT_CPU_KERNEL(AVX512)
#endif
#undef DETRX_DECLARE_DROPOUT_CPU_KERNEL

}  // namespace cpu
}  // namespace detrx
