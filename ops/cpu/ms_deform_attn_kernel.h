// The per-ISA entry points of the CPU multi-scale deformable attention kernels
// (ms_deform_attn_kernel_impl.h, compiled once per instruction set) and their arguments.
// ops/cpu/ms_deform_attn_kernel.cpp validates and allocates, then calls the level that
// cpu_capability() chose at load time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "ms_deform_attn.h"

namespace detrx {
namespace cpu {

// All tensors contiguous. value holds value_t<scalar_t> (float16 value widened to float32).
struct MsdaForwardArgs {
  const void* value;               // (B, S, heads, C)
  const LevelTable* levels;        // validated snapshot of spatial_shapes / level_start_index
  const void* sampling_locations;  // (B, Q, heads, L, P, 2), coordinate dtype
  const void* attention_weights;   // (B, Q, heads, L, P), coordinate dtype
  void* output;                    // (B, Q, heads * C), value's dtype
  at::ScalarType value_dtype, coordinate_dtype;
  int64_t B, S, heads, C, Q, P;
};

struct MsdaBackwardArgs {
  const void* value;
  const LevelTable* levels;
  const void* sampling_locations;
  const void* attention_weights;
  const void* grad_output;        // (B, Q, heads * C), value's dtype
  void* grad_value;               // (B, S, heads, C), value's dtype; every element written
  void* grad_sampling_locations;  // coordinate dtype
  void* grad_attention_weights;   // coordinate dtype
  at::ScalarType value_dtype, coordinate_dtype;
  int64_t B, S, heads, C, Q, P;
};

#define DETRX_DECLARE_MSDA_CPU_KERNELS(ISA)              \
  namespace ISA {                                        \
  void ms_deform_attn_forward(const MsdaForwardArgs&);   \
  void ms_deform_attn_backward(const MsdaBackwardArgs&); \
  }

DETRX_DECLARE_MSDA_CPU_KERNELS(DEFAULT)
#ifdef DETRX_CPU_AVX2
DETRX_DECLARE_MSDA_CPU_KERNELS(AVX2)
#endif
#ifdef DETRX_CPU_AVX512
DETRX_DECLARE_MSDA_CPU_KERNELS(AVX512)
#endif
#undef DETRX_DECLARE_MSDA_CPU_KERNELS

}  // namespace cpu
}  // namespace detrx
