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
