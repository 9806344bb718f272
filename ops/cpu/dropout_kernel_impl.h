// The CPU kernel of `detrx::dropout`, compiled once per instruction set:
// ops/cpu/isa/dropout_kernel_<ISA>.cpp defines CPU_CAPABILITY and includes this file (see
// ms_deform_attn_kernel_impl.h for the scheme); ops/cpu/dropout_kernel.cpp calls the level chosen
// at load time.
//
// Mask bits come from SplitMix64's output function (Steele, Lea & Flood, "Fast splittable
// pseudorandom number generators", OOPSLA 2014) applied to a counter: the k-th 64-bit draw of
// stream `seed` is mix64(seed + (k + 1) * gamma), exactly SplitMix64's k-th output from state
// `seed`, and elements 2k and 2k + 1 take its low and high 32 bits. A draw depends only on
// (seed, index): the mask is the same for every thread count, chunking and level, and the
// backward recomputes it instead of reading a saved mask.
//
// A block is two loops the compiler vectorises: the draws of its pairs (64-bit multiplies:
// vpmullq at AVX512, emulated at the lower levels), then out = in * (draw >= threshold ? scale
// : 0) in the arithmetic type, rounded once to the element type.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including this file"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "cpu/dropout_kernel.h"

namespace detrx {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Pairs of elements per block (the draws of a block stay in L1) and per parallel chunk.
constexpr int64_t kBlockPairs = 512;
constexpr int64_t kChunkPairs = 16384;

template <typename scalar_t>
void dropout_typed(const DropoutArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* input = static_cast<const scalar_t*>(args.input);
  auto* output = static_cast<scalar_t*>(args.output);
  const int64_t numel = args.numel;
  const uint32_t threshold = args.threshold;
  const acc_t keep = args.keep_none ? acc_t(0) : static_cast<acc_t>(args.scale);
  const uint64_t seed = args.seed;
  const int64_t num_pairs = (numel + 1) / 2;
  at::parallel_for(0, num_pairs, kChunkPairs, [&](int64_t begin, int64_t end) {
    // Locals, not the closure's members: a select between members compiled to a masked load,
    // which kept the loop below scalar.
    const acc_t kept = keep, dropped = acc_t(0);
    const uint32_t bar = threshold;
    alignas(64) uint32_t words[2 * kBlockPairs];
    for (int64_t block = begin; block < end; block += kBlockPairs) {
      const int64_t pairs = std::min(kBlockPairs, end - block);
      const uint64_t first = seed + (static_cast<uint64_t>(block) + 1) * kGamma;
      for (int64_t k = 0; k < pairs; ++k) {
        const uint64_t draw = mix64(first + static_cast<uint64_t>(k) * kGamma);
        words[2 * k] = static_cast<uint32_t>(draw);
        words[2 * k + 1] = static_cast<uint32_t>(draw >> 32);
      }
      const int64_t start = 2 * block;
      const int64_t count = std::min<int64_t>(2 * pairs, numel - start);
      const scalar_t* in = input + start;
      scalar_t* out = output + start;
      for (int64_t i = 0; i < count; ++i) {
        const acc_t factor = words[i] >= bar ? kept : dropped;
        out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * factor);
      }
    }
  });
}

}  // namespace

void dropout(const DropoutArgs& args) {
  switch (args.dtype) {
    case at::kFloat:
      return dropout_typed<float>(args);
    case at::kDouble:
      return dropout_typed<double>(args);
    case at::kHalf:
      return dropout_typed<c10::Half>(args);
    case at::kBFloat16:
      return dropout_typed<c10::BFloat16>(args);
    default:
      TORCH_CHECK(false, "detrx::dropout: unsupported dtype ", args.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace detrx
