// Indexing and bilinear-sampling helpers for multi-scale deformable attention, shared by the
// CPU kernel (ops/cpu) and the CUDA kernels (ops/cuda). Torch-free on purpose: the .cuh files
// include it from device code.
//
// Deformable DETR (Zhu et al., ICLR 2021, arXiv:2010.04159), Eq. 3:
//   MSDeformAttn(z_q, p_q, {x^l}) =
//       sum_m W_m [ sum_l sum_k A_mlqk * x^l(phi_l(p_q) + Δp_mlqk) ] ,
// with m = head, l = level, k = point. x^l(p) is bilinear sampling of level l at the normalised
// location p = (x, y) in [0, 1]^2, with the semantics of grid_sample(mode='bilinear',
// padding_mode='zeros', align_corners=False): pixel centres sit at (i + 0.5) / W, and corners that
// fall outside the map contribute zero.
//
// Tensor layouts (all contiguous):
//   value              (B, S, heads, C)        S = sum_l H_l * W_l
//   sampling_locations (B, Q, heads, L, P, 2)  normalised (x, y)
//   attention_weights  (B, Q, heads, L, P)
//   output             (B, Q, heads * C)
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MSDA_HOST_DEVICE __host__ __device__
#else
#define MSDA_HOST_DEVICE
#endif

namespace detrx {
namespace msda {

// Normalised coordinate in [0, 1] -> continuous pixel coordinate (align_corners=False).
template <typename acc_t>
MSDA_HOST_DEVICE inline acc_t normalized_to_pixel(acc_t coord, int64_t size) {
  return coord * static_cast<acc_t>(size) - static_cast<acc_t>(0.5);
}

// Exact floor for |v| < 2^53 without <cmath> (usable unchanged in host and device code).
template <typename acc_t>
MSDA_HOST_DEVICE inline int64_t floor_to_int(acc_t v) {
  int64_t t = static_cast<int64_t>(v);  // truncates towards zero
  return static_cast<acc_t>(t) > v ? t - 1 : t;
}

// The four bilinear corners of one sampling point, in the order
//   0: (y0, x0)  1: (y0, x0 + 1)  2: (y0 + 1, x0)  3: (y0 + 1, x0 + 1).
// `offset` is the flat pixel index y * W + x inside the level. A corner outside the map has
// inside = false, offset = 0 and weight = dweight_dx = dweight_dy = 0: with zero padding its
// term is identically zero, so it contributes nothing to the output nor to any gradient.
template <typename acc_t>
struct BilinearCorners {
  int64_t offset[4];
  bool inside[4];
  acc_t weight[4];      // bilinear weight of the corner
  acc_t dweight_dx[4];  // d weight / d x_pixel
  acc_t dweight_dy[4];  // d weight / d y_pixel
};

// Fills `corners` for the pixel location (x, y) on an H x W map. Returns false when the point is
// so far outside that all four corners are out of the map (x <= -1, y <= -1, x >= W or y >= H, or
// NaN); `corners` is then fully zeroed as well.
template <typename acc_t>
MSDA_HOST_DEVICE inline bool bilinear_corners(acc_t x, acc_t y, int64_t H, int64_t W,
                                              BilinearCorners<acc_t>& corners) {
  for (int i = 0; i < 4; ++i) {
    corners.offset[i] = 0;
    corners.inside[i] = false;
    corners.weight[i] = corners.dweight_dx[i] = corners.dweight_dy[i] = acc_t(0);
  }
  // Written as !(inside) so that NaN coordinates are rejected too.
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) &&
        y < static_cast<acc_t>(H))) {
    return false;
  }
  const int64_t x0 = floor_to_int(x), y0 = floor_to_int(y);
  const acc_t lx = x - static_cast<acc_t>(x0), ly = y - static_cast<acc_t>(y0);
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;

  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t dweight_dx[4] = {-hy, hy, -ly, ly};
  const acc_t dweight_dy[4] = {-hx, -lx, hx, lx};
  for (int i = 0; i < 4; ++i) {
    if (xs[i] >= 0 && xs[i] < W && ys[i] >= 0 && ys[i] < H) {
      corners.offset[i] = ys[i] * W + xs[i];
      corners.inside[i] = true;
      corners.weight[i] = weight[i];
      corners.dweight_dx[i] = dweight_dx[i];
      corners.dweight_dy[i] = dweight_dy[i];
    }
  }
  return true;
}

