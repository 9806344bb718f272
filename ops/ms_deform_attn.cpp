// Multi-scale deformable attention (Deformable DETR, arXiv:2010.04159): the op's schemas (a
// fragment of the `detrx` library declared in ops/detrx.cpp), the input validation shared by
// every device kernel, and the op's test hook in the `detrx_testing` namespace.
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace detrx {

bool is_supported_dtype_pair(at::ScalarType value, at::ScalarType coordinate) {
#define DETRX_MSDA_DTYPE_PAIR(V, C) \
  if (value == at::k##V && coordinate == at::k##C) return true;
#include DETRX_MSDA_DTYPE_TABLE
#undef DETRX_MSDA_DTYPE_PAIR
  return false;
}

namespace {

// Raises the error that msda::check_levels found in `table`, naming the argument at fault.
void raise_level_problem(const msda::LevelCheck& check, const LevelTable& table,
                         int64_t num_value) {
  const int64_t level = check.level;
  switch (check.problem) {
    case msda::LevelProblem::kNone:
      return;
    case msda::LevelProblem::kNonPositiveSize:
      TORCH_CHECK_VALUE(false, "ms_deform_attn: spatial_shapes must be positive, got (",
                  table.height(level), ", ", table.width(level), ") at level ", level);
    case msda::LevelProblem::kTooManyTokens:
      TORCH_CHECK_VALUE(false, "ms_deform_attn: sum of H * W over spatial_shapes exceeds value.size(1) "
                  "(S=", num_value, "): level ", level, " is (", table.height(level), ", ",
                  table.width(level), ") with ", num_value - check.count,
                  " tokens left after the levels before it");
    case msda::LevelProblem::kTokenCountShort:
      TORCH_CHECK_VALUE(false, "ms_deform_attn: sum of H * W over spatial_shapes (", check.count,
                  ") must equal value.size(1) (S=", num_value, ")");
    case msda::LevelProblem::kWrongStart:
      TORCH_CHECK_VALUE(false, "ms_deform_attn: level_start_index[", level, "] must be ", check.count,
                  " (exclusive cumsum of H * W), got ", table.start(level));
  }
  TORCH_CHECK_VALUE(false, "ms_deform_attn: invalid level table");
}

// One read of the index tensors (copied to the host first if they live on a device): every
// value is loaded exactly once, into memory nobody else writes.
LevelTable snapshot_levels(const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU);
  const at::Tensor starts = level_start_index.to(at::kCPU);
  const auto shape_rows = shapes.accessor<int64_t, 2>();
  const auto start_values = starts.accessor<int64_t, 1>();
  LevelTable table;
  table.levels.resize(shapes.size(0));
  for (int64_t level = 0; level < table.size(); ++level) {
    table.levels[level] = {shape_rows[level][0], shape_rows[level][1], start_values[level]};
  }
  return table;
}

// Validates a snapshot of the level table for num_value tokens, raising an error that names the
// argument at fault.
void check_level_table(const LevelTable& table, int64_t num_value) {
  raise_level_problem(msda::check_levels(table, table.size(), num_value), table, num_value);
}

// What identifies one state of a tensor: the tensor itself (held weakly, so its TensorImpl's
// memory cannot be reused by another tensor while the entry lives), its version counter (bumped
// by every in-place op and resize), and where and how it lays out its data.
struct TensorState {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  uint32_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;
  c10::Device device;

  explicit TensorState(const at::Tensor& t)
      : impl(t.getIntrusivePtr()),
        version(t.unsafeGetTensorImpl()->version_counter().current_version()),
        data(t.const_data_ptr()),
        sizes(t.sizes().vec()),
        strides(t.strides().vec()),
        device(t.device()) {}

  bool expired() const { return impl.expired(); }

  bool matches(const at::Tensor& t) const {
    return !impl.expired() && impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
           version == t.unsafeGetTensorImpl()->version_counter().current_version() &&
           data == t.const_data_ptr() && device == t.device() && t.sizes() == sizes &&
           t.strides() == strides;
  }
};

// Index tensor pairs whose values passed check_levels, most recent last. Small on purpose: a
// model holds one or two level tables at a time; entries of freed tensors are dropped first.
class ValidatedIndexCache {
 public:
  bool contains(const at::Tensor& shapes, const at::Tensor& starts, int64_t num_value) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& entry : entries_) {
      if (entry.num_value == num_value && entry.shapes.matches(shapes) &&
          entry.starts.matches(starts)) {
        return true;
      }
    }
    return false;
  }

  void insert(const at::Tensor& shapes, const at::Tensor& starts, int64_t num_value) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) {
                                    return e.shapes.expired() || e.starts.expired();
                                  }),
                   entries_.end());
    if (entries_.size() >= kCapacity) entries_.erase(entries_.begin());
    entries_.push_back({TensorState(shapes), TensorState(starts), num_value});
  }

 private:
  static constexpr size_t kCapacity = 32;
  struct Entry {
    TensorState shapes, starts;
    int64_t num_value;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

ValidatedIndexCache& validated_index_cache() {
  static ValidatedIndexCache cache;
  return cache;
}

}  // namespace

