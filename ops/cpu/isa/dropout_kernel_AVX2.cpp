// The CPU kernel of detrx::dropout for the AVX2 level (setup.py compiles
// ops/cpu/isa/*_AVX2.cpp with that level's flags; see ops/cpu/cpu_capability.h).
#define CPU_CAPABILITY AVX2
#include "cpu/dropout_kernel_impl.h"
