// The CPU kernels of multi-scale deformable attention for the AVX2 level (setup.py compiles
// ops/cpu/isa/*_AVX2.cpp with that level's flags; see ops/cpu/cpu_capability.h).
#define CPU_CAPABILITY AVX2
#include "cpu/ms_deform_attn_kernel_impl.h"