bool validate_index_values(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                           int64_t num_value, bool host_sync_allowed) {
  TORCH_CHECK_VALUE(spatial_shapes.scalar_type() == at::kLong && spatial_shapes.dim() == 2 &&
                        spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be an int64 tensor of shape (L, 2), got ",
              spatial_shapes.scalar_type(), " ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.scalar_type() == at::kLong &&
                        level_start_index.dim() == 1 &&
                        level_start_index.size(0) == spatial_shapes.size(0),
              "ms_deform_attn: level_start_index must be an int64 tensor of shape (L,) with L=",
              spatial_shapes.size(0), ", got ", level_start_index.scalar_type(), " ",
              level_start_index.sizes());
  TORCH_CHECK_VALUE(level_start_index.device() == spatial_shapes.device(),
                    "ms_deform_attn: level_start_index must be on spatial_shapes' device ",
              spatial_shapes.device(), ", got ", level_start_index.device());
  const bool cacheable = !spatial_shapes.is_inference() && !level_start_index.is_inference();
  ValidatedIndexCache& cache = validated_index_cache();
  if (cacheable && cache.contains(spatial_shapes, level_start_index, num_value)) return true;
  TORCH_CHECK(host_sync_allowed, "ms_deform_attn: spatial_shapes / level_start_index on ",
              spatial_shapes.device(), " must be validated before CUDA graph capture (the "
              "check copies them to the host once per tensor): run the op once with these "
              "tensors before capturing");
  check_level_table(snapshot_levels(spatial_shapes, level_start_index), num_value);
  if (cacheable) cache.insert(spatial_shapes, level_start_index, num_value);
  return false;
}

namespace {

// "value's dtype BFloat16 or Float / Double (mixed precision)": the coordinate dtypes the table
// allows with this value dtype, for the error message.
std::string allowed_coordinate_dtypes(at::ScalarType value_dtype) {
  std::ostringstream allowed;
  allowed << "value's dtype " << value_dtype;
  const char* separator = " or ";
  for (const at::ScalarType wider : {at::kFloat, at::kDouble}) {
    if (wider != value_dtype && is_supported_dtype_pair(value_dtype, wider)) {
      allowed << separator << wider;
      separator = " / ";
    }
  }
  if (value_dtype == at::kHalf || value_dtype == at::kBFloat16) allowed << " (mixed precision)";
  return allowed.str();
}

}  // namespace

