// Torch-free translation unit for tools/check_cuda_kernels.py: explicitly instantiates every
// multi-scale deformable attention kernel and launcher for every scalar type, so `nvcc -c` on a
// machine without a CUDA build of torch type-checks and compiles all device code for the target
// architectures. Not part of the extension (setup.py only globs ops/cuda/*.cu).
#include "cuda/ms_deform_attn_kernel.cuh"

namespace detrx {
namespace msda_cuda {

#define DETRX_MSDA_INSTANTIATE_KERNELS(T, VEC)                                                   \
  template __global__ void ms_deform_attn_forward_kernel<T, VEC>(                                \
      const T*, const int64_t*, const int64_t*, const T*, const T*, T*, MSDAShape, int);         \
  template __global__ void ms_deform_attn_backward_kernel<T, VEC>(                               \
      const T*, const int64_t*, const int64_t*, const T*, const T*, const T*, acc_type<T>*, T*, \
      T*, MSDAShape, int);

#define DETRX_MSDA_INSTANTIATE(T)                                                               \
  DETRX_MSDA_INSTANTIATE_KERNELS(T, 1)                                                          \
  DETRX_MSDA_INSTANTIATE_KERNELS(T, 2)                                                          \
  DETRX_MSDA_INSTANTIATE_KERNELS(T, 4)                                                          \
  template cudaError_t launch_ms_deform_attn_forward<T>(const T*, const int64_t*,               \
                                                        const int64_t*, const T*, const T*, T*, \
                                                        const MSDAShape&, int, cudaStream_t);   \
  template cudaError_t launch_ms_deform_attn_backward<T>(                                       \
      const T*, const int64_t*, const int64_t*, const T*, const T*, const T*, acc_type<T>*, T*, \
      T*, const MSDAShape&, int, cudaStream_t);

DETRX_MSDA_INSTANTIATE(float)
DETRX_MSDA_INSTANTIATE(double)
DETRX_MSDA_INSTANTIATE(__half)
DETRX_MSDA_INSTANTIATE(__nv_bfloat16)

#undef DETRX_MSDA_INSTANTIATE
#undef DETRX_MSDA_INSTANTIATE_KERNELS

}  // namespace msda_cuda
}  // namespace detrx
