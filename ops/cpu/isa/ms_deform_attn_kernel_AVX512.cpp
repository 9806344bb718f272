// The CPU kernels of multi-scale deformable attention for the AVX512 level (setup.py compiles
// ops/cpu/isa/*_AVX512.cpp with that level's flags; see ops/cpu/cpu_capability.h).
#define CPU_CAPABILITY AVX512
#include "cpu/ms_deform_attn_kernel_impl.h"
