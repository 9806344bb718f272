// Host emulation of the CUDA kernels in ops/cuda/ms_deform_attn_kernel.cuh, for machines without
// a GPU (tools/check_cuda_kernels.py --emulate builds it with nvcc's host compiler).
//
// The unmodified kernel bodies and launchers run on the CPU: the blocks of the launch
// configuration run one after the other, each CUDA thread as a fiber; __syncthreads is a block
// barrier, __shfl_xor_sync exchanges values between the lanes named in its mask (and aborts if a
// lane outside the mask would be read or if the calling lane is not in it, or on deadlock), and
// shared memory is one array. This checks the indexing, the
// channel vectorisation and alignment fallback, the group shuffles and the grid-stride loop
// against the PyTorch reference. It cannot find races, memory-model or performance problems:
// that needs a GPU (see docs/cuda.md).
//
// Usage: ms_deform_attn_emulate DIR. DIR/meta.txt holds "dtype B S heads C Q L P num_sms
// value_offset" (dtype: float, double, half or bfloat16, or VALUE:COORDINATE such as
// bfloat16:float for mixed precision, the second naming the dtype of sampling_locations /
// attention_weights); DIR/{spatial_shapes,level_start_index}.bin are int64,
// DIR/{value,sampling_locations,attention_weights,grad_output}.bin float64. Writes
// DIR/{output,grad_value,grad_sampling_locations,grad_attention_weights}.bin as float64.
// A kernel that traps (an inconsistent level table) ends the process with status 3.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "emulation error: %s\n", message.c_str());
  std::exit(2);
}

// CUDA threads of one block are fibers (ucontext) on a single OS thread, switched only where a
// CUDA thread may wait for others (barriers), so runs are deterministic and cheap.
struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 thread_idx;
  bool done = false;
};

struct Scheduler {
  ucontext_t main_context;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::function<void()> body;  // the kernel call of the running launch
  bool progress = false;       // did any fiber do more than re-check a barrier this round?

  void yield() { swapcontext(&current->context, &main_context); }
};

Scheduler scheduler;
uint3 block_idx;
dim3 block_dim, grid_dim;

void fiber_entry() {
  scheduler.body();
  scheduler.current->done = true;
  scheduler.progress = true;
}  // returns to uc_link = main_context

// Barrier for `count` fibers; waiting fibers yield until the generation changes.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    scheduler.progress = true;
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    while (generation_ == generation) scheduler.yield();
  }

 private:
  int count_, arrived_ = 0;
  uint64_t generation_ = 0;
};

// Per-block state: __syncthreads barrier, one barrier per (warp, shuffle mask), and the slots
// through which shuffles exchange values.
struct Block {
  std::unique_ptr<Barrier> sync;
  std::map<std::pair<int, unsigned>, std::unique_ptr<Barrier>> mask_barriers;
  double slots[kMaxThreads / 32][32];

  Barrier& for_mask(int warp, unsigned mask) {
    auto& barrier = mask_barriers[{warp, mask}];
    if (!barrier) barrier = std::make_unique<Barrier>(__builtin_popcount(mask));
    return *barrier;
  }
};

Block* block = nullptr;

template <typename T>
T shfl_xor_sync(unsigned mask, T value, int lane_mask, int width) {
  const int thread = scheduler.current->thread_idx.x;
  const int lane = thread % 32, warp = thread / 32;
  const int source = lane ^ lane_mask;
  if (!(mask >> lane & 1u)) fail("__shfl_xor_sync called by a lane outside its mask");
  if (source / width != lane / width || !(mask >> source & 1u)) {
    fail("__shfl_xor_sync reads a lane outside the mask or the width segment");
  }
  Barrier& barrier = block->for_mask(warp, mask);
  block->slots[warp][lane] = static_cast<double>(value);
  barrier.arrive_and_wait();
  const double result = block->slots[warp][source];
  barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return static_cast<T>(result);
}

template <typename T>
T atomic_add(T* address, T value) {  // fibers never switch inside: trivially atomic
  const T old = *address;
  *address = old + value;
  return old;
}

}  // namespace emu

#define threadIdx (emu::scheduler.current->thread_idx)
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __launch_bounds__(...)
#define __syncthreads() emu::block->sync->arrive_and_wait()
#define __shfl_xor_sync emu::shfl_xor_sync
#define atomicAdd emu::atomic_add
#define __ffs __builtin_ffs
#define __trap()                                      \
  do {                                                \
    std::fprintf(stderr, "emulation: kernel trapped\n"); \
    std::exit(3);                                     \
  } while (0)

