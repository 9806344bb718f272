// CUDA kernels for multi-scale deformable attention (forward and backward).
//
// Deformable DETR (Zhu et al., ICLR 2021, arXiv:2010.04159), Eq. 3 — see
// ops/ms_deform_attn_sampling.h for the formula and the grid_sample semantics (bilinear, zero
// padding, align_corners=False) that the kernels share with the CPU kernel.
//
// Torch-free on purpose: tools/check_cuda_kernels.py compile-checks this header with plain nvcc
// on machines without a CUDA build of torch; ms_deform_attn_kernel.cu only dispatches and
// launches.
//
// Layouts (contiguous):
//   value              (B, S, heads, C)        S = sum_l H_l * W_l
//   spatial_shapes     (L, 2) int64 (H, W);  level_start_index (L,) int64
//   sampling_locations (B, Q, heads, L, P, 2)  normalised (x, y)
//   attention_weights  (B, Q, heads, L, P)
//   output             (B, Q, heads * C)
//
// Work decomposition: one *group* of G lanes (G a power of two <= 32, never straddling a warp)
// per (batch, query, head); each lane owns VEC consecutive channels (VEC-wide packed loads, e.g.
// two __half in one 32-bit load) and strides over the channels by G * VEC, so any C works
// (odd C such as 71 or 1025 runs with VEC = 1). Loads of a corner are coalesced over channels.
//   forward:  out[c] = sum_{level, point} a * sum_corner w_corner * value[corner][c], accumulated
//             in acc_t and rounded once at the store.
//   backward: grad_value is scattered with atomicAdd into an acc_t buffer (the caller casts it to
//             half / bfloat16: native 16-bit atomics are slow and round every partial sum);
//             grad_attention_weights and grad_sampling_locations of a (level, point) are sums
//             over channels, reduced with warp shuffles inside the group and written by lane 0
//             without atomics, since exactly one group owns each (batch, query, head).
// The batch is processed in one launch with a grid-stride loop over 64-bit group ids, so there is
// no im2col_step chunking and no batch-divisibility requirement.
//
// Dtypes (policy in ops/ms_deform_attn.h): scalar_t is value's (and output / grad_output's)
// type, coord_t that of sampling_locations / attention_weights (scalar_t or a wider type: float
// / double for __half / __nv_bfloat16 value, i.e. mixed precision; double for float).
// acc_t = acc_type<coord_t>: fp32, fp64 for double coordinates.
//
// Every block re-checks the level table it stages (msda::check_levels) and traps on an
// inconsistent one before any thread reads value: the host validates index tensors once per
// tensor (see validate_index_values), and this guard keeps a table changed behind the host
// check's back from turning into out-of-bounds reads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "ms_deform_attn_sampling.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
#error "detrx ms_deform_attn CUDA kernels need sm_60 or newer (atomicAdd on double)"
#endif

namespace detrx {
namespace msda_cuda {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

// The backward kernel needs ~100 registers unconstrained, i.e. 2 blocks (25% occupancy) per
// SM; capping it for 3 blocks costs no spills for 32- and 16-bit types (ptxas -v, sm_80/sm_90)
// and leaves more gathers in flight. fp64 (used for gradcheck) would spill, so it keeps 2.
template <typename acc_t>
constexpr int kBackwardMinBlocks = sizeof(acc_t) == 8 ? 2 : 3;

// Accumulation type: fp32 for float / half / bfloat16, fp64 for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// Levels a launch supports: their geometry (24 bytes each) is staged in shared memory.
constexpr int kMaxLevels = 1024;

// Explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so the implicit __half <-> float operators are unavailable.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// acc_t (float or double) -> scalar_t, round to nearest even.
template <typename scalar_t>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
  __device__ __forceinline__ static float from(double x) { return static_cast<float>(x); }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double from(double x) { return x; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static __half from(double x) { return __double2half(x); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static __nv_bfloat16 from(double x) { return __double2bfloat16(x); }
};
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t x) {
  return FromAcc<scalar_t>::from(x);
}

// VEC consecutive channels moved with one aligned vector load / store.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* ptr, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(to_acc(pack.v[i]));
}

template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* ptr, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_acc<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(ptr) = pack;
}

