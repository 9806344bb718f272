// Runtime choice of the CPU kernels' instruction-set level, see cpu_capability.h. Compiled for
// the baseline ISA (it must run on every CPU to find out what the CPU has).
#include "cpu/cpu_capability.h"

#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define DETRX_CPU_X86 1
#endif

namespace detrx {
namespace cpu {
namespace {

constexpr const char* kEnvironmentVariable = "MMDET_DETRX_CPU_CAPABILITY";

#ifdef DETRX_CPU_X86
// XCR0: which register states the OS saves on a context switch.
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool cpu_has(Capability level) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool osxsave = ecx & (1u << 27), fma = ecx & (1u << 12), f16c = ecx & (1u << 29),
             avx = ecx & (1u << 28);
  if (!(osxsave && avx && fma && f16c)) return false;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return false;  // SSE and AVX (ymm) state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx2 = ebx & (1u << 5);
  if (level == Capability::kAvx2) return avx2;
  const bool avx512 = (ebx & (1u << 16)) /* F */ && (ebx & (1u << 17)) /* DQ */ &&
                      (ebx & (1u << 30)) /* BW */ && (ebx & (1u << 31)) /* VL */;
  return avx2 && avx512 && (xcr0 & 0xE6) == 0xE6;  // + opmask, upper zmm0-15, zmm16-31 state
}
#endif

bool compiled_in(Capability level) {
  switch (level) {
    case Capability::kDefault:
      return true;
    case Capability::kAvx2:
#ifdef DETRX_CPU_AVX2
      return true;
#else
      return false;
#endif
    case Capability::kAvx512:
#ifdef DETRX_CPU_AVX512
      return true;
#else
      return false;
#endif
  }
  return false;
}

// Test hook: MMDET_DETRX_TESTING_CPU_LACKS=avx512 (or avx2,avx512) makes this CPU look as if it
// lacked those levels, so that the refusal of a forced level can be tested on any machine.
bool hidden_for_tests(Capability level) {
  const char* hidden = std::getenv("MMDET_DETRX_TESTING_CPU_LACKS");
  if (hidden == nullptr) return false;
  const std::string list = std::string(",") + hidden + ",";
  return list.find(std::string(",") + capability_name(level) + ",") != std::string::npos;
}

bool supported(Capability level) {
  if (!compiled_in(level)) return false;
  if (level == Capability::kDefault) return true;
  if (hidden_for_tests(level)) return false;
#ifdef DETRX_CPU_X86
  return cpu_has(level);
#else
  return false;
#endif
}

struct Choice {
  Capability level = Capability::kDefault;
  std::string error;
};

std::string supported_names() {
  std::string names;
  for (const Capability level : supported_capabilities()) {
    names += std::string(names.empty() ? "" : ", ") + capability_name(level);
  }
  return names;
}

// The level the kernels run at when none is forced: the best one this CPU and build support.
// Measured on the one AVX-512 CPU at hand (AMD EPYC, Zen 4; docs/benchmarks.md, "MSDA CPU
// kernels per instruction set"): since the backward works on packed grids, AVX512 is as fast as
// AVX2 in the forward and faster in the backward (before, its backward was the slower one). A
// fixed rule rather than a timing at load time, so that the level (and with it the last bits
// of the results) does not depend on the machine's load.
Capability automatic_level(const std::vector<Capability>& levels) {
  return levels.back();  // lowest first
}

Choice choose() {
  Choice choice;
  const std::vector<Capability> levels = supported_capabilities();
  choice.level = automatic_level(levels);
  const char* forced = std::getenv(kEnvironmentVariable);
  if (forced == nullptr || *forced == '\0') return choice;
  const std::string name(forced);
  for (const Capability level :
       {Capability::kDefault, Capability::kAvx2, Capability::kAvx512}) {
    if (name != capability_name(level)) continue;
    if (supported(level)) {
      choice.level = level;
    } else {
      choice.level = Capability::kDefault;
      choice.error = std::string(kEnvironmentVariable) + "=" + name + ": this " +
                     (compiled_in(level) ? "CPU does not support " : "build has no kernels for ") +
                     name + "; levels available here: " + supported_names();
    }
    return choice;
  }
  choice.level = Capability::kDefault;
  choice.error = std::string(kEnvironmentVariable) + "=" + name +
                 ": unknown level (known: default, avx2, avx512); levels available here: " +
                 supported_names();
  return choice;
}

const Choice& chosen() {
  static const Choice choice = choose();  // read once, when the library loads (see below)
  return choice;
}

// Make the choice while the library loads, so that the environment is read at load time.
const bool chosen_at_load = (chosen(), true);

}  // namespace

Capability capability() { return chosen().level; }

const std::string& capability_error() { return chosen().error; }

const char* capability_name(Capability capability) {
  switch (capability) {
    case Capability::kDefault:
      return "default";
    case Capability::kAvx2:
      return "avx2";
    case Capability::kAvx512:
      return "avx512";
  }
  return "unknown";
}

std::vector<Capability> supported_capabilities() {
  std::vector<Capability> levels;
  for (const Capability level :
       {Capability::kDefault, Capability::kAvx2, Capability::kAvx512}) {
    if (supported(level)) levels.push_back(level);
  }
  return levels;
}

// torch.ops.detrx.cpu_capability(): the level the CPU kernels run at;
// torch.ops.detrx.cpu_capabilities(): the levels this CPU and build support.
TORCH_LIBRARY_FRAGMENT(detrx, m) {
  m.def("cpu_capability() -> str", []() { return std::string(capability_name(capability())); });
  m.def("cpu_capabilities() -> str[]", []() {
    std::vector<std::string> names;
    for (const Capability level : supported_capabilities()) names.push_back(capability_name(level));
    return names;
  });
}

}  // namespace cpu
}  // namespace detrx
