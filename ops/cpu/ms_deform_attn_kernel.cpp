// CPU kernels of multi-scale deformable attention (Deformable DETR, arXiv:2010.04159, Eq. 3).
//
//   output[b, q, head, :] = sum_{level, point} A[b, q, head, level, point] *
//                           bilinear(value[b, level, :, head, :], loc[b, q, head, level, point])
//
// Forward: parallel over (batch, query); each task owns its output rows.
// Backward: parallel over (batch, head) or (batch, head, level); a task loops over all queries
// and points in a fixed order and is the only writer of its slice
// grad_value[b, level tokens, head, :] and of the location / attention gradients of its
// (b, :, head, level, :) entries. No atomics, no races: the result is bitwise identical for any
// thread count.
// Dtypes follow the policy in ops/ms_deform_attn.h: scalar_t is value's (and the output's) c10
// type, coord_t that of sampling_locations / attention_weights (value's or a wider one: float /
// double for half / bfloat16 value, double for float). Arithmetic runs in
// acc_t = at::opmath_type<coord_t> (float for half / bfloat16 / float, double for double);
// grad_value is accumulated in an acc_t buffer and rounded to value's dtype once at the end.
// im2col_step (mmcv's signature) is validated and otherwise ignored, here as in the CUDA kernel.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace detrx {
namespace {

using msda::BilinearCorners;

using Level = LevelTable::Level;

// Element type the kernels read value in. c10::Half -> float has no fast scalar conversion
// without F16C, and every value row is read many times (once per sampling point hitting it), so
// half value is widened to float once up front; bfloat16 -> float is a shift and stays inline.
// The arithmetic is the same fp32 accumulation either way.
template <typename scalar_t>
using value_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;

at::Tensor widen_value(const at::Tensor& value) {
  return value.scalar_type() == at::kHalf ? value.to(at::kFloat) : value;
}

// Items per at::parallel_for chunk: about 32k multiply-adds (ATen's own grain), so that tiny
// problems stay on one thread.
int64_t grain_size(int64_t cost_per_item) {
  constexpr int64_t kGrainCost = 32768;
  return std::max<int64_t>(1, kGrainCost / std::max<int64_t>(1, cost_per_item));
}

// acc[c] += sum_i w[i] * v_i[c]. Corners outside the map point at a row of zeros with w = 0, so
// the loop has no branch and vectorises over channels.
template <typename scalar_t, typename acc_t>
inline void accumulate_corners(acc_t* __restrict acc, const scalar_t* __restrict v0,
                               const scalar_t* __restrict v1, const scalar_t* __restrict v2,
                               const scalar_t* __restrict v3, const acc_t (&w)[4], int64_t C) {
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < C; ++c) {
    acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
              w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
  }
}

// One pass over the channels of a sampling point in the backward:
//   dot[i] = <grad_out, v_i>        (for the location and attention gradients)
//   gv_i  += aw[i] * grad_out       (the value gradient, aw = attention weight * bilinear weight)
// The dot products use kLanes independent partial sums (summed in a fixed order at the end) so
// the compiler can vectorise them without reassociating floating-point additions.
template <typename scalar_t, typename acc_t>
inline void corner_dots_and_scatter(const acc_t* __restrict grad_out,
                                    const scalar_t* __restrict v0, const scalar_t* __restrict v1,
                                    const scalar_t* __restrict v2, const scalar_t* __restrict v3,
                                    acc_t* __restrict gv0, acc_t* __restrict gv1,
                                    acc_t* __restrict gv2, acc_t* __restrict gv3,
                                    const acc_t (&aw)[4], int64_t C, acc_t (&dot)[4]) {
  constexpr int kLanes = 8;
  acc_t d0[kLanes] = {}, d1[kLanes] = {}, d2[kLanes] = {}, d3[kLanes] = {};
  const acc_t aw0 = aw[0], aw1 = aw[1], aw2 = aw[2], aw3 = aw[3];
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t g = grad_out[c + j];
      d0[j] += g * static_cast<acc_t>(v0[c + j]);
      d1[j] += g * static_cast<acc_t>(v1[c + j]);
      d2[j] += g * static_cast<acc_t>(v2[c + j]);
      d3[j] += g * static_cast<acc_t>(v3[c + j]);
      gv0[c + j] += aw0 * g;
      gv1[c + j] += aw1 * g;
      gv2[c + j] += aw2 * g;
      gv3[c + j] += aw3 * g;
    }
  }
  for (; c < C; ++c) {
    const acc_t g = grad_out[c];
    d0[0] += g * static_cast<acc_t>(v0[c]);
    d1[0] += g * static_cast<acc_t>(v1[c]);
    d2[0] += g * static_cast<acc_t>(v2[c]);
    d3[0] += g * static_cast<acc_t>(v3[c]);
    gv0[c] += aw0 * g;
    gv1[c] += aw1 * g;
    gv2[c] += aw2 * g;
    gv3[c] += aw3 * g;
  }
  dot[0] = dot[1] = dot[2] = dot[3] = acc_t(0);
  for (int j = 0; j < kLanes; ++j) {
    dot[0] += d0[j];
    dot[1] += d1[j];
    dot[2] += d2[j];
    dot[3] += d3[j];
  }
}