// Problem sizes, passed by value to every kernel.
struct MSDAShape {
  int64_t batch;       // B
  int64_t num_value;   // S = sum_l H_l * W_l
  int64_t num_heads;   // heads
  int64_t channels;    // C, channels per head
  int64_t num_query;   // Q
  int num_levels;      // L
  int num_points;      // P
};

// Per-level geometry, staged in shared memory once per block.
struct LevelGeometry {
  int64_t start;   // level_start_index[level]
  int64_t height;  // H_level
  int64_t width;   // W_level
};

// Lanes of a group and the shuffle mask that names exactly them.
struct GroupLane {
  int lane;       // 0 .. G - 1
  unsigned mask;  // the G bits of this group inside its warp
};

__device__ __forceinline__ GroupLane group_lane(int group_size) {
  const int lane_in_warp = threadIdx.x % kWarpSize;
  const int first = lane_in_warp & ~(group_size - 1);
  const unsigned bits = group_size == kWarpSize ? 0xffffffffu : ((1u << group_size) - 1u);
  return {lane_in_warp - first, bits << first};
}

// Sum over the G lanes of one group; every lane of the group gets the total.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, unsigned mask, int group_size) {
  for (int offset = group_size >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(mask, v, offset, group_size);
  }
  return v;
}

// grad_value_acc[address + i] += v[i] for the VEC channels of a pack. sm_90 has 64- / 128-bit
// float atomics (one instruction per pack instead of VEC); the launcher keeps grad_value_acc
// aligned to VEC * sizeof(acc_t).
template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* address, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC == 4) {
    atomicAdd(reinterpret_cast<float4*>(address), make_float4(v[0], v[1], v[2], v[3]));
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(address), make_float2(v[0], v[1]));
  } else  // NOLINT: the scalar loop below is the else branch on sm_90
