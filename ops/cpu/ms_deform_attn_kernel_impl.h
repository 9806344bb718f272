// The CPU sampling kernels of multi-scale deformable attention (Deformable DETR, arXiv:2010.04159,
// Eq. 3), compiled once per instruction set: ops/cpu/isa/ms_deform_attn_kernel_<ISA>.cpp defines
// CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and includes this file; setup.py compiles each with its
// ISA's flags (-mavx2 -mfma ..., see cpu_capability.h) and ops/cpu/ms_deform_attn_kernel.cpp calls
// the level chosen at load time. Everything here lives in namespace detrx::cpu::CPU_CAPABILITY,
// the helpers in an anonymous namespace inside it (internal linkage: an ISA's code can only run
// when that ISA was chosen).
//
//   output[b, q, head, :] = sum_{level, point} A[b, q, head, level, point] *
//                           bilinear(value[b, level, :, head, :], loc[b, q, head, level, point])
//
// Forward: parallel over (batch, query); each task owns its output rows.
// Backward: parallel over (batch, head) or (batch, head, level); a task loops over all queries
// and points in a fixed order and is the only writer of its slice
// grad_value[b, level tokens, head, :] and of the location / attention gradients of its
// (b, :, head, level, :) entries. No atomics, no races: the result is bitwise identical for any
// thread count (at a given ISA level; levels differ in the last bits: FMA contraction).
// Dtypes follow ms_deform_attn_dtypes.def: scalar_t is value's (and the output's) c10 type,
// coord_t that of sampling_locations / attention_weights. Arithmetic runs in
// acc_t = at::opmath_type<coord_t>; grad_value is accumulated in an acc_t buffer (rounded to
// value's dtype by the caller).
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including this file"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/ms_deform_attn_kernel.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace detrx {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using Level = LevelTable::Level;

// Element type the kernels read value in. c10::Half -> float has no fast scalar conversion
// without F16C, and every value row is read many times (once per sampling point hitting it), so
// half value is widened to float once up front; bfloat16 -> float is a shift and stays inline.
// The arithmetic is the same fp32 accumulation either way.
template <typename scalar_t>
using value_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;

// Items per at::parallel_for chunk: about 32k multiply-adds (ATen's own grain), so that tiny
// problems stay on one thread.
int64_t grain_size(int64_t cost_per_item) {
  constexpr int64_t kGrainCost = 32768;
  return std::max<int64_t>(1, kGrainCost / std::max<int64_t>(1, cost_per_item));
}

// acc[c] += sum_i w[i] * v_i[c]. Corners outside the map point at a row of zeros with w = 0, so
// the loop has no branch and vectorises over channels.
template <int kC, typename scalar_t, typename acc_t>
inline void accumulate_corners(acc_t* __restrict acc, const scalar_t* __restrict v0,
                               const scalar_t* __restrict v1, const scalar_t* __restrict v2,
                               const scalar_t* __restrict v3, const acc_t (&w)[4],
                               int64_t runtime_C) {
  const int64_t C = kC > 0 ? kC : runtime_C;
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < C; ++c) {
    acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
              w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
  }
}

// Sum of 8 partial sums as a fixed pairwise tree (halves, then quarters, then the last pair):
// the same order on every call (deterministic) and 3 dependent additions instead of 8, in the
// shape of a vector reduction (high half + low half, ...).
template <typename acc_t>
inline acc_t sum_lanes(const acc_t (&d)[8]) {
  const acc_t s0 = d[0] + d[4], s1 = d[1] + d[5], s2 = d[2] + d[6], s3 = d[3] + d[7];
  return (s0 + s2) + (s1 + s3);
}