// Software prefetch of the first bytes of a row (the hardware prefetcher follows the rest).
template <typename T>
inline void prefetch_row(const T* data, int64_t n, bool for_write = false) {
  const char* bytes = reinterpret_cast<const char*>(data);
  const int64_t size = std::min<int64_t>(n * static_cast<int64_t>(sizeof(T)), 256);
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t offset = 0; offset < size; offset += 64) {
    if (for_write) {
      __builtin_prefetch(bytes + offset, 1);
    } else {
      __builtin_prefetch(bytes + offset);
    }
  }
#else
  (void)bytes, (void)size, (void)for_write;  // a hint only: nothing to do without the builtin
#endif
}

constexpr int64_t kPrefetchQueries = 4;

// The value rows a sampling point gathers from, planned before any of them is read. Planning all
// points of a query first and prefetching their rows lets the cache misses of the (mostly
// scattered) gathers overlap instead of being paid one after the other.
template <typename value_type, typename acc_t>
struct SamplePlan {
  bool inside;                    // false: all four corners off the map, the point adds nothing
  acc_t attention;                // A[b, q, head, level, point]
  BilinearCorners<acc_t> corners;
  const value_type* rows[4];      // value rows of the corners (a row of zeros when off the map)
};

// Plans one sampling point; returns whether it touches the map.
template <typename value_type, typename acc_t, typename coord_t>
inline bool plan_sample(const coord_t* sampling_locations, const coord_t* attention_weights,
                        int64_t attn_idx, const Level& lv, const value_type* value_level,
                        int64_t token_stride, const value_type* zero_row, int64_t C,
                        SamplePlan<value_type, acc_t>& plan) {
  const acc_t x = msda::normalized_to_pixel(
      static_cast<acc_t>(sampling_locations[2 * attn_idx]), lv.W);
  const acc_t y = msda::normalized_to_pixel(
      static_cast<acc_t>(sampling_locations[2 * attn_idx + 1]), lv.H);
  plan.inside = msda::bilinear_corners(x, y, lv.H, lv.W, plan.corners);
  if (!plan.inside) return false;
  plan.attention = static_cast<acc_t>(attention_weights[attn_idx]);
  for (int i = 0; i < 4; ++i) {
    plan.rows[i] = plan.corners.inside[i]
                       ? value_level + plan.corners.offset[i] * token_stride
                       : zero_row;
    if (plan.corners.inside[i]) prefetch_row(plan.rows[i], C);
  }
  return true;
}