#endif
  {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(address + i, v[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* address, const double (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(address + i, v[i]);
}

// Level geometry as msda::check_levels reads it.
struct StagedLevels {
  const LevelGeometry* levels;
  __device__ int64_t height(int64_t level) const { return levels[level].height; }
  __device__ int64_t width(int64_t level) const { return levels[level].width; }
  __device__ int64_t start(int64_t level) const { return levels[level].start; }
};

// Copies spatial_shapes / level_start_index to shared memory and checks the staged copy against
// num_value tokens (msda::check_levels; every thread checks, which costs a few integer
// operations per level and needs no shared flag). On an inconsistent table thread 0 traps (a
// loud, sticky CUDA error) and no thread reads value. Must be reached by every thread of the
// block (it synchronises); returns nullptr when the caller must return at once.
__device__ __forceinline__ const LevelGeometry* stage_levels(
    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start,
    int num_levels, int64_t num_value) {
  extern __shared__ LevelGeometry msda_levels[];
  for (int level = threadIdx.x; level < num_levels; level += blockDim.x) {
    msda_levels[level] = {level_start[level], spatial_shapes[2 * level],
                          spatial_shapes[2 * level + 1]};
  }
  __syncthreads();
  if (msda::check_levels(StagedLevels{msda_levels}, num_levels, num_value).problem ==
      msda::LevelProblem::kNone) {
    return msda_levels;
  }
  if (threadIdx.x == 0) {
    printf("ms_deform_attn: spatial_shapes / level_start_index changed after validation "
           "(inconsistent with value.size(1) = %lld)\n", static_cast<long long>(num_value));
    __trap();
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Forward: output (B, Q, heads * C).
template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                  const int64_t* __restrict__ spatial_shapes,
                                  const int64_t* __restrict__ level_start_index,
                                  const coord_t* __restrict__ sampling_locations,
                                  const coord_t* __restrict__ attention_weights,
                                  scalar_t* __restrict__ output, MSDAShape shape,
                                  int group_size) {
  using acc_t = acc_type<coord_t>;
  const LevelGeometry* levels =
      stage_levels(spatial_shapes, level_start_index, shape.num_levels, shape.num_value);
  if (levels == nullptr) return;

  const int64_t S = shape.num_value, heads = shape.num_heads, C = shape.channels;
  const int64_t Q = shape.num_query;
  const int L = shape.num_levels, P = shape.num_points;
  const int lane = group_lane(group_size).lane;
  const int64_t num_groups = shape.batch * Q * heads;
  const int group_shift = __ffs(group_size) - 1;  // log2(G): G is a power of two
  const int64_t groups_per_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> group_shift;

  for (int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> group_shift;
       group < num_groups; group += groups_per_grid) {
    const int64_t head = group % heads;
    const int64_t query = (group / heads) % Q;
    const int64_t batch = group / (heads * Q);
    const int64_t point_base =
        msda::attention_weight_index(batch, query, head, 0, 0, Q, heads, L, P);
    const scalar_t* value_bh = value + msda::value_index(batch, 0, head, 0, S, heads, C);
    const int64_t token_stride = heads * C;  // distance between value[b][s][h] and [b][s + 1][h]

    for (int64_t channel = static_cast<int64_t>(lane) * VEC; channel < C;
         channel += static_cast<int64_t>(group_size) * VEC) {
      acc_t out[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = acc_t(0);

      for (int level = 0; level < L; ++level) {
        const LevelGeometry geo = levels[level];
        const scalar_t* value_level = value_bh + geo.start * token_stride + channel;
        for (int point = 0; point < P; ++point) {
          const int64_t idx = point_base + level * P + point;
          const acc_t x = msda::normalized_to_pixel(to_acc(sampling_locations[2 * idx]), geo.width);
          const acc_t y =
              msda::normalized_to_pixel(to_acc(sampling_locations[2 * idx + 1]), geo.height);
          msda::BilinearCorners<acc_t> corners;
          if (!msda::bilinear_corners(x, y, geo.height, geo.width, corners)) continue;
          const acc_t attn = to_acc(attention_weights[idx]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!corners.inside[k]) continue;
            acc_t v[VEC];
            load_pack<scalar_t, VEC>(value_level + corners.offset[k] * token_stride, v);
            const acc_t w = attn * corners.weight[k];
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] += w * v[i];
          }
        }
      }
      store_pack<scalar_t, VEC>(output + group * C + channel, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. grad_output (B, Q, heads * C) contiguous; grad_value_acc (B, S, heads, C) in acc_t and
// zero-initialised by the caller; grad_sampling_locations / grad_attention_weights have the
// layouts of their inputs and are fully written here (zero where a point is off the map).
template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock, kBackwardMinBlocks<acc_type<coord_t>>)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                   const int64_t* __restrict__ spatial_shapes,
                                   const int64_t* __restrict__ level_start_index,
                                   const coord_t* __restrict__ sampling_locations,
                                   const coord_t* __restrict__ attention_weights,
                                   const scalar_t* __restrict__ grad_output,
                                   acc_type<coord_t>* __restrict__ grad_value_acc,
                                   coord_t* __restrict__ grad_sampling_locations,
                                   coord_t* __restrict__ grad_attention_weights,
                                   MSDAShape shape, int group_size) {
  using acc_t = acc_type<coord_t>;
  const LevelGeometry* levels =
      stage_levels(spatial_shapes, level_start_index, shape.num_levels, shape.num_value);
  if (levels == nullptr) return;

  const int64_t S = shape.num_value, heads = shape.num_heads, C = shape.channels;
  const int64_t Q = shape.num_query;
  const int L = shape.num_levels, P = shape.num_points;
  const GroupLane gl = group_lane(group_size);
  const int64_t num_groups = shape.batch * Q * heads;
  const int group_shift = __ffs(group_size) - 1;  // log2(G): G is a power of two
  const int64_t groups_per_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> group_shift;

  for (int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> group_shift;
       group < num_groups; group += groups_per_grid) {
    const int64_t head = group % heads;
    const int64_t query = (group / heads) % Q;
    const int64_t batch = group / (heads * Q);
    const int64_t point_base =
        msda::attention_weight_index(batch, query, head, 0, 0, Q, heads, L, P);
    const int64_t value_bh = msda::value_index(batch, 0, head, 0, S, heads, C);
    const int64_t token_stride = heads * C;
    const scalar_t* grad_out_bqh = grad_output + group * C;

    for (int level = 0; level < L; ++level) {
      const LevelGeometry geo = levels[level];
      const int64_t value_level = value_bh + geo.start * token_stride;
      for (int point = 0; point < P; ++point) {
        const int64_t idx = point_base + level * P + point;
        const acc_t x = msda::normalized_to_pixel(to_acc(sampling_locations[2 * idx]), geo.width);
        const acc_t y =
            msda::normalized_to_pixel(to_acc(sampling_locations[2 * idx + 1]), geo.height);
        msda::BilinearCorners<acc_t> corners;
        // Uniform across the group (same point), so the shuffles below are never divergent.
        const bool on_map = msda::bilinear_corners(x, y, geo.height, geo.width, corners);
        const acc_t attn = to_acc(attention_weights[idx]);

        // Per-lane partial sums over this lane's channels of
        //   d out / d attn = sum_c g_c * sample_c,  d out / d x = attn * sum_c g_c * d sample_c/dx.
        acc_t grad_attn = acc_t(0), grad_x = acc_t(0), grad_y = acc_t(0);
        if (on_map) {
          for (int64_t channel = static_cast<int64_t>(gl.lane) * VEC; channel < C;
               channel += static_cast<int64_t>(group_size) * VEC) {
            acc_t g[VEC];
            load_pack<scalar_t, VEC>(grad_out_bqh + channel, g);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (!corners.inside[k]) continue;
              const int64_t offset = value_level + corners.offset[k] * token_stride + channel;
              acc_t v[VEC];
              load_pack<scalar_t, VEC>(value + offset, v);
              const acc_t w = attn * corners.weight[k];
              acc_t g_dot_v = acc_t(0), grad_v[VEC];
#pragma unroll
              for (int i = 0; i < VEC; ++i) {
                g_dot_v += g[i] * v[i];
                grad_v[i] = w * g[i];
              }
              atomic_add_pack<VEC>(grad_value_acc + offset, grad_v);
              grad_attn += corners.weight[k] * g_dot_v;
              grad_x += corners.dweight_dx[k] * g_dot_v;
              grad_y += corners.dweight_dy[k] * g_dot_v;
            }
          }
        }
        grad_attn = group_sum(grad_attn, gl.mask, group_size);
        grad_x = group_sum(grad_x, gl.mask, group_size);
        grad_y = group_sum(grad_y, gl.mask, group_size);
        if (gl.lane == 0) {
          // Pixel coordinate = normalised * size - 0.5, so d pixel / d normalised = size.
          grad_attention_weights[idx] = from_acc<coord_t>(grad_attn);
          grad_sampling_locations[2 * idx] =
              from_acc<coord_t>(attn * grad_x * static_cast<acc_t>(geo.width));
          grad_sampling_locations[2 * idx + 1] =
              from_acc<coord_t>(attn * grad_y * static_cast<acc_t>(geo.height));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launch helpers (torch-free, so the compile check covers them as well).

struct LaunchConfig {
  int vec;         // channels per lane: 1, 2 or 4
  int group_size;  // lanes per (batch, query, head)
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Widest VEC (<= 16-byte packs) that divides C and keeps every pack of `ptrs` aligned. The
// tensors are contiguous with innermost dimension C, so a pack at channel c (a multiple of VEC)
// is aligned iff the base pointer is.
inline int choose_vec(int64_t channels, size_t elem_bytes, const void* const* ptrs, int num_ptrs) {
  for (int vec = 4; vec > 1; vec /= 2) {
    if (channels % vec != 0 || vec * elem_bytes > 16) continue;
    bool aligned = true;
    for (int i = 0; i < num_ptrs; ++i) aligned = aligned && is_aligned(ptrs[i], vec * elem_bytes);
    if (aligned) return vec;
  }
  return 1;
}

inline LaunchConfig make_launch_config(const MSDAShape& shape, int vec, int num_sms) {
  LaunchConfig cfg;
  cfg.vec = vec;
  const int64_t lanes_needed = (shape.channels + vec - 1) / vec;
  int group_size = 1;
  while (group_size < kWarpSize && group_size < lanes_needed) group_size *= 2;
  cfg.group_size = group_size;

  const int64_t num_groups = shape.batch * shape.num_query * shape.num_heads;
  const int64_t groups_per_block = kThreadsPerBlock / group_size;
  int64_t blocks = (num_groups + groups_per_block - 1) / groups_per_block;
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  const int64_t max_blocks = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 32;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  cfg.grid = dim3(static_cast<unsigned>(blocks));
  cfg.block = dim3(kThreadsPerBlock);
  cfg.shared_bytes = sizeof(LevelGeometry) * static_cast<size_t>(shape.num_levels);
  return cfg;
}

// Launches `kernel` with `cfg` on `stream` and returns cudaGetLastError(). Built with
// DETRX_MSDA_HOST_EMULATION (ops/cuda/check/ms_deform_attn_emulate.cpp, no GPU), the same call
// runs the kernel on CPU threads instead, so the launchers below are covered by that check too.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), const LaunchConfig& cfg,
                          cudaStream_t stream, Args&&... args) {
#ifdef DETRX_MSDA_HOST_EMULATION
  (void)stream;
  return detrx_emulate_launch(kernel, cfg.grid, cfg.block, cfg.shared_bytes,
                              static_cast<KernelArgs>(args)...);
#else
  kernel<<<cfg.grid, cfg.block, cfg.shared_bytes, stream>>>(static_cast<KernelArgs>(args)...);
  return cudaGetLastError();
#endif
}

// Forward over the whole batch; expects B * Q * heads * C > 0 and num_levels <= kMaxLevels.
template <typename scalar_t, typename coord_t>
cudaError_t launch_ms_deform_attn_forward(const scalar_t* value, const int64_t* spatial_shapes,
                                          const int64_t* level_start_index,
                                          const coord_t* sampling_locations,
                                          const coord_t* attention_weights, scalar_t* output,
                                          const MSDAShape& shape, int num_sms,
                                          cudaStream_t stream) {
  if (shape.num_levels > kMaxLevels) return cudaErrorInvalidValue;
  const void* ptrs[2] = {value, output};
  const LaunchConfig cfg =
      make_launch_config(shape, choose_vec(shape.channels, sizeof(scalar_t), ptrs, 2), num_sms);
  auto kernel = cfg.vec == 4   ? ms_deform_attn_forward_kernel<scalar_t, coord_t, 4>
                : cfg.vec == 2 ? ms_deform_attn_forward_kernel<scalar_t, coord_t, 2>
                               : ms_deform_attn_forward_kernel<scalar_t, coord_t, 1>;
  return launch_kernel(kernel, cfg, stream, value, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights, output, shape, cfg.group_size);
}

// Backward over the whole batch; grad_value_acc must be zeroed; num_levels <= kMaxLevels.
template <typename scalar_t, typename coord_t>
cudaError_t launch_ms_deform_attn_backward(
    const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
    const coord_t* sampling_locations, const coord_t* attention_weights,
    const scalar_t* grad_output, acc_type<coord_t>* grad_value_acc,
    coord_t* grad_sampling_locations, coord_t* grad_attention_weights, const MSDAShape& shape,
    int num_sms, cudaStream_t stream) {
  if (shape.num_levels > kMaxLevels) return cudaErrorInvalidValue;
  const void* ptrs[2] = {value, grad_output};
  int vec = choose_vec(shape.channels, sizeof(scalar_t), ptrs, 2);
  // Packed atomics (sm_90) need grad_value_acc aligned to a pack of acc_t.
  while (vec > 1 && !is_aligned(grad_value_acc, vec * sizeof(acc_type<coord_t>))) vec /= 2;
  const LaunchConfig cfg = make_launch_config(shape, vec, num_sms);
  auto kernel = cfg.vec == 4   ? ms_deform_attn_backward_kernel<scalar_t, coord_t, 4>
                : cfg.vec == 2 ? ms_deform_attn_backward_kernel<scalar_t, coord_t, 2>
                               : ms_deform_attn_backward_kernel<scalar_t, coord_t, 1>;
  return launch_kernel(kernel, cfg, stream, value, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights, grad_output, grad_value_acc,
                       grad_sampling_locations, grad_attention_weights, shape, cfg.group_size);
}

}  // namespace msda_cuda
}  // namespace detrx

// CUDA's type for each c10 ScalarType name of the dtype table
// (mmdet_detrx/ops/ms_deform_attn_dtypes.def), for the torch-free check and emulation units that
// expand the table themselves.
#define DETRX_CUDA_TYPE_Double double
#define DETRX_CUDA_TYPE_Float float
#define DETRX_CUDA_TYPE_Half __half
#define DETRX_CUDA_TYPE_BFloat16 __nv_bfloat16