LevelTable check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, int64_t im2col_step,
                                       bool host_sync_allowed) {
  TORCH_CHECK_VALUE(im2col_step > 0, "ms_deform_attn: im2col_step must be positive, got ",
                    im2col_step);

  // Ranks.
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must have shape (B, S, heads, C), got ",
                    value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2, "ms_deform_attn: spatial_shapes must have shape (L, 2), got ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1,
                    "ms_deform_attn: level_start_index must have shape (L,), got ",
                    level_start_index.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6,
                    "ms_deform_attn: sampling_locations must have shape (B, Q, heads, L, P, 2), "
                    "got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.dim() == 5,
                    "ms_deform_attn: attention_weights must have shape (B, Q, heads, L, P), got ",
                    attention_weights.sizes());

  // Devices and dtypes.
  const auto device = value.device();
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"spatial_shapes", &spatial_shapes},
      {"level_start_index", &level_start_index},
      {"sampling_locations", &sampling_locations},
      {"attention_weights", &attention_weights}};
  for (const auto& [name, tensor] : others) {
    TORCH_CHECK_VALUE(tensor->device() == device, "ms_deform_attn: ", name,
                      " must be on value's device ", device, ", got ", tensor->device());
  }
  const at::ScalarType value_dtype = value.scalar_type();
  const at::ScalarType coordinate_dtype = sampling_locations.scalar_type();
  TORCH_CHECK_TYPE(is_supported_dtype_pair(value_dtype, value_dtype),
                   "ms_deform_attn: value must be float16, bfloat16, float32 or float64, got ",
                   value_dtype);
  TORCH_CHECK_TYPE(is_supported_dtype_pair(value_dtype, coordinate_dtype),
                   "ms_deform_attn: sampling_locations must have ",
                   allowed_coordinate_dtypes(value_dtype), ", got ", coordinate_dtype);
  TORCH_CHECK_TYPE(attention_weights.scalar_type() == coordinate_dtype,
                   "ms_deform_attn: attention_weights must have sampling_locations' dtype ",
                   coordinate_dtype, ", got ", attention_weights.scalar_type());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong,
                   "ms_deform_attn: spatial_shapes must be int64, got ",
                   spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong,
                   "ms_deform_attn: level_start_index must be int64, got ",
                   level_start_index.scalar_type());

  // Consistent sizes.
  const int64_t B = value.size(0), S = value.size(1), heads = value.size(2);
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(spatial_shapes.size(1) == 2 && L > 0,
                    "ms_deform_attn: spatial_shapes must have shape (L, 2) with L >= 1, got ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.size(0) == L, "ms_deform_attn: level_start_index must have ",
                    L, " entries (one per level of spatial_shapes), got ",
                    level_start_index.size(0));
  TORCH_CHECK_VALUE(sampling_locations.size(0) == B && sampling_locations.size(2) == heads &&
                        sampling_locations.size(3) == L && sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must have shape (B=", B, ", Q, heads=",
                    heads, ", L=", L, ", P, 2), got ", sampling_locations.sizes());
  const int64_t Q = sampling_locations.size(1), P = sampling_locations.size(4);
  TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef({B, Q, heads, L, P}),
                    "ms_deform_attn: attention_weights must have shape (B=", B, ", Q=", Q,
                    ", heads=", heads, ", L=", L, ", P=", P, "), got ",
                    attention_weights.sizes());

  // Values of the small index tensors: they keep every gathered index inside value.
  if (device.is_cpu()) {
    LevelTable table = snapshot_levels(spatial_shapes, level_start_index);
    check_level_table(table, S);
    return table;  // the kernels run on this validated copy
  }
  validate_index_values(spatial_shapes, level_start_index, S, host_sync_allowed);
  return {};
}

void check_ms_deform_attn_grad_output(const at::Tensor& value,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& grad_output) {
  const int64_t B = value.size(0), heads = value.size(2), C = value.size(3);
  const int64_t Q = sampling_locations.size(1);
  TORCH_CHECK_VALUE(grad_output.device() == value.device(),
                    "ms_deform_attn: grad_output must be on value's device ", value.device(),
                    ", got ", grad_output.device());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(),
                   "ms_deform_attn: grad_output must have value's dtype ", value.scalar_type(),
                   ", got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({B, Q, heads * C}),
                    "ms_deform_attn: grad_output must have shape (B=", B, ", Q=", Q,
                    ", heads*C=", heads * C, "), got ", grad_output.sizes());
}

TORCH_LIBRARY_FRAGMENT(detrx, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, "
      "int im2col_step) -> (Tensor, Tensor, Tensor)");
}

// Test and debugging hook of the validation cache (see validate_index_values): validates the
// index values for num_value tokens and returns whether that came from the cache.
TORCH_LIBRARY_FRAGMENT(detrx_testing, m) {
  m.def(
      "ms_deform_attn_validate_index_values(Tensor spatial_shapes, Tensor level_start_index, "
      "int num_value) -> bool",
      [](const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
         int64_t num_value) {
        return validate_index_values(spatial_shapes, level_start_index, num_value);
      });
}

}  // namespace detrx
