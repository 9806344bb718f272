// The CPU instruction-set level the CPU kernels run at, chosen once when the library loads (like
// ATen's ATEN_CPU_CAPABILITY): the best level this CPU and OS support among those compiled in
// (measured the fastest, see automatic_level in cpu_capability.cpp), or the one named by
// MMDET_DETRX_CPU_CAPABILITY=default|avx2|avx512.
//
// Levels and the flags setup.py compiles ops/cpu/isa/*_<LEVEL>.cpp with (x86-64 only; other
// architectures build DEFAULT alone):
//   DEFAULT  no flag: the baseline ISA of the target (SSE2 on x86-64); always available
//   AVX2     -mavx2 -mfma -mf16c                               (Haswell / Zen and later)
//   AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq + AVX2's (Skylake-SP / Zen 4 and later)
// A level is supported when the CPU reports all its features (cpuid) and the OS saves the
// registers it uses (xgetbv). A forced level the CPU lacks, or an unknown name, selects nothing
// and makes the module init raise an error naming the levels this CPU supports (the kernels
// then run at DEFAULT, never at an unsupported level).
#pragma once

#include <string>
#include <vector>

namespace detrx {
namespace cpu {

enum class Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The level the kernels run at (fixed at load).
Capability capability();

// "default", "avx2", "avx512".
const char* capability_name(Capability capability);

// The levels compiled into this build that this CPU supports, lowest first.
std::vector<Capability> supported_capabilities();

// Empty, or why MMDET_DETRX_CPU_CAPABILITY could not be honoured (the module init raises it).
const std::string& capability_error();

// Runs a kernel at the level chosen when the library loaded. kernels = {DEFAULT, AVX2, AVX512},
// the levels not compiled in left null (never chosen): write DETRX_CPU_LEVEL_KERNELS(name) for a
// kernel `void name(const Args&)` declared in namespaces cpu::DEFAULT, cpu::AVX2, cpu::AVX512.
template <typename Args>
void run_at_chosen_level(void (*const (&kernels)[3])(const Args&), const Args& args) {
  switch (capability()) {
    case Capability::kAvx512:
      if (kernels[2] != nullptr) return kernels[2](args);
      break;
    case Capability::kAvx2:
      if (kernels[1] != nullptr) return kernels[1](args);
      break;
    case Capability::kDefault:
      break;
  }
  kernels[0](args);
}

}  // namespace cpu
}  // namespace detrx

#ifdef DETRX_CPU_AVX2
#define DETRX_CPU_AVX2_KERNEL(name) &::detrx::cpu::AVX2::name
#else
#define DETRX_CPU_AVX2_KERNEL(name) nullptr
#endif
#ifdef DETRX_CPU_AVX512
#define DETRX_CPU_AVX512_KERNEL(name) &::detrx::cpu::AVX512::name
#else
#define DETRX_CPU_AVX512_KERNEL(name) nullptr
#endif
#define DETRX_CPU_LEVEL_KERNELS(name) \
  { &::detrx::cpu::DEFAULT::name, DETRX_CPU_AVX2_KERNEL(name), DETRX_CPU_AVX512_KERNEL(name) }