template <typename... KernelArgs>
cudaError_t detrx_emulate_launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                                 size_t shared_bytes, KernelArgs... args);

#define DETRX_MSDA_HOST_EMULATION
#include "cuda/ms_deform_attn_kernel.cuh"

namespace detrx {
namespace msda_cuda {
// Dynamic shared memory of the running block (the kernels' `extern __shared__` array).
LevelGeometry msda_levels[emu::kMaxThreads];
}  // namespace msda_cuda
}  // namespace detrx

template <typename... KernelArgs>
cudaError_t detrx_emulate_launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                                 size_t shared_bytes, KernelArgs... args) {
  if (block.x > emu::kMaxThreads || block.x % 32 != 0 || block.y != 1 || block.z != 1 ||
      grid.y != 1 || grid.z != 1) {
    emu::fail("unsupported launch configuration");
  }
  if (shared_bytes > sizeof(detrx::msda_cuda::msda_levels)) emu::fail("shared memory too large");
  emu::Scheduler& scheduler = emu::scheduler;
  emu::grid_dim = grid;
  emu::block_dim = block;
  scheduler.body = [=] { kernel(args...); };
  scheduler.fibers.resize(block.x);
  for (unsigned b = 0; b < grid.x; ++b) {
    emu::Block state;
    state.sync = std::make_unique<emu::Barrier>(block.x);
    emu::block = &state;
    emu::block_idx = make_uint3(b, 0, 0);
    for (unsigned t = 0; t < block.x; ++t) {
      emu::Fiber& fiber = scheduler.fibers[t];
      if (!fiber.stack) fiber.stack.reset(new char[emu::kStackBytes]);
      fiber.thread_idx = make_uint3(t, 0, 0);
      fiber.done = false;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = emu::kStackBytes;
      fiber.context.uc_link = &scheduler.main_context;
      makecontext(&fiber.context, emu::fiber_entry, 0);
    }
    // Round-robin until every thread of the block returned; a round in which nobody moved means
    // threads wait at barriers the others never reach.
    for (bool all_done = false; !all_done;) {
      all_done = true;
      scheduler.progress = false;
      for (emu::Fiber& fiber : scheduler.fibers) {
        if (fiber.done) continue;
        scheduler.current = &fiber;
        swapcontext(&scheduler.main_context, &fiber.context);
        all_done = all_done && fiber.done;
      }
      if (!all_done && !scheduler.progress) emu::fail("deadlock: threads wait at barriers");
    }
    scheduler.current = nullptr;
    emu::block = nullptr;
  }
  return cudaSuccess;
}

namespace {

using detrx::msda_cuda::acc_type;

template <typename T>
std::vector<T> read_bin(const std::string& path, size_t count) {
  std::vector<T> data(count);
  std::ifstream file(path, std::ios::binary);
  if (!file.read(reinterpret_cast<char*>(data.data()), count * sizeof(T))) {
    emu::fail("cannot read " + std::to_string(count) + " values from " + path);
  }
  return data;
}

void write_bin(const std::string& path, const std::vector<double>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(double));
  if (!file) emu::fail("cannot write " + path);
}

template <typename T>
T from_double(double x) {
  return static_cast<T>(x);
}
template <>
__half from_double<__half>(double x) {
  return __double2half(x);
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __double2bfloat16(x);
}

double to_double(float x) { return x; }
double to_double(double x) { return x; }
double to_double(__half x) { return __half2float(x); }
double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
std::vector<T> convert(const std::vector<double>& data) {
  std::vector<T> out(data.size());
  for (size_t i = 0; i < data.size(); ++i) out[i] = from_double<T>(data[i]);
  return out;
}

template <typename T>
std::vector<double> to_doubles(const T* data, size_t count) {
  std::vector<double> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = to_double(data[i]);
  return out;
}

