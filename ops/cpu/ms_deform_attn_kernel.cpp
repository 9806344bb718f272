// CPU registration of multi-scale deformable attention (Deformable DETR, arXiv:2010.04159):
// validation (check_ms_deform_attn_inputs, which also takes the one read of the index tensors),
// allocation, and the call of the sampling kernels at the instruction-set level chosen when the
// library loaded (cpu_capability.h; the kernels themselves are ms_deform_attn_kernel_impl.h,
// compiled once per level). im2col_step (mmcv's signature) is validated and otherwise ignored,
// here as in the CUDA kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/cpu_capability.h"
#include "cpu/ms_deform_attn_kernel.h"
#include "ms_deform_attn.h"

namespace detrx {
namespace {

// float16 value is widened to float32 once up front: c10::Half -> float has no fast scalar
// conversion without F16C, and every value row is read many times (once per sampling point
// hitting it). bfloat16 -> float is a shift and stays inline in the kernels.
at::Tensor widen_value(const at::Tensor& value) {
  return value.scalar_type() == at::kHalf ? value.to(at::kFloat) : value;
}

// The CPU backward plans the points of a query with int32 pixel coordinates (so that the loop
// over points vectorises): every level must fit. A level of 2^30 columns already needs 2^30
// tokens per (batch, head).
constexpr int64_t kMaxBackwardLevelSide = int64_t(1) << 30;

void check_backward_level_sizes(const LevelTable& table) {
  for (int64_t level = 0; level < table.size(); ++level) {
    TORCH_CHECK_VALUE(table.height(level) <= kMaxBackwardLevelSide &&
                          table.width(level) <= kMaxBackwardLevelSide,
                      "ms_deform_attn_backward (CPU): spatial_shapes[", level, "] = (",
                      table.height(level), ", ", table.width(level),
                      ") is larger than the CPU backward supports (at most 2^30 rows and 2^30 "
                      "columns per level)");
  }
}

void (*const kForwardKernels[3])(const cpu::MsdaForwardArgs&) =
    DETRX_CPU_LEVEL_KERNELS(ms_deform_attn_forward);
void (*const kBackwardKernels[3])(const cpu::MsdaBackwardArgs&) =
    DETRX_CPU_LEVEL_KERNELS(ms_deform_attn_backward);

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, int64_t im2col_step) {
  // The index tensors are read once, here: the kernel runs on the validated copy.
  const LevelTable table =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, im2col_step);
  const int64_t B = value.size(0), S = value.size(1), heads = value.size(2), C = value.size(3);
  const int64_t Q = sampling_locations.size(1), P = sampling_locations.size(4);
  at::Tensor output = at::empty({B, Q, heads * C}, value.options());
  if (output.numel() == 0) return output;

  const at::Tensor value_c = widen_value(value).contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const cpu::MsdaForwardArgs args{value_c.const_data_ptr(),
                                  &table,
                                  locations_c.const_data_ptr(),
                                  weights_c.const_data_ptr(),
                                  output.mutable_data_ptr(),
                                  value.scalar_type(),
                                  sampling_locations.scalar_type(),
                                  B, S, heads, C, Q, P};
  cpu::run_at_chosen_level(kForwardKernels, args);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const at::Tensor& grad_output, int64_t im2col_step) {
  const LevelTable table =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, im2col_step);
  check_ms_deform_attn_grad_output(value, sampling_locations, grad_output);
  check_backward_level_sizes(table);
  const int64_t B = value.size(0), S = value.size(1), heads = value.size(2), C = value.size(3);
  const int64_t Q = sampling_locations.size(1), P = sampling_locations.size(4);

  // Without sampling points or without channels (C = 0: value is empty) every gradient is zero.
  const bool has_work = attention_weights.numel() > 0 && value.numel() > 0;
  // Otherwise the kernel writes every element, zeroing grad_value itself (every row belongs to
  // exactly one task).
  const auto make = [&](const at::Tensor& like, at::ScalarType dtype) {
    return has_work ? at::empty(like.sizes(), like.options().dtype(dtype))
                    : at::zeros(like.sizes(), like.options().dtype(dtype));
  };
  // grad_value is accumulated in the arithmetic type and rounded to value's dtype once, by
  // the kernel.
  at::Tensor grad_value = make(value, value.scalar_type());
  at::Tensor grad_sampling_locations =
      make(sampling_locations, sampling_locations.scalar_type());
  at::Tensor grad_attention_weights = make(attention_weights, attention_weights.scalar_type());
  if (has_work) {
    const at::Tensor value_c = widen_value(value).contiguous();
    const at::Tensor locations_c = sampling_locations.contiguous();
    const at::Tensor weights_c = attention_weights.contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();
    const cpu::MsdaBackwardArgs args{value_c.const_data_ptr(),
                                     &table,
                                     locations_c.const_data_ptr(),
                                     weights_c.const_data_ptr(),
                                     grad_output_c.const_data_ptr(),
                                     grad_value.mutable_data_ptr(),
                                     grad_sampling_locations.mutable_data_ptr(),
                                     grad_attention_weights.mutable_data_ptr(),
                                     value.scalar_type(),
                                     sampling_locations.scalar_type(),
                                     B, S, heads, C, Q, P};
    cpu::run_at_chosen_level(kBackwardKernels, args);
  }
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(detrx, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace detrx