// Outcome of check_levels: the first problem found in a level table, if any.
enum class LevelProblem : int {
  kNone = 0,
  kNonPositiveSize,  // H_l <= 0 or W_l <= 0 at `level`
  kTooManyTokens,    // H_l * W_l exceeds the tokens left after levels < `level` (`count`)
  kTokenCountShort,  // sum_l H_l * W_l (`count`) < S
  kWrongStart,       // level_start_index[level] != sum_{j < level} H_j * W_j (`count`)
};

struct LevelCheck {
  LevelProblem problem;
  int64_t level;  // the offending level, -1 for kNone / kTokenCountShort
  int64_t count;  // tokens before `level` (kTooManyTokens, kWrongStart) or in all levels
};

// Validates a level table against a value tensor of S = num_value tokens per (batch, head):
// H_l, W_l > 0, sum_l H_l * W_l == S and level_start_index[l] == sum_{j < l} H_j * W_j. This is
// what keeps every index the kernels form inside value. No intermediate can overflow int64:
// each product is bounded before it is formed (W > left / H  <=>  H * W > left for H, W, left
// >= 0, in exact integer arithmetic), so the partial sums never exceed S. Shapes are checked for
// all levels before any start, so a wrong H or W is reported as such. `levels` provides
// height(l), width(l) and start(l) as int64_t. Used by the host-side input check and, as a
// guard, inside the CUDA kernels.
template <typename Levels>
MSDA_HOST_DEVICE inline LevelCheck check_levels(const Levels& levels, int64_t num_levels,
                                                int64_t num_value) {
  int64_t total = 0;
  for (int64_t level = 0; level < num_levels; ++level) {
    const int64_t H = levels.height(level), W = levels.width(level);
    if (!(H > 0 && W > 0)) return {LevelProblem::kNonPositiveSize, level, total};
    const int64_t left = num_value - total;  // >= 0: the partial sums never exceed num_value
    if (H > left || W > left / H) return {LevelProblem::kTooManyTokens, level, total};
    total += H * W;
  }
  if (total != num_value) return {LevelProblem::kTokenCountShort, -1, total};
  int64_t start = 0;
  for (int64_t level = 0; level < num_levels; ++level) {
    if (levels.start(level) != start) return {LevelProblem::kWrongStart, level, start};
    start += levels.height(level) * levels.width(level);
  }
  return {LevelProblem::kNone, -1, total};
}

// The layout of the op's index tensors: spatial_shapes (L, 2) row-major (H, W) and
// level_start_index (L,), both contiguous int64.
struct IndexTensorLevels {
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  MSDA_HOST_DEVICE int64_t height(int64_t level) const { return spatial_shapes[2 * level]; }
  MSDA_HOST_DEVICE int64_t width(int64_t level) const { return spatial_shapes[2 * level + 1]; }
  MSDA_HOST_DEVICE int64_t start(int64_t level) const { return level_start_index[level]; }
};

// Flat index of value[batch][token][head][channel] in a (B, S, heads, C) tensor.
MSDA_HOST_DEVICE inline int64_t value_index(int64_t batch, int64_t token, int64_t head,
                                            int64_t channel, int64_t S, int64_t heads,
                                            int64_t C) {
  return ((batch * S + token) * heads + head) * C + channel;
}

// Flat index of attention_weights[batch][query][head][level][point] in a (B, Q, heads, L, P)
// tensor.
MSDA_HOST_DEVICE inline int64_t attention_weight_index(int64_t batch, int64_t query,
                                                       int64_t head, int64_t level,
                                                       int64_t point, int64_t Q, int64_t heads,
                                                       int64_t L, int64_t P) {
  return (((batch * Q + query) * heads + head) * L + level) * P + point;
}

// Flat index of the x coordinate sampling_locations[batch][query][head][level][point][0] in a
// (B, Q, heads, L, P, 2) tensor; y is at the next index.
MSDA_HOST_DEVICE inline int64_t sampling_location_index(int64_t batch, int64_t query,
                                                        int64_t head, int64_t level,
                                                        int64_t point, int64_t Q, int64_t heads,
                                                        int64_t L, int64_t P) {
  return 2 * attention_weight_index(batch, query, head, level, point, Q, heads, L, P);
}

}  // namespace msda
}  // namespace detrx