template <typename scalar_t, typename coord_t>
void forward_kernel(const value_t<scalar_t>* value, const std::vector<Level>& levels,
                    const coord_t* sampling_locations, const coord_t* attention_weights,
                    scalar_t* output, int64_t B, int64_t S, int64_t heads, int64_t C, int64_t Q,
                    int64_t P) {
  using acc_t = at::opmath_type<coord_t>;
  using value_type = value_t<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
  const int64_t token_stride = heads * C;  // distance between two tokens of one (batch, head)
  const int64_t samples = heads * L * P;   // sampling points of one query
  const int64_t cost = samples * (4 * C + 32);

  at::parallel_for(0, B * Q, grain_size(cost), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    const std::vector<value_type> zero_row(C, value_type(0));
    std::vector<SamplePlan<value_type, acc_t>> plans(samples);
    for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
      const int64_t batch = batch_query / Q, query = batch_query % Q;
      // Pass 1: corners of every (head, level, point) of this query, rows prefetched.
      for (int64_t head = 0; head < heads; ++head) {
        for (int64_t level = 0; level < L; ++level) {
          const Level& lv = levels[level];
          const value_type* value_level =
              value + msda::value_index(batch, lv.start, head, 0, S, heads, C);
          for (int64_t point = 0; point < P; ++point) {
            const int64_t attn_idx =
                msda::attention_weight_index(batch, query, head, level, point, Q, heads, L, P);
            plan_sample(sampling_locations, attention_weights, attn_idx, lv, value_level,
                        token_stride, zero_row.data(), C, plans[attn_idx % samples]);
          }
        }
      }
      // Pass 2: gather and accumulate, one head (C output channels) at a time.
      for (int64_t head = 0; head < heads; ++head) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t sample = head * L * P; sample < (head + 1) * L * P; ++sample) {
          const SamplePlan<value_type, acc_t>& plan = plans[sample];
          if (!plan.inside) continue;
          acc_t w[4];
          for (int i = 0; i < 4; ++i) w[i] = plan.attention * plan.corners.weight[i];
          accumulate_corners(acc.data(), plan.rows[0], plan.rows[1], plan.rows[2],
                             plan.rows[3], w, C);
        }
        scalar_t* out = output + batch_query * heads * C + head * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t, typename coord_t>
void backward_kernel(const value_t<scalar_t>* value, const std::vector<Level>& levels,
                     const coord_t* sampling_locations, const coord_t* attention_weights,
                     const scalar_t* grad_output,
                     at::opmath_type<coord_t>* grad_value,  // uninitialised, zeroed here
                     coord_t* grad_sampling_locations, coord_t* grad_attention_weights,
                     int64_t B, int64_t S, int64_t heads, int64_t C, int64_t Q, int64_t P) {
  using acc_t = at::opmath_type<coord_t>;
  using value_type = value_t<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
  const int64_t token_stride = heads * C;
  // A task owns grad_value[batch, tokens of its levels, head, :]. It covers all levels when the
  // (batch, head) pairs alone spread evenly over the threads (grad_output rows are then read
  // once), else a single level: per-level tasks all cost Q * P samples, so L times more of them
  // balance better. Either way each grad_value element receives its contributions in the same
  // order (queries ascending, then points), so the result does not depend on the split.
  const int64_t threads = at::get_num_threads(), pairs = B * heads;
  const bool pairs_balance = pairs % threads == 0 || pairs >= 4 * threads;
  const int64_t level_groups = pairs_balance ? 1 : L;
  const int64_t levels_per_task = L / level_groups;
  const int64_t samples = levels_per_task * P;  // sampling points of one query in a task
  const int64_t cost = Q * samples * (8 * C + 64);

  at::parallel_for(0, B * heads * level_groups, grain_size(cost), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_out(C);
    std::vector<acc_t> scratch(4 * C);  // value-gradient sink of out-of-map corners
    const std::vector<value_type> zero_row(C, value_type(0));
    std::vector<SamplePlan<value_type, acc_t>> plans(samples);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t batch = task / (heads * level_groups);
      const int64_t head = (task / level_groups) % heads;
      const int64_t level_begin = (task % level_groups) * levels_per_task;
      // Zero the owned grad_value rows here rather than up front: the memset runs in parallel
      // and the pages are first touched by the thread that accumulates into them.
      for (int64_t level = level_begin; level < level_begin + levels_per_task; ++level) {
        const Level& lv = levels[level];
        for (int64_t token = lv.start; token < lv.start + lv.H * lv.W; ++token) {
          acc_t* row = grad_value + msda::value_index(batch, token, head, 0, S, heads, C);
          std::fill(row, row + C, acc_t(0));
        }
      }

      for (int64_t query = 0; query < Q; ++query) {
        const scalar_t* g = grad_output + (batch * Q + query) * heads * C + head * C;
        const int64_t attn_begin =
            msda::attention_weight_index(batch, query, head, level_begin, 0, Q, heads, L, P);
        if (query + kPrefetchQueries < Q) {
          // Inputs of consecutive queries are heads * ... apart: too far for the hardware
          // prefetcher to follow, so fetch those of a query a few iterations ahead.
          const int64_t attn_ahead = attn_begin + kPrefetchQueries * heads * L * P;
          prefetch_row(g + kPrefetchQueries * heads * C, C);
          prefetch_row(attention_weights + attn_ahead, samples);
          prefetch_row(sampling_locations + 2 * attn_ahead, 2 * samples);
        }
        // Pass 1: corners of this query's points in the task's levels, rows prefetched (the
        // grad_value rows for writing).
        for (int64_t sample = 0; sample < samples; ++sample) {
          const Level& lv = levels[level_begin + sample / P];
          const int64_t level_offset = msda::value_index(batch, lv.start, head, 0, S, heads, C);
          SamplePlan<value_type, acc_t>& plan = plans[sample];
          if (plan_sample(sampling_locations, attention_weights, attn_begin + sample, lv,
                          value + level_offset, token_stride, zero_row.data(), C, plan)) {
            for (int i = 0; i < 4; ++i) {
              if (plan.corners.inside[i]) {
                prefetch_row(grad_value + level_offset + plan.corners.offset[i] * token_stride,
                             C, /*for_write=*/true);
              }
            }
          }
        }
        for (int64_t c = 0; c < C; ++c) grad_out[c] = static_cast<acc_t>(g[c]);
        // Pass 2: the four dot products with grad_out, the grad_value scatter, and the
        // location / attention gradients of each point.
        for (int64_t sample = 0; sample < samples; ++sample) {
          const int64_t attn_idx = attn_begin + sample;
          const SamplePlan<value_type, acc_t>& plan = plans[sample];
          if (!plan.inside) {
            grad_attention_weights[attn_idx] = coord_t(0);
            grad_sampling_locations[2 * attn_idx] = coord_t(0);
            grad_sampling_locations[2 * attn_idx + 1] = coord_t(0);
            continue;
          }
          const Level& lv = levels[level_begin + sample / P];
          acc_t* grad_value_level =
              grad_value + msda::value_index(batch, lv.start, head, 0, S, heads, C);
          const BilinearCorners<acc_t>& corners = plan.corners;
          acc_t* gv[4];
          acc_t aw[4];
          for (int i = 0; i < 4; ++i) {
            gv[i] = corners.inside[i] ? grad_value_level + corners.offset[i] * token_stride
                                      : scratch.data() + i * C;
            aw[i] = plan.attention * corners.weight[i];
          }
          acc_t dot[4];
          corner_dots_and_scatter(grad_out.data(), plan.rows[0], plan.rows[1], plan.rows[2],
                                  plan.rows[3], gv[0], gv[1], gv[2], gv[3], aw, C, dot);
          acc_t sampled = 0, dsampled_dx = 0, dsampled_dy = 0;
          for (int i = 0; i < 4; ++i) {
            sampled += corners.weight[i] * dot[i];
            dsampled_dx += corners.dweight_dx[i] * dot[i];
            dsampled_dy += corners.dweight_dy[i] * dot[i];
          }
          grad_attention_weights[attn_idx] = static_cast<coord_t>(sampled);
          // d x_pixel / d x_normalised = W and likewise H for y.
          grad_sampling_locations[2 * attn_idx] =
              static_cast<coord_t>(plan.attention * static_cast<acc_t>(lv.W) * dsampled_dx);
          grad_sampling_locations[2 * attn_idx + 1] =
              static_cast<coord_t>(plan.attention * static_cast<acc_t>(lv.H) * dsampled_dy);
        }
      }
    }
  });
}

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
  dispatch_dtype_pair(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward_cpu",
      [&](auto types) {
        using scalar_t = typename decltype(types)::value_t;
        using coord_t = typename decltype(types)::coordinate_t;
        forward_kernel<scalar_t, coord_t>(value_c.const_data_ptr<value_t<scalar_t>>(),
                                          table.levels,
                                          locations_c.const_data_ptr<coord_t>(),
                                          weights_c.const_data_ptr<coord_t>(),
                                          output.mutable_data_ptr<scalar_t>(), B, S, heads, C, Q,
                                          P);
      });
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
  const int64_t B = value.size(0), S = value.size(1), heads = value.size(2), C = value.size(3);
  const int64_t Q = sampling_locations.size(1), P = sampling_locations.size(4);

  const auto acc_dtype = at::toOpMathType(sampling_locations.scalar_type());
  // Without sampling points or without channels (C = 0: value is empty) every gradient is zero.
  const bool has_work = attention_weights.numel() > 0 && value.numel() > 0;
  // Otherwise the kernel writes every element, zeroing grad_value itself (every row belongs to
  // exactly one task).
  const auto make = [&](const at::Tensor& like, at::ScalarType dtype) {
    return has_work ? at::empty(like.sizes(), like.options().dtype(dtype))
                    : at::zeros(like.sizes(), like.options().dtype(dtype));
  };
  at::Tensor grad_value = make(value, acc_dtype);
  at::Tensor grad_sampling_locations =
      make(sampling_locations, sampling_locations.scalar_type());
  at::Tensor grad_attention_weights = make(attention_weights, attention_weights.scalar_type());
  if (has_work) {
    const at::Tensor value_c = widen_value(value).contiguous();
    const at::Tensor locations_c = sampling_locations.contiguous();
    const at::Tensor weights_c = attention_weights.contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();
    dispatch_dtype_pair(
        value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward_cpu",
        [&](auto types) {
          using scalar_t = typename decltype(types)::value_t;
          using coord_t = typename decltype(types)::coordinate_t;
          backward_kernel<scalar_t, coord_t>(
              value_c.const_data_ptr<value_t<scalar_t>>(), table.levels,
              locations_c.const_data_ptr<coord_t>(), weights_c.const_data_ptr<coord_t>(),
              grad_output_c.const_data_ptr<scalar_t>(),
              grad_value.mutable_data_ptr<at::opmath_type<coord_t>>(),
              grad_sampling_locations.mutable_data_ptr<coord_t>(),
              grad_attention_weights.mutable_data_ptr<coord_t>(), B, S, heads, C, Q, P);
        });
  }
  if (grad_value.scalar_type() != value.scalar_type()) {
    grad_value = grad_value.to(value.scalar_type());
  }
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(detrx, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace detrx
