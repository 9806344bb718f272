// CPU kernel of `detrx::dropout` (ops/dropout.cpp). Mask bits come from SplitMix64's output
// function (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014)
// applied to a counter: the k-th 64-bit draw of stream `seed` is mix64(seed + (k + 1) * gamma),
// exactly SplitMix64's k-th output from state `seed`, and elements 2k and 2k + 1 take its low and
// high 32 bits. A draw depends only on (seed, index), so the mask is the same for every thread
// count and chunking, and the backward recomputes it instead of reading a saved mask.
//
// torch's CPU dropout fills a float mask with bernoulli_ (one Mersenne-Twister draw per element),
// divides it by 1 - p and multiplies; this is one pass that reads the input and writes the output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace detrx {
namespace {

constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Pairs of elements per at::parallel_for chunk: large enough that a chunk's start-up is noise.
constexpr int64_t kPairsPerChunk = 16384;

template <typename scalar_t>
void dropout_kernel(const scalar_t* input, scalar_t* output, int64_t numel, uint32_t threshold,
                    bool keep_all_below, double scale, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t keep = static_cast<acc_t>(scale);
  // Element i is kept when its draw is >= threshold (so p = 0 keeps everything, threshold 0);
  // keep_all_below marks p = 1, where no draw is kept and every element is multiplied by 0.
  const auto factor = [&](uint32_t draw) -> acc_t {
    return (!keep_all_below && draw >= threshold) ? keep : acc_t(0);
  };
  const int64_t num_pairs = numel / 2 + (numel % 2);
  at::parallel_for(0, num_pairs, kPairsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint64_t draw = mix64(seed + (static_cast<uint64_t>(k) + 1) * kGamma);
      const int64_t i = 2 * k;
      output[i] = static_cast<scalar_t>(static_cast<acc_t>(input[i]) *
                                        factor(static_cast<uint32_t>(draw)));
      if (i + 1 < numel) {
        output[i + 1] = static_cast<scalar_t>(static_cast<acc_t>(input[i + 1]) *
                                              factor(static_cast<uint32_t>(draw >> 32)));
      }
    }
  });
}

at::Tensor dropout_cpu(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.0 && p <= 1.0,
                    "detrx::dropout: p must be a probability in [0, 1], got ", p);
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
                   "detrx::dropout: input must be a floating-point tensor, got ",
                   input.scalar_type());
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::empty_like(source, at::MemoryFormat::Contiguous);
  const int64_t numel = source.numel();
  if (numel == 0) return output;
  // P(draw < threshold) = threshold / 2^32 = p, rounded to the nearest representable value;
  // p within 2^-33 of 1 keeps 1 draw in 2^32.
  const double scaled = std::nearbyint(p * 4294967296.0);
  const uint32_t threshold =
      scaled >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(scaled);
  const bool keep_none = p == 1.0;
  const double scale = keep_none ? 0.0 : 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, source.scalar_type(), "detrx::dropout", [&] {
        dropout_kernel<scalar_t>(source.const_data_ptr<scalar_t>(),
                                 output.mutable_data_ptr<scalar_t>(), numel, threshold,
                                 keep_none, scale, static_cast<uint64_t>(seed));
      });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(detrx, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace detrx
