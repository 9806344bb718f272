// Dropout whose mask is a hash of (seed, element index): the schema of `detrx::dropout` (a
// fragment of the `detrx` library declared in ops/detrx.cpp). Its CPU kernel is
// ops/cpu/dropout_kernel.cpp (ops/cpu/dropout_kernel_impl.h, compiled per instruction-set
// level); the Python API and autograd are mmdet_detrx/ops/dropout.py. No CUDA kernel: torch's
// CUDA dropout is already one fused pass, and mmdet_detrx.ops.dropout calls it there.
//
// dropout(input, p, seed) multiplies element i of input (in row-major order of its shape) by
// 1 / (1 - p) when the i-th 32-bit draw of the stream `seed` is at least p * 2^32, else by 0.
// The same call on the output's gradient is the backward: nothing but the seed is saved.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(detrx, m) {
  m.def("dropout(Tensor input, float p, int seed) -> Tensor");
}
