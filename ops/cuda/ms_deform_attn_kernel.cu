// CUDA registration of multi-scale deformable attention (Deformable DETR, arXiv:2010.04159):
// validation, allocation, dtype dispatch and launch. The device code (and the reasoning behind
// its work decomposition) lives in the torch-free ms_deform_attn_kernel.cuh.
//
// im2col_step is validated and otherwise ignored: the kernels cover the whole batch in one
// launch, so any batch size works and no im2col buffer is needed.
//
// No per-call host synchronisation: the values of the (device) index tensors are validated by
// check_ms_deform_attn_inputs once per tensor (validate_index_values caches the result by
// identity and version counter) and re-checked on the device by every block (stage_levels), so
// a call on already-validated tensors only enqueues work and can be captured in a CUDA graph.
//
// Determinism: the backward scatters grad_value with atomicAdd, so its summation order (and the
// last bits of grad_value) varies from run to run. Like ATen's scatter-add kernels it raises
// PyTorch's non-determinism alert under torch.use_deterministic_algorithms(True) (a warning with
// warn_only=True). The forward and the CPU kernels are deterministic.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_kernel.cuh"

namespace detrx {
namespace {

// at::Half / at::BFloat16 share the bit layout of CUDA's __half / __nv_bfloat16.
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const typename CudaScalar<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename CudaScalar<T>::type* cuda_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaScalar<T>::type*>(t.mutable_data_ptr<T>());
}

msda_cuda::MSDAShape make_shape(const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(sampling_locations.size(3) <= msda_cuda::kMaxLevels,
              "ms_deform_attn: the CUDA kernels support at most ", msda_cuda::kMaxLevels,
              " levels, got spatial_shapes with ", sampling_locations.size(3), " rows");
  TORCH_CHECK(sampling_locations.size(4) <= std::numeric_limits<int>::max(),
              "ms_deform_attn: the CUDA kernels support at most ",
              std::numeric_limits<int>::max(), " points per level, got sampling_locations.size(4)"
              " = ", sampling_locations.size(4));
  msda_cuda::MSDAShape shape;
  shape.batch = value.size(0);
  shape.num_value = value.size(1);
  shape.num_heads = value.size(2);
  shape.channels = value.size(3);
  shape.num_query = sampling_locations.size(1);
  shape.num_levels = static_cast<int>(sampling_locations.size(3));
  shape.num_points = static_cast<int>(sampling_locations.size(4));
  return shape;
}

// Streaming multiprocessors of the current device (sizes the grid-stride launch). Read with the
// runtime API rather than at::cuda::getCurrentDeviceProperties() so that this file needs only
// c10/cuda headers, not ATen/cuda/CUDAContext.h's cuBLAS / cuSPARSE / cuSOLVER ones; that lets
// tools/check_cuda_kernels.py compile it with a bare CUDA toolkit.
// Whether the current stream is being captured into a CUDA graph: the index check must not copy
// to the host then.
bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

int num_sms() {
  int count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, int64_t im2col_step) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_forward_cuda: value must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(value.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, im2col_step,
                              /*host_sync_allowed=*/!stream_is_capturing(stream));

  const msda_cuda::MSDAShape shape = make_shape(value, sampling_locations);
  const std::vector<int64_t> output_size = {shape.batch, shape.num_query,
                                            shape.num_heads * shape.channels};
  // With no sampling points every output is an empty sum; otherwise the kernel writes it all.
  if (shape.num_points == 0) return at::zeros(output_size, value.options());
  at::Tensor output = at::empty(output_size, value.options());
  if (output.numel() == 0) return output;

  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();

  dispatch_dtype_pair(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward_cuda",
      [&](auto types) {
        using scalar_t = typename decltype(types)::value_t;
        using coord_t = typename decltype(types)::coordinate_t;
        C10_CUDA_CHECK(msda_cuda::launch_ms_deform_attn_forward(
            cuda_ptr<scalar_t>(value_c), shapes_c.const_data_ptr<int64_t>(),
            starts_c.const_data_ptr<int64_t>(), cuda_ptr<coord_t>(locations_c),
            cuda_ptr<coord_t>(weights_c), cuda_mutable_ptr<scalar_t>(output), shape, num_sms(),
            stream));
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t im2col_step) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_backward_cuda: value must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(value.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, im2col_step,
                              /*host_sync_allowed=*/!stream_is_capturing(stream));
  check_ms_deform_attn_grad_output(value, sampling_locations, grad_output);
  // Raises (or warns, with warn_only=True) under torch.use_deterministic_algorithms(True): the
  // atomicAdd scatter into grad_value sums in a run-dependent order.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");

  const msda_cuda::MSDAShape shape = make_shape(value, sampling_locations);
  // fp32 (fp64 for double coordinates) buffer for the atomic scatter into grad_value; it is
  // grad_value itself when value already has that dtype.
  const at::ScalarType acc_dtype =
      sampling_locations.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  const bool has_work = shape.batch * shape.num_query * shape.num_heads > 0 &&
                        shape.channels > 0 && shape.num_points > 0;
  // The kernel writes every location / weight gradient (zero for points off the map); without
  // channels there is nothing to differentiate and they are zero.
  const auto make_grad = [&](const at::Tensor& input) {
    return has_work ? at::empty(input.sizes(), input.options())
                    : at::zeros(input.sizes(), input.options());
  };
  at::Tensor grad_sampling_locations = make_grad(sampling_locations);
  at::Tensor grad_attention_weights = make_grad(attention_weights);

  if (has_work) {
    const at::Tensor value_c = value.contiguous();
    const at::Tensor shapes_c = spatial_shapes.contiguous();
    const at::Tensor starts_c = level_start_index.contiguous();
    const at::Tensor locations_c = sampling_locations.contiguous();
    const at::Tensor weights_c = attention_weights.contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();

    dispatch_dtype_pair(
        value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward_cuda",
        [&](auto types) {
          using scalar_t = typename decltype(types)::value_t;
          using coord_t = typename decltype(types)::coordinate_t;
          using acc_t = msda_cuda::acc_type<typename CudaScalar<coord_t>::type>;
          C10_CUDA_CHECK(msda_cuda::launch_ms_deform_attn_backward(
              cuda_ptr<scalar_t>(value_c), shapes_c.const_data_ptr<int64_t>(),
              starts_c.const_data_ptr<int64_t>(), cuda_ptr<coord_t>(locations_c),
              cuda_ptr<coord_t>(weights_c), cuda_ptr<scalar_t>(grad_output_c),
              grad_value_acc.mutable_data_ptr<acc_t>(),
              cuda_mutable_ptr<coord_t>(grad_sampling_locations),
              cuda_mutable_ptr<coord_t>(grad_attention_weights), shape, num_sms(), stream));
        });
  }
  at::Tensor grad_value = grad_value_acc.to(value.scalar_type());  // no-op for float / double
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(detrx, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace detrx