// T: value's type, U: that of sampling_locations / attention_weights.
template <typename T, typename U>
void run(const std::string& dir, const detrx::msda_cuda::MSDAShape& shape, int num_sms,
         size_t value_offset) {
  const size_t B = shape.batch, S = shape.num_value, heads = shape.num_heads,
               C = shape.channels, Q = shape.num_query, L = shape.num_levels,
               P = shape.num_points;
  const size_t num_value = B * S * heads * C, num_points = B * Q * heads * L * P;
  const size_t num_output = B * Q * heads * C;
  const auto spatial_shapes = read_bin<int64_t>(dir + "/spatial_shapes.bin", 2 * L);
  const auto level_start = read_bin<int64_t>(dir + "/level_start_index.bin", L);
  // value_offset elements in front of value shift its alignment (scalar-load fallback).
  std::vector<T> value_storage(value_offset);
  const auto value_data = convert<T>(read_bin<double>(dir + "/value.bin", num_value));
  value_storage.insert(value_storage.end(), value_data.begin(), value_data.end());
  const T* value = value_storage.data() + value_offset;
  const auto locations =
      convert<U>(read_bin<double>(dir + "/sampling_locations.bin", 2 * num_points));
  const auto weights = convert<U>(read_bin<double>(dir + "/attention_weights.bin", num_points));
  const auto grad_output = convert<T>(read_bin<double>(dir + "/grad_output.bin", num_output));

  std::vector<T> output(num_output);
  if (detrx::msda_cuda::launch_ms_deform_attn_forward<T, U>(
          value, spatial_shapes.data(), level_start.data(), locations.data(), weights.data(),
          output.data(), shape, num_sms, nullptr) != cudaSuccess) {
    emu::fail("forward launch failed");
  }
  std::vector<acc_type<U>> grad_value(num_value, acc_type<U>(0));
  std::vector<U> grad_locations(2 * num_points), grad_weights(num_points);
  if (detrx::msda_cuda::launch_ms_deform_attn_backward<T, U>(
          value, spatial_shapes.data(), level_start.data(), locations.data(), weights.data(),
          grad_output.data(), grad_value.data(), grad_locations.data(), grad_weights.data(),
          shape, num_sms, nullptr) != cudaSuccess) {
    emu::fail("backward launch failed");
  }
  write_bin(dir + "/output.bin", to_doubles(output.data(), output.size()));
  // Half / bfloat16 grad_value is rounded once from the fp32 buffer, as the .cu does.
  write_bin(dir + "/grad_value.bin",
            to_doubles(convert<T>(to_doubles(grad_value.data(), num_value)).data(), num_value));
  write_bin(dir + "/grad_sampling_locations.bin",
            to_doubles(grad_locations.data(), grad_locations.size()));
  write_bin(dir + "/grad_attention_weights.bin",
            to_doubles(grad_weights.data(), grad_weights.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) emu::fail("usage: ms_deform_attn_emulate DIR");
  const std::string dir = argv[1];
  std::ifstream meta(dir + "/meta.txt");
  std::string dtype;
  detrx::msda_cuda::MSDAShape shape;
  int num_sms = 0;
  size_t value_offset = 0;
  if (!(meta >> dtype >> shape.batch >> shape.num_value >> shape.num_heads >> shape.channels >>
        shape.num_query >> shape.num_levels >> shape.num_points >> num_sms >> value_offset)) {
    emu::fail("cannot parse " + dir + "/meta.txt");
  }
  if (shape.num_levels > emu::kMaxThreads) emu::fail("too many levels");
  // Every pair of the dtype table, keyed as check_cuda_kernels.py names them: "half" for
  // (Half, Half), "half:float" for (Half, Float), ... (the c10 names in lower case).
  using Run = void (*)(const std::string&, const detrx::msda_cuda::MSDAShape&, int, size_t);
  const auto key = [](std::string value, std::string coordinate) {
    for (std::string* name : {&value, &coordinate}) {
      for (char& c : *name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return value == coordinate ? value : value + ":" + coordinate;
  };
  const std::map<std::string, Run> runs = {
#define DETRX_MSDA_DTYPE_PAIR(V, C) \
  {key(#V, #C), run<DETRX_CUDA_TYPE_##V, DETRX_CUDA_TYPE_##C>},
#include "../../../mmdet_detrx/ops/ms_deform_attn_dtypes.def"
#undef DETRX_MSDA_DTYPE_PAIR
  };
  const auto found = runs.find(dtype);
  if (found == runs.end()) emu::fail("unknown dtype " + dtype);
  found->second(dir, shape, num_sms, value_offset);
  return 0;
}
