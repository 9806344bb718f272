// Torch-free translation unit for tools/check_cuda_kernels.py: explicitly instantiates every
// multi-scale deformable attention kernel and launcher for every supported dtype pair, so
// `nvcc -c` on a machine without a CUDA build of torch type-checks and compiles all device code
// for the target architectures. Not part of the extension (setup.py only globs ops/cuda/*.cu).
#include "cuda/ms_deform_attn_kernel.cuh"

namespace detrx {
namespace msda_cuda {

#define DETRX_MSDA_INSTANTIATE_KERNELS(T, U, VEC)                                               \
  template __global__ void ms_deform_attn_forward_kernel<T, U, VEC>(                             \
      const T*, const int64_t*, const int64_t*, const U*, const U*, T*, MSDAShape, int);         \
  template __global__ void ms_deform_attn_backward_kernel<T, U, VEC>(                            \
      const T*, const int64_t*, const int64_t*, const U*, const U*, const T*, acc_type<U>*, U*, \
      U*, MSDAShape, int);

// T: value's type, U: the type of sampling_locations / attention_weights.
#define DETRX_MSDA_INSTANTIATE(T, U)                                                            \
  DETRX_MSDA_INSTANTIATE_KERNELS(T, U, 1)                                                       \
  DETRX_MSDA_INSTANTIATE_KERNELS(T, U, 2)                                                       \
  DETRX_MSDA_INSTANTIATE_KERNELS(T, U, 4)                                                       \
  template cudaError_t launch_ms_deform_attn_forward<T, U>(const T*, const int64_t*,            \
                                                           const int64_t*, const U*, const U*,  \
                                                           T*, const MSDAShape&, int,           \
                                                           cudaStream_t);                       \
  template cudaError_t launch_ms_deform_attn_backward<T, U>(                                    \
      const T*, const int64_t*, const int64_t*, const U*, const U*, const T*, acc_type<U>*, U*, \
      U*, const MSDAShape&, int, cudaStream_t);

// Every pair of the dtype table, in CUDA's type names.
#define DETRX_MSDA_DTYPE_PAIR(V, C) DETRX_MSDA_INSTANTIATE(DETRX_CUDA_TYPE_##V, DETRX_CUDA_TYPE_##C)
#include "../../../mmdet_detrx/ops/ms_deform_attn_dtypes.def"
#undef DETRX_MSDA_DTYPE_PAIR

#undef DETRX_MSDA_INSTANTIATE
#undef DETRX_MSDA_INSTANTIATE_KERNELS

}  // namespace msda_cuda
}  // namespace detrx
