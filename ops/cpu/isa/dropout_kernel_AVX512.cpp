// The CPU kernel of detrx::dropout for the AVX512 level (setup.py compiles
// ops/cpu/isa/*_AVX512.cpp with that level's flags; see ops/cpu/cpu_capability.h).
#define CPU_CAPABILITY AVX512
#include "cpu/dropout_kernel_impl.h"
