// Multi-scale deformable attention (Deformable DETR, arXiv:2010.04159): op schemas of the `detrx`
// namespace, the input validation shared by every device kernel, and the Python module init of
// `mmdet_detrx._C` (the module carries no functions: importing it loads this library, whose static
// initialisers register the ops with the dispatcher; Python calls them via torch.ops.detrx).
#include <Python.h>

#include <torch/library.h>

#include "ms_deform_attn.h"

namespace detrx {

void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, int64_t im2col_step) {
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn: im2col_step must be positive, got ", im2col_step);

  // Ranks.
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must have shape (B, S, heads, C), got ",
              value.dim(), " dims");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must have shape (L, 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1,
              "ms_deform_attn: level_start_index must have shape (L,), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must have shape (B, Q, heads, L, P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must have shape (B, Q, heads, L, P), got ",
              attention_weights.sizes());

  // Devices and dtypes.
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device,
              "ms_deform_attn: spatial_shapes must be on value's device ", device, ", got ",
              spatial_shapes.device());
  TORCH_CHECK(level_start_index.device() == device,
              "ms_deform_attn: level_start_index must be on value's device ", device, ", got ",
              level_start_index.device());
  TORCH_CHECK(sampling_locations.device() == device,
              "ms_deform_attn: sampling_locations must be on value's device ", device, ", got ",
              sampling_locations.device());
  TORCH_CHECK(attention_weights.device() == device,
              "ms_deform_attn: attention_weights must be on value's device ", device, ", got ",
              attention_weights.device());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_attn: value must be a floating tensor, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type(),
              "ms_deform_attn: sampling_locations must have value's dtype ", value.scalar_type(),
              ", got ", sampling_locations.scalar_type());
  TORCH_CHECK(attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: attention_weights must have value's dtype ", value.scalar_type(),
              ", got ", attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());

  // Consistent sizes.
  const int64_t B = value.size(0), S = value.size(1), heads = value.size(2);
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(L > 0, "ms_deform_attn: spatial_shapes must describe at least one level");
  TORCH_CHECK(level_start_index.size(0) == L, "ms_deform_attn: level_start_index must have ",
              L, " entries (one per row of spatial_shapes), got ", level_start_index.size(0));
  TORCH_CHECK(sampling_locations.size(0) == B && sampling_locations.size(2) == heads &&
                  sampling_locations.size(3) == L,
              "ms_deform_attn: sampling_locations must have shape (B=", B, ", Q, heads=", heads,
              ", L=", L, ", P, 2), got ", sampling_locations.sizes());
  const int64_t Q = sampling_locations.size(1), P = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.sizes() ==
                  at::IntArrayRef({B, Q, heads, L, P}),
              "ms_deform_attn: attention_weights must have shape (B=", B, ", Q=", Q,
              ", heads=", heads, ", L=", L, ", P=", P, "), got ", attention_weights.sizes());

  // Values of the small index tensors: positive sizes, sum_l H_l * W_l == S and
  // level_start_index == exclusive cumsum, which keeps every gathered index inside value.
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shape_data = shapes.const_data_ptr<int64_t>();
  const int64_t* start_data = starts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t level = 0; level < L; ++level) {
    const int64_t H = shape_data[2 * level], W = shape_data[2 * level + 1];
    TORCH_CHECK(H > 0 && W > 0, "ms_deform_attn: spatial_shapes must be positive, got (", H,
                ", ", W, ") at level ", level);
    total += H * W;
  }
  TORCH_CHECK(total == S, "ms_deform_attn: sum of H * W over spatial_shapes (", total,
              ") must equal value.size(1) (S=", S, ")");
  int64_t start = 0;
  for (int64_t level = 0; level < L; ++level) {
    TORCH_CHECK(start_data[level] == start, "ms_deform_attn: level_start_index[", level,
                "] must be ", start, " (exclusive cumsum of H * W), got ", start_data[level]);
    start += shape_data[2 * level] * shape_data[2 * level + 1];
  }
}

void check_ms_deform_attn_grad_output(const at::Tensor& value,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& grad_output) {
  const int64_t B = value.size(0), heads = value.size(2), C = value.size(3);
  const int64_t Q = sampling_locations.size(1);
  TORCH_CHECK(grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must be on value's device ", value.device(), ", got ",
              grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn: grad_output must have value's dtype ", value.scalar_type(),
              ", got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({B, Q, heads * C}),
              "ms_deform_attn: grad_output must have shape (B=", B, ", Q=", Q,
              ", heads*C=", heads * C, "), got ", grad_output.sizes());
}

TORCH_LIBRARY(detrx, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, "
      "int im2col_step) -> (Tensor, Tensor, Tensor)");
}

}  // namespace detrx

// A plain CPython extension module: `import mmdet_detrx._C` dlopens this library.
static struct PyModuleDef detrx_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native kernels of mmdet-detrx, registered as torch.ops.detrx.*", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&detrx_module); }
