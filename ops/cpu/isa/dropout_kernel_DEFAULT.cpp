// The CPU kernel of detrx::dropout for the DEFAULT level (setup.py compiles
// ops/cpu/isa/*_DEFAULT.cpp with that level's flags; see ops/cpu/cpu_capability.h).
#define CPU_CAPABILITY DEFAULT
#include "cpu/dropout_kernel_impl.h"
