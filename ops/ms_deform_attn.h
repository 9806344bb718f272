// Multi-scale deformable attention (Deformable DETR, arXiv:2010.04159): shared declarations.
//
// The op's schemas live in ops/ms_deform_attn.cpp (TORCH_LIBRARY_FRAGMENT(detrx, m); the library
// itself is declared once, in ops/detrx.cpp); one kernel file per device registers them with
// TORCH_LIBRARY_IMPL(detrx, <Device>, m):
//   detrx::ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
//                                 attention_weights, im2col_step) -> output
//   detrx::ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_locations,
//                                  attention_weights, grad_output, im2col_step)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
// Shapes: value (B, S, heads, C); spatial_shapes (L, 2) int64 rows (H, W); level_start_index (L,)
// int64; sampling_locations (B, Q, heads, L, P, 2) normalised (x, y); attention_weights
// (B, Q, heads, L, P); output and grad_output (B, Q, heads * C).
//
// Dtypes: the table mmdet_detrx/ops/ms_deform_attn_dtypes.def (read by the Python side too) lists
// the supported (value, coordinate) pairs; sampling_locations and attention_weights share the
// coordinate dtype, value's or a wider one. Arithmetic runs in at::opmath_type<coordinate>
// (float32 for half / bfloat16 / float32, float64 for float64); output and grad_output have
// value's dtype, each gradient its input's.
//
// Errors: the checks raise ValueError (shapes, devices, index values) or TypeError (dtypes) in
// Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), naming the argument; they are the only checks on
// the native path (the Python wrapper does not repeat them).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace detrx {

// X-macro over the dtype table: defines DETRX_MSDA_DTYPE_PAIR(V, C) as `X(V, C)` for each row.
// The table lives beside the Python side that reads it too (one policy for C++ and Python).
#define DETRX_MSDA_DTYPE_TABLE "../mmdet_detrx/ops/ms_deform_attn_dtypes.def"

// Whether the op supports value of dtype `value` with sampling_locations / attention_weights of
// dtype `coordinate`.
bool is_supported_dtype_pair(at::ScalarType value, at::ScalarType coordinate);

// Type tags handed to the functor of dispatch_dtype_pair.
template <typename Value, typename Coordinate>
struct DtypePair {
  using value_t = Value;            // c10 scalar type of value / output / grad_output
  using coordinate_t = Coordinate;  // c10 scalar type of sampling_locations / attention_weights
};

// Calls f(DtypePair<V, C>{}) for the c10 scalar types of a supported pair; raises otherwise (the
// input check has rejected unsupported pairs with a clearer message before).
template <typename F>
void dispatch_dtype_pair(at::ScalarType value, at::ScalarType coordinate, const char* name,
                         F&& f) {
#define DETRX_MSDA_DTYPE_PAIR(V, C)                                                      \
  if (value == at::k##V && coordinate == at::k##C) {                                     \
    return f(DtypePair<c10::impl::ScalarTypeToCPPTypeT<at::k##V>,                         \
                       c10::impl::ScalarTypeToCPPTypeT<at::k##C>>{});                     \
  }
#include DETRX_MSDA_DTYPE_TABLE
#undef DETRX_MSDA_DTYPE_PAIR
  TORCH_CHECK_TYPE(false, name, ": unsupported dtypes: value ", value,
                   " with sampling_locations / attention_weights ", coordinate);
}

// A host copy of the level table (spatial_shapes / level_start_index), taken once per call. The
// input check validates this copy and the CPU kernels run on it, never on the tensors again: a
// thread writing to the index tensors meanwhile can change the result but cannot make a kernel
// read outside value. Also the `Levels` type of msda::check_levels.
struct LevelTable {
  struct Level {
    int64_t H, W, start;
  };
  std::vector<Level> levels;

  int64_t size() const { return static_cast<int64_t>(levels.size()); }
  int64_t height(int64_t level) const { return levels[level].H; }
  int64_t width(int64_t level) const { return levels[level].W; }
  int64_t start(int64_t level) const { return levels[level].start; }
};

// Checks everything a kernel relies on before it touches memory: ranks, consistent sizes, one
// device for all tensors, the dtype policy above, int64 index tensors, im2col_step > 0, and the
// values of the index tensors (msda::check_levels: positive H_l, W_l, sum_l H_l * W_l == S, and
// level_start_index == exclusive cumsum, in overflow-free arithmetic). Raises c10::ValueError /
// c10::TypeError (ValueError / TypeError in Python) naming the offending argument.
//
// Index tensors on the CPU are copied once (a few dozen bytes) into the returned LevelTable,
// which is what gets validated: the CPU kernels must run on it. Index tensors on another device
// are validated by validate_index_values (a host copy the first time a tensor is seen, then a
// cache hit) and an empty table is returned (the CUDA kernels stage the table per block and
// re-check it on the device); `host_sync_allowed` = false (the caller is being captured into a
// CUDA graph) turns a cache miss into an error instead of a copy.
LevelTable check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, int64_t im2col_step,
                                 bool host_sync_allowed = true);

// Additionally checks grad_output against the forward output shape (B, Q, heads * C), device and
// value's dtype; used by the backward kernels after check_ms_deform_attn_inputs.
void check_ms_deform_attn_grad_output(const at::Tensor& value,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& grad_output);

// Validates the values of spatial_shapes / level_start_index (int64, shapes (L, 2) / (L,), one
// device) against num_value tokens, raising a c10::ValueError that names the argument. A tensor pair
// validated before is recognised without reading it again: the cache holds weak references to
// both tensors with their version counters, data pointers, sizes and strides, so any in-place
// change through autograd-visible ops, a resize or a freed-and-reused tensor is a miss. Writes
// that bypass the version counter (`.data`, DLPack aliases) are not seen: on CUDA the kernels
// re-check the level table on the device and trap on an inconsistent one rather than read out of
// bounds. Inference tensors carry no version counter and are read on every call. Returns whether
// the result came from the cache.
bool validate_index_values(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                           int64_t num_value, bool host_sync_allowed = true);

}  // namespace detrx

// Callable unqualified from the device kernel files.
using detrx::check_ms_deform_attn_grad_output;
using detrx::check_ms_deform_attn_inputs;
