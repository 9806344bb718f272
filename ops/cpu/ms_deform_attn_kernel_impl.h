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
// acc_t = at::opmath_type<coord_t>; grad_value is accumulated in acc_t and rounded to value's
// dtype once, when written.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including this file"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// a * b + c, fused where the instruction set has FMA. Written out where a loop over sampling
// points computes it: left to the compiler's contraction, the vectorised body and the scalar
// remainder of such a loop can round differently, and how many points go through each depends
// on how the backward splits its work, i.e. on the thread count.
template <typename T>
inline T mul_add(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
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

// dot[i] = sum_lanes(d_i) for the four corners at once: the same pairwise tree, each step one
// operation on a vector of the four corners' partial sums (a transpose by shuffles) instead of
// four scalar trees. Bitwise equal to sum_lanes.
template <typename acc_t>
inline void sum_lanes4(const acc_t (&d0)[8], const acc_t (&d1)[8], const acc_t (&d2)[8],
                       const acc_t (&d3)[8], acc_t* dot) {
#if defined(__GNUC__) || defined(__clang__)
  typedef acc_t vec4 __attribute__((vector_size(4 * sizeof(acc_t))));
  // (s_0, s_1, s_2, s_3), s_k = d[k] + d[k + 4] (vectors stay local: passing one by value
  // would depend on the ISA's ABI)
  const acc_t* const partial[4] = {d0, d1, d2, d3};
  vec4 s[4];
  for (int i = 0; i < 4; ++i) {
    vec4 high;
    std::memcpy(&s[i], partial[i], sizeof(vec4));
    std::memcpy(&high, partial[i] + 4, sizeof(vec4));
    s[i] += high;
  }
  // (s_0 + s_2, s_1 + s_3) of corners 0 and 1, then of corners 2 and 3
  const vec4 p01 = __builtin_shufflevector(s[0], s[1], 0, 1, 4, 5) +
                   __builtin_shufflevector(s[0], s[1], 2, 3, 6, 7);
  const vec4 p23 = __builtin_shufflevector(s[2], s[3], 0, 1, 4, 5) +
                   __builtin_shufflevector(s[2], s[3], 2, 3, 6, 7);
  const vec4 sums = __builtin_shufflevector(p01, p23, 0, 2, 4, 6) +
                    __builtin_shufflevector(p01, p23, 1, 3, 5, 7);
  std::memcpy(dot, &sums, sizeof(vec4));
#else
  dot[0] = sum_lanes(d0);
  dot[1] = sum_lanes(d1);
  dot[2] = sum_lanes(d2);
  dot[3] = sum_lanes(d3);
#endif
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
                                    const acc_t* aw, int64_t runtime_C, acc_t* dot) {
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
  sum_lanes4(d0, d1, d2, d3, dot);
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

// The backward runs on packed copies of one (batch, head) slice of value and grad_value (see
// backward_kernel). In them, level l is a (H_l + 2) x (W_l + 2) grid of C-channel rows: the map
// in the interior and a border of one row of zeros on every side. Every point with a corner on
// the map (x in (-1, W), y in (-1, H)) then has all four corners inside the grid: corner i of
// (x0, y0) is at grid row (y0 + 1 + i / 2) * (W + 2) + x0 + 1 + i % 2, with no per-corner test.
// A corner off the map reads zeros and gets bilinear weight 0, as in bilinear_corners; its
// grad_value contribution lands in the border, which is never copied back.

// Per sampling point of a query (L_task * P of them, in the order of attention_weights), the
// level's geometry, repeated per point so that the planning loop reads it without a gather.
template <typename acc_t>
struct PointGeometry {
  std::vector<acc_t> width, height;            // W, H in the arithmetic type
  std::vector<int32_t> width_int, height_int;  // W, H (<= 2^30, checked by the caller)
  std::vector<int64_t> grid_start, grid_width;  // the level's grid: first row, W + 2
};

// The backward's plan of a query's points in one task, one array per quantity, so that the
// loops over points (plan_points, point_gradients) vectorise. weight: the bilinear weights
// (0 for corners off the map), dweight_dx / _dy their derivatives; corner_weight and dot, read
// and written by the per-point pass 2, hold a point's 4 values side by side.
template <typename acc_t>
struct ScatterPlans {
  explicit ScatterPlans(int64_t n)
      : inside(n), x0(n), y0(n), row(n), attention(n), corner_weight(4 * n), dot(4 * n) {
    for (int i = 0; i < 4; ++i) {
      weight[i].resize(n);
      dweight_dx[i].resize(n);
      dweight_dy[i].resize(n);
    }
  }
  std::vector<int32_t> inside;  // 0: all four corners off the map (or NaN), the point adds nothing
  std::vector<int32_t> x0, y0;  // floor of the (clamped) pixel coordinates
  std::vector<int64_t> row;      // grid row of corner 0 (corner 1 is the next row, 2 and 3 the
                                // two rows below them)
  std::vector<acc_t> attention;
  std::vector<acc_t> weight[4], dweight_dx[4], dweight_dy[4];
  // What pass 2 reads and writes, point by point: 4 values per point.
  std::vector<acc_t> corner_weight;  // attention x weight[i]
  std::vector<acc_t> dot;            // <grad_output, value row of corner i>
};

// Pass 1 of the backward for one query: bilinear corners and weights of n points. Same
// arithmetic as bilinear_corners (normalized_to_pixel, floor, hx = 1 - lx, ...), written
// branch-free over points.
template <typename acc_t, typename coord_t>
inline void plan_points(int64_t n, const coord_t* __restrict location,
                        const coord_t* __restrict attention, const PointGeometry<acc_t>& geometry,
                        ScatterPlans<acc_t>& plan) {
  const acc_t* __restrict width = geometry.width.data();
  const acc_t* __restrict height = geometry.height.data();
  const int32_t* __restrict width_int = geometry.width_int.data();
  const int32_t* __restrict height_int = geometry.height_int.data();
  int32_t* __restrict inside_out = plan.inside.data();
  int32_t* __restrict x0_out = plan.x0.data();
  int32_t* __restrict y0_out = plan.y0.data();
  int64_t* __restrict row_out = plan.row.data();
  const int64_t* __restrict grid_start = geometry.grid_start.data();
  const int64_t* __restrict grid_width = geometry.grid_width.data();
  acc_t* __restrict attention_out = plan.attention.data();
  acc_t* __restrict corner_weight = plan.corner_weight.data();
  acc_t* const w[4] = {plan.weight[0].data(), plan.weight[1].data(), plan.weight[2].data(),
                       plan.weight[3].data()};
  acc_t* const wx[4] = {plan.dweight_dx[0].data(), plan.dweight_dx[1].data(),
                        plan.dweight_dx[2].data(), plan.dweight_dx[3].data()};
  acc_t* const wy[4] = {plan.dweight_dy[0].data(), plan.dweight_dy[1].data(),
                        plan.dweight_dy[2].data(), plan.dweight_dy[3].data()};
  // omp simd: the iterations are independent and the arrays do not overlap (which the compiler
  // cannot see through the pointers), so the loop vectorises without run-time alias checks.
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) {
    const acc_t W = width[s], H = height[s];
    const acc_t x = mul_add(static_cast<acc_t>(location[2 * s]), W, acc_t(-0.5));
    const acc_t y = mul_add(static_cast<acc_t>(location[2 * s + 1]), H, acc_t(-0.5));
    // Written as !(outside) so that NaN coordinates count as outside; & rather than &&, and
    // masks rather than branches below, so that the loop vectorises.
    const bool inside = (x > acc_t(-1)) & (y > acc_t(-1)) & (x < W) & (y < H);
    // Clamped to [-1, W] x [-1, H] (NaN to -1): unchanged inside, and the conversions to int
    // stay defined for a point outside, whose weights are all zeroed below.
    const acc_t x_above = x > acc_t(-1) ? x : acc_t(-1), y_above = y > acc_t(-1) ? y : acc_t(-1);
    const acc_t xs = x_above < W ? x_above : W, ys = y_above < H ? y_above : H;
    const int32_t xt = static_cast<int32_t>(xs), yt = static_cast<int32_t>(ys);  // truncated
    const int32_t x0 = xt - (static_cast<acc_t>(xt) > xs);                      // floor
    const int32_t y0 = yt - (static_cast<acc_t>(yt) > ys);
    const acc_t lx = xs - static_cast<acc_t>(x0), ly = ys - static_cast<acc_t>(y0);
    const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const bool x_lo = inside & (x0 >= 0), x_hi = inside & (x0 + 1 < width_int[s]);
    const bool y_lo = y0 >= 0, y_hi = y0 + 1 < height_int[s];
    // 1 for a corner on the map, else 0 (the weights are finite: multiplying is exact).
    const acc_t in0 = y_lo & x_lo, in1 = y_lo & x_hi, in2 = y_hi & x_lo, in3 = y_hi & x_hi;
    w[0][s] = hy * hx * in0;
    w[1][s] = hy * lx * in1;
    w[2][s] = ly * hx * in2;
    w[3][s] = ly * lx * in3;
    wx[0][s] = -hy * in0;
    wx[1][s] = hy * in1;
    wx[2][s] = -ly * in2;
    wx[3][s] = ly * in3;
    wy[0][s] = -hx * in0;
    wy[1][s] = -lx * in1;
    wy[2][s] = hx * in2;
    wy[3][s] = lx * in3;
    inside_out[s] = inside;
    x0_out[s] = x0;
    y0_out[s] = y0;
    row_out[s] = grid_start[s] + (static_cast<int64_t>(y0) + 1) * grid_width[s] + x0 + 1;
    const acc_t a = static_cast<acc_t>(attention[s]);
    attention_out[s] = inside ? a : acc_t(0);
    corner_weight[4 * s] = a * w[0][s];
    corner_weight[4 * s + 1] = a * w[1][s];
    corner_weight[4 * s + 2] = a * w[2][s];
    corner_weight[4 * s + 3] = a * w[3][s];
  }
}

// Pass 3 of the backward for one query: the location and attention gradients of n points from
// the dot products of pass 2, branch-free over points.
template <typename acc_t, typename coord_t>
inline void point_gradients(int64_t n, const ScatterPlans<acc_t>& plan,
                            const PointGeometry<acc_t>& geometry,
                            coord_t* __restrict grad_location, coord_t* __restrict grad_attention) {
  const acc_t* __restrict width = geometry.width.data();
  const acc_t* __restrict height = geometry.height.data();
  const acc_t* __restrict attention = plan.attention.data();
  const acc_t* const w[4] = {plan.weight[0].data(), plan.weight[1].data(),
                             plan.weight[2].data(), plan.weight[3].data()};
  const acc_t* const wx[4] = {plan.dweight_dx[0].data(), plan.dweight_dx[1].data(),
                              plan.dweight_dx[2].data(), plan.dweight_dx[3].data()};
  const acc_t* const wy[4] = {plan.dweight_dy[0].data(), plan.dweight_dy[1].data(),
                              plan.dweight_dy[2].data(), plan.dweight_dy[3].data()};
  const acc_t* const dot = plan.dot.data();
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) {
    acc_t sampled = 0, dsampled_dx = 0, dsampled_dy = 0;
    for (int i = 0; i < 4; ++i) {
      sampled = mul_add(w[i][s], dot[4 * s + i], sampled);
      dsampled_dx = mul_add(wx[i][s], dot[4 * s + i], dsampled_dx);
      dsampled_dy = mul_add(wy[i][s], dot[4 * s + i], dsampled_dy);
    }
    // A point outside has zero weights, dot products and attention (see plan_points): its
    // gradients come out as 0 without a branch.
    grad_attention[s] = static_cast<coord_t>(sampled);
    // d x_pixel / d x_normalised = W and likewise H for y.
    grad_location[2 * s] = static_cast<coord_t>(attention[s] * width[s] * dsampled_dx);
    grad_location[2 * s + 1] = static_cast<coord_t>(attention[s] * height[s] * dsampled_dy);
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

// A task's packed grids (described above PointGeometry): grid row r holds value's C channels, then
// grad_value's, so that the two rows of a corner are adjacent. In two separate buffers, a
// corner's value row and its grad_value row would be a multiple of 4 KiB apart, and the loads
// of a point's value rows could wait on the stores to the same page offsets in grad_value by
// the points before (4K aliasing); adjacent, they also share pages.
template <typename value_type, typename acc_t>
class PackedGrid {
 public:
  PackedGrid(int64_t rows, int64_t C)
      : grad_offset_(round_up(C * static_cast<int64_t>(sizeof(value_type)), sizeof(acc_t))),
        stride_(grad_offset_ + C * static_cast<int64_t>(sizeof(acc_t))),
        bytes_(rows * stride_) {}
  // Zeroes the first `rows` rows (value and grad_value).
  void zero(int64_t rows) { std::fill(bytes_.begin(), bytes_.begin() + rows * stride_, 0); }
  value_type* value(int64_t row) {
    return reinterpret_cast<value_type*>(bytes_.data() + row * stride_);
  }
  acc_t* grad(int64_t row) {
    return reinterpret_cast<acc_t*>(bytes_.data() + row * stride_ + grad_offset_);
  }

 private:
  static int64_t round_up(int64_t n, int64_t multiple) {
    return (n + multiple - 1) / multiple * multiple;
  }
  const int64_t grad_offset_, stride_;
  // Storage in which the value_type and acc_t objects are created as they are written, each
  // suitably aligned: operator new aligns to alignof(std::max_align_t), and the row stride and
  // grad_offset_ are multiples of sizeof(acc_t), itself a multiple of sizeof(value_type).
  std::vector<unsigned char> bytes_;
};

template <int kC, typename scalar_t, typename coord_t>
void backward_kernel(const value_t<scalar_t>* value, const std::vector<Level>& levels,
                     const coord_t* sampling_locations, const coord_t* attention_weights,
                     const scalar_t* grad_output,
                     scalar_t* grad_value,  // uninitialised, written here
                     coord_t* grad_sampling_locations, coord_t* grad_attention_weights,
                     int64_t B, int64_t S, int64_t heads, int64_t runtime_C, int64_t Q,
                     int64_t P) {
  const int64_t C = kC > 0 ? kC : runtime_C;
  using acc_t = at::opmath_type<coord_t>;
  using value_type = value_t<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
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

  // Where each level lies in a task's packed buffers (in grid rows, from the task's first
  // level), and the largest buffer a task needs.
  std::vector<int64_t> grid_start(L);
  int64_t max_task_rows = 0;
  for (int64_t group = 0; group < level_groups; ++group) {
    int64_t rows = 0;
    for (int64_t level = group * levels_per_task; level < (group + 1) * levels_per_task;
         ++level) {
      grid_start[level] = rows;
      rows += (levels[level].H + 2) * (levels[level].W + 2);
    }
    max_task_rows = std::max(max_task_rows, rows);
  }

  at::parallel_for(0, B * heads * level_groups, grain_size(cost), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_out(C);
    ScatterPlans<acc_t> plans(samples);
    PointGeometry<acc_t> geometry;
    // The task's slice of value and of grad_value, packed into grids (see PointGeometry). In
    // value and grad_value the rows of one head are heads * C elements apart (1 KiB for 8 heads
    // of 32 float channels): they fall into 1 / heads of the cache sets and spread over heads
    // times more pages. Packed, the rows around the queries' sampling points share the caches
    // evenly; and the border makes the corners' addresses branch-free. Packing and unpacking
    // are sequential passes over the slice.
    // value is packed widened to the arithmetic type (each row is read many times, converted
    // once here), grad_value rounded to value's dtype once, when unpacked.
    PackedGrid<acc_t, acc_t> packed(max_task_rows, C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t batch = task / (heads * level_groups);
      const int64_t head = (task / level_groups) % heads;
      const int64_t level_begin = (task % level_groups) * levels_per_task;
      const int64_t level_end = level_begin + levels_per_task;

      geometry = PointGeometry<acc_t>{};
      for (int64_t level = level_begin; level < level_end; ++level) {
        const Level& lv = levels[level];
        for (int64_t point = 0; point < P; ++point) {
          geometry.width.push_back(static_cast<acc_t>(lv.W));
          geometry.height.push_back(static_cast<acc_t>(lv.H));
          geometry.width_int.push_back(static_cast<int32_t>(lv.W));
          geometry.height_int.push_back(static_cast<int32_t>(lv.H));
          geometry.grid_start.push_back(grid_start[level]);
          geometry.grid_width.push_back(lv.W + 2);
        }
      }
      // Pack: zeroes (the border, and grad_value), then the map's value rows inside the border.
      const int64_t task_rows = grid_start[level_end - 1] +
                                (levels[level_end - 1].H + 2) * (levels[level_end - 1].W + 2);
      packed.zero(task_rows);
      for (int64_t level = level_begin; level < level_end; ++level) {
        const Level& lv = levels[level];
        for (int64_t y = 0; y < lv.H; ++y) {
          for (int64_t x = 0; x < lv.W; ++x) {
            const value_type* row =
                value + msda::value_index(batch, lv.start + y * lv.W + x, head, 0, S, heads, C);
            acc_t* grid_row = packed.value(grid_start[level] + (y + 1) * (lv.W + 2) + x + 1);
            for (int64_t c = 0; c < C; ++c) grid_row[c] = static_cast<acc_t>(row[c]);
          }
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
        // Pass 1: corners and bilinear weights of this query's points in the task's levels.
        plan_points(samples, sampling_locations + 2 * attn_begin, attention_weights + attn_begin,
                    geometry, plans);
        for (int64_t c = 0; c < C; ++c) grad_out[c] = static_cast<acc_t>(g[c]);
        // Pass 2: per point, the four dot products with grad_out and the grad_value scatter.
        for (int64_t sample = 0; sample < samples; ++sample) {
          acc_t* const dot = plans.dot.data() + 4 * sample;
          if (!plans.inside[sample]) {
            std::fill(dot, dot + 4, acc_t(0));
            continue;
          }
          const int64_t row = plans.row[sample];
          const int64_t below = row + geometry.grid_width[sample];  // corners 2 and 3
          corner_dots_and_scatter<kC>(grad_out.data(), packed.value(row), packed.value(row + 1),
                                      packed.value(below), packed.value(below + 1),
                                      packed.grad(row), packed.grad(row + 1), packed.grad(below),
                                      packed.grad(below + 1),
                                      plans.corner_weight.data() + 4 * sample, C, dot);
        }
        // Pass 3: the location and attention gradients of the points.
        point_gradients(samples, plans, geometry, grad_sampling_locations + 2 * attn_begin,
                        grad_attention_weights + attn_begin);
      }
      // Unpack: every grad_value row of the task is written here, and only here.
      for (int64_t level = level_begin; level < level_end; ++level) {
        const Level& lv = levels[level];
        for (int64_t y = 0; y < lv.H; ++y) {
          for (int64_t x = 0; x < lv.W; ++x) {
            const acc_t* row = packed.grad(grid_start[level] + (y + 1) * (lv.W + 2) + x + 1);
            scalar_t* out =
                grad_value + msda::value_index(batch, lv.start + y * lv.W + x, head, 0, S, heads, C);
            for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(row[c]);
          }
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
            static_cast<scalar_t*>(a.grad_value),
            static_cast<coord_t*>(a.grad_sampling_locations),
            static_cast<coord_t*>(a.grad_attention_weights), a.B, a.S, a.heads, a.C, a.Q, a.P);
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace detrx