// One pass over the channels of a sampling point in the backward:
//   dot[i] = <grad_out, v_i>        (for the location and attention gradients)
//   gv_i  += aw[i] * grad_out       (the value gradient, aw = attention weight * bilinear weight)
// The dot products use kLanes independent partial sums (summed by sum_lanes in a fixed order) so
// the compiler can vectorise them without reassociating floating-point additions.
template <int kC, typename scalar_t, typename acc_t>
inline void corner_dots_and_scatter(const acc_t* __restrict grad_out,
                                    const scalar_t* __restrict v0, const scalar_t* __restrict v1,
                                    const scalar_t* __restrict v2, const scalar_t* __restrict v3,
                                    acc_t* __restrict gv0, acc_t* __restrict gv1,
                                    acc_t* __restrict gv2, acc_t* __restrict gv3,
                                    const acc_t (&aw)[4], int64_t runtime_C, acc_t (&dot)[4]) {
  const int64_t C = kC > 0 ? kC : runtime_C;
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
  // The remaining C % kLanes channels (none for the compiled-in kC = 32: no dead loop).
  for (; (kC == 0 || kC % kLanes != 0) && c < C; ++c) {
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
  dot[0] = sum_lanes(d0);
  dot[1] = sum_lanes(d1);
  dot[2] = sum_lanes(d2);
  dot[3] = sum_lanes(d3);
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

// Both passes plan every sampling point of a query before reading any value row: planning all
// points first and prefetching their rows lets the cache misses of the (mostly scattered)
// gathers overlap instead of being paid one after the other.

// The forward's plan of one sampling point: only what the gather needs (no gradients of the
// bilinear weights), written without zero-filling a BilinearCorners. Same arithmetic as
// bilinear_corners: weight[i] = A * bilinear weight of corner i; a corner off the map reads a
// row of zeros with bilinear weight 0.
template <typename value_type, typename acc_t>
struct GatherPlan {
  bool inside;  // false: all four corners off the map, the point adds nothing
  acc_t weight[4];
  const value_type* rows[4];
};

template <typename value_type, typename acc_t, typename coord_t>
inline void plan_gather(const coord_t* location, coord_t attention, const Level& lv,
                        const value_type* value_level, int64_t token_stride,
                        const value_type* zero_row, int64_t C,
                        GatherPlan<value_type, acc_t>& plan) {
  const acc_t x = msda::normalized_to_pixel(static_cast<acc_t>(location[0]), lv.W);
  const acc_t y = msda::normalized_to_pixel(static_cast<acc_t>(location[1]), lv.H);
  // Written as !(inside) so that NaN coordinates are rejected too (as in bilinear_corners).
  plan.inside = x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(lv.W) &&
                y < static_cast<acc_t>(lv.H);
  if (!plan.inside) return;
  const int64_t x0 = msda::floor_to_int(x), y0 = msda::floor_to_int(y);
  const acc_t lx = x - static_cast<acc_t>(x0), ly = y - static_cast<acc_t>(y0);
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const acc_t bilinear[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const bool x_in[2] = {x0 >= 0, x0 + 1 < lv.W}, y_in[2] = {y0 >= 0, y0 + 1 < lv.H};
  const acc_t a = static_cast<acc_t>(attention);
  for (int i = 0; i < 4; ++i) {
    const int dx = i & 1, dy = i >> 1;
    const bool in = x_in[dx] && y_in[dy];
    plan.weight[i] = a * (in ? bilinear[i] : acc_t(0));
    plan.rows[i] = in ? value_level + ((y0 + dy) * lv.W + x0 + dx) * token_stride : zero_row;
    if (in) prefetch_row(plan.rows[i], C);
  }
}

// The backward's plan of one sampling point: the bilinear weights and their derivatives (0 for
// corners off the map, as in bilinear_corners), the value rows read (a row of zeros off the map)
// and the grad_value rows written (a scratch row off the map).
template <typename value_type, typename acc_t>
struct ScatterPlan {
  bool inside;  // false: all four corners off the map, every gradient of the point is zero
  acc_t attention;
  acc_t weight[4], dweight_dx[4], dweight_dy[4];
  const value_type* rows[4];
  acc_t* grad_rows[4];
};

template <typename value_type, typename acc_t, typename coord_t>
inline void plan_scatter(const coord_t* location, coord_t attention, const Level& lv,
                         acc_t width, acc_t height, const value_type* value_level,
                         acc_t* grad_value_level, int64_t token_stride,
                         const value_type* zero_row, acc_t* scratch, int64_t C,
                         ScatterPlan<value_type, acc_t>& plan) {
  const acc_t x = static_cast<acc_t>(location[0]) * width - acc_t(0.5);  // normalized_to_pixel
  const acc_t y = static_cast<acc_t>(location[1]) * height - acc_t(0.5);
  plan.inside = x > acc_t(-1) && y > acc_t(-1) && x < width && y < height;
  if (!plan.inside) return;
  plan.attention = static_cast<acc_t>(attention);
  const int64_t x0 = msda::floor_to_int(x), y0 = msda::floor_to_int(y);
  const acc_t lx = x - static_cast<acc_t>(x0), ly = y - static_cast<acc_t>(y0);
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const acc_t weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t dweight_dx[4] = {-hy, hy, -ly, ly};
  const acc_t dweight_dy[4] = {-hx, -lx, hx, lx};
  const bool x_in[2] = {x0 >= 0, x0 + 1 < lv.W}, y_in[2] = {y0 >= 0, y0 + 1 < lv.H};
  for (int i = 0; i < 4; ++i) {
    const int dx = i & 1, dy = i >> 1;
    const bool in = x_in[dx] && y_in[dy];
    const int64_t offset = ((y0 + dy) * lv.W + x0 + dx) * token_stride;
    plan.weight[i] = in ? weight[i] : acc_t(0);
    plan.dweight_dx[i] = in ? dweight_dx[i] : acc_t(0);
    plan.dweight_dy[i] = in ? dweight_dy[i] : acc_t(0);
    plan.rows[i] = in ? value_level + offset : zero_row;
    plan.grad_rows[i] = in ? grad_value_level + offset : scratch + i * C;
    if (in) {
      prefetch_row(plan.rows[i], C);
      prefetch_row(plan.grad_rows[i], C, /*for_write=*/true);
    }
  }
}

template <int kC, typename scalar_t, typename coord_t>
void forward_kernel(const value_t<scalar_t>* value, const std::vector<Level>& levels,
                    const coord_t* sampling_locations, const coord_t* attention_weights,
                    scalar_t* output, int64_t B, int64_t S, int64_t heads, int64_t runtime_C,
                    int64_t Q, int64_t P) {
  const int64_t C = kC > 0 ? kC : runtime_C;
  using acc_t = at::opmath_type<coord_t>;
  using value_type = value_t<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
  const int64_t token_stride = heads * C;  // distance between two tokens of one (batch, head)
  const int64_t samples = heads * L * P;   // sampling points of one query
  const int64_t cost = samples * (4 * C + 32);

  at::parallel_for(0, B * Q, grain_size(cost), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buffer(kC > 0 ? 0 : C);
    acc_t acc_fixed[kC > 0 ? kC : 1];
    acc_t* const acc = kC > 0 ? acc_fixed : acc_buffer.data();
    const std::vector<value_type> zero_row(C, value_type(0));
    std::vector<GatherPlan<value_type, acc_t>> plans(samples);
    for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
      const int64_t batch = batch_query / Q, query = batch_query % Q;
      // Pass 1: corners of every (head, level, point) of this query, rows prefetched.
      const int64_t attn_begin = msda::attention_weight_index(batch, query, 0, 0, 0, Q, heads,
                                                              L, P);  // this query's first point
      for (int64_t head = 0; head < heads; ++head) {
        for (int64_t level = 0; level < L; ++level) {
          const Level& lv = levels[level];
          const value_type* value_level =
              value + msda::value_index(batch, lv.start, head, 0, S, heads, C);
          for (int64_t point = 0; point < P; ++point) {
            const int64_t sample = (head * L + level) * P + point;
            plan_gather(sampling_locations + 2 * (attn_begin + sample),
                        attention_weights[attn_begin + sample], lv, value_level, token_stride,
                        zero_row.data(), C, plans[sample]);
          }
        }
      }
      // Pass 2: gather and accumulate, one head (C output channels) at a time.
      for (int64_t head = 0; head < heads; ++head) {
        std::fill(acc, acc + C, acc_t(0));
        for (int64_t sample = head * L * P; sample < (head + 1) * L * P; ++sample) {
          const GatherPlan<value_type, acc_t>& plan = plans[sample];
          if (!plan.inside) continue;
          accumulate_corners<kC>(acc, plan.rows[0], plan.rows[1], plan.rows[2], plan.rows[3],
                                 plan.weight, C);
        }
        scalar_t* out = output + batch_query * heads * C + head * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <int kC, typename scalar_t, typename coord_t>
void backward_kernel(const value_t<scalar_t>* value, const std::vector<Level>& levels,
                     const coord_t* sampling_locations, const coord_t* attention_weights,
                     const scalar_t* grad_output,
                     at::opmath_type<coord_t>* grad_value,  // uninitialised, zeroed here
                     coord_t* grad_sampling_locations, coord_t* grad_attention_weights,
                     int64_t B, int64_t S, int64_t heads, int64_t runtime_C, int64_t Q,
                     int64_t P) {
  const int64_t C = kC > 0 ? kC : runtime_C;
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
  std::vector<acc_t> widths(L), heights(L);  // the level sizes in the arithmetic type
  for (int64_t level = 0; level < L; ++level) {
    widths[level] = static_cast<acc_t>(levels[level].W);
    heights[level] = static_cast<acc_t>(levels[level].H);
  }

  at::parallel_for(0, B * heads * level_groups, grain_size(cost), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_out(C);
    std::vector<acc_t> scratch(4 * C);  // value-gradient sink of out-of-map corners
    const std::vector<value_type> zero_row(C, value_type(0));
    std::vector<ScatterPlan<value_type, acc_t>> plans(samples);
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
        // Pass 1: corners of this query's points in the task's levels, the value rows
        // prefetched for reading and the grad_value rows for writing.
        for (int64_t sample = 0; sample < samples; ++sample) {
          const int64_t level = level_begin + sample / P;
          const Level& lv = levels[level];
          const int64_t level_offset = msda::value_index(batch, lv.start, head, 0, S, heads, C);
          plan_scatter(sampling_locations + 2 * (attn_begin + sample),
                       attention_weights[attn_begin + sample], lv, widths[level],
                       heights[level], value + level_offset, grad_value + level_offset,
                       token_stride, zero_row.data(), scratch.data(), C, plans[sample]);
        }
        for (int64_t c = 0; c < C; ++c) grad_out[c] = static_cast<acc_t>(g[c]);
        // Pass 2: the four dot products with grad_out, the grad_value scatter, and the
        // location / attention gradients of each point.
        for (int64_t sample = 0; sample < samples; ++sample) {
          const int64_t attn_idx = attn_begin + sample;
          const ScatterPlan<value_type, acc_t>& plan = plans[sample];
          if (!plan.inside) {
            grad_attention_weights[attn_idx] = coord_t(0);
            grad_sampling_locations[2 * attn_idx] = coord_t(0);
            grad_sampling_locations[2 * attn_idx + 1] = coord_t(0);
            continue;
          }
          const int64_t level = level_begin + sample / P;
          acc_t aw[4];
          for (int i = 0; i < 4; ++i) aw[i] = plan.attention * plan.weight[i];
          acc_t dot[4];
          corner_dots_and_scatter<kC>(grad_out.data(), plan.rows[0], plan.rows[1], plan.rows[2],
                                      plan.rows[3], plan.grad_rows[0], plan.grad_rows[1],
                                      plan.grad_rows[2], plan.grad_rows[3], aw, C, dot);
          acc_t sampled = 0, dsampled_dx = 0, dsampled_dy = 0;
          for (int i = 0; i < 4; ++i) {
            sampled += plan.weight[i] * dot[i];
            dsampled_dx += plan.dweight_dx[i] * dot[i];
            dsampled_dy += plan.dweight_dy[i] * dot[i];
          }
          grad_attention_weights[attn_idx] = static_cast<coord_t>(sampled);
          // d x_pixel / d x_normalised = W and likewise H for y.
          grad_sampling_locations[2 * attn_idx] =
              static_cast<coord_t>(plan.attention * widths[level] * dsampled_dx);
          grad_sampling_locations[2 * attn_idx + 1] =
              static_cast<coord_t>(plan.attention * heights[level] * dsampled_dy);
        }
      }
    }
  });
}

// Deformable DETR's channels per head (256 / 8): compiled for as a constant.
constexpr int kFixedChannels = 32;

}  // namespace

void ms_deform_attn_forward(const MsdaForwardArgs& a) {
  dispatch_dtype_pair(a.value_dtype, a.coordinate_dtype, "ms_deform_attn_forward_cpu",
                      [&](auto types) {
                        using scalar_t = typename decltype(types)::value_t;
                        using coord_t = typename decltype(types)::coordinate_t;
                        const auto kernel = a.C == kFixedChannels
                                                ? forward_kernel<kFixedChannels, scalar_t, coord_t>
                                                : forward_kernel<0, scalar_t, coord_t>;
                        kernel(
                            static_cast<const value_t<scalar_t>*>(a.value), a.levels->levels,
                            static_cast<const coord_t*>(a.sampling_locations),
                            static_cast<const coord_t*>(a.attention_weights),
                            static_cast<scalar_t*>(a.output), a.B, a.S, a.heads, a.C, a.Q, a.P);
                      });
}

void ms_deform_attn_backward(const MsdaBackwardArgs& a) {
  dispatch_dtype_pair(
      a.value_dtype, a.coordinate_dtype, "ms_deform_attn_backward_cpu", [&](auto types) {
        using scalar_t = typename decltype(types)::value_t;
        using coord_t = typename decltype(types)::coordinate_t;
        const auto kernel = a.C == kFixedChannels
                                ? backward_kernel<kFixedChannels, scalar_t, coord_t>
                                : backward_kernel<0, scalar_t, coord_t>;
        kernel(
            static_cast<const value_t<scalar_t>*>(a.value), a.levels->levels,
            static_cast<const coord_t*>(a.sampling_locations),
            static_cast<const coord_t*>(a.attention_weights),
            static_cast<const scalar_t*>(a.grad_output),
            static_cast<at::opmath_type<coord_t>*>(a.grad_value),
            static_cast<coord_t*>(a.grad_sampling_locations),
            static_cast<coord_t*>(a.grad_attention_weights), a.B, a.S, a.heads, a.C, a.Q, a.P);
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace detrx
