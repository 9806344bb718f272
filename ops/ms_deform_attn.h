// Multi-scale deformable attention (Deformable DETR, arXiv:2010.04159): shared declarations.
//
// The op schemas live in ops/ms_deform_attn.cpp (the single TORCH_LIBRARY(detrx, m) block); one
// kernel file per device registers them with TORCH_LIBRARY_IMPL(detrx, <Device>, m):
//   detrx::ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
//                                 attention_weights, im2col_step) -> output
//   detrx::ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_locations,
//                                  attention_weights, grad_output, im2col_step)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
// Shapes: value (B, S, heads, C); spatial_shapes (L, 2) int64 rows (H, W); level_start_index (L,)
// int64; sampling_locations (B, Q, heads, L, P, 2) normalised (x, y); attention_weights
// (B, Q, heads, L, P); output and grad_output (B, Q, heads * C).
#pragma once

#include <ATen/core/Tensor.h>

namespace detrx {

// Checks everything a kernel relies on before it touches memory: ranks, consistent sizes,
// sum_l H_l * W_l == S, int64 spatial_shapes / level_start_index with level_start_index equal to
// the exclusive cumulative sum of H_l * W_l, one device for all tensors, floating
// sampling_locations / attention_weights of value's dtype, and im2col_step > 0. Raises
// c10::Error (RuntimeError in Python) naming the offending argument. Reads the values of the two
// small index tensors (copied to the CPU if needed).
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, int64_t im2col_step);

// Additionally checks grad_output against the forward output shape (B, Q, heads * C), device and
// dtype; used by the backward kernels after check_ms_deform_attn_inputs.
void check_ms_deform_attn_grad_output(const at::Tensor& value,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& grad_output);

}  // namespace detrx

// Callable unqualified from the device kernel files.
using detrx::check_ms_deform_attn_grad_output;
using detrx::check_ms_deform_attn_inputs;
