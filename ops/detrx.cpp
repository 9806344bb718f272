// The operator libraries of mmdet-detrx and the Python module `mmdet_detrx._C` (like
// torchvision's csrc/vision.cpp). Library-wide only: each op declares its schemas in its own
// file with TORCH_LIBRARY_FRAGMENT and registers one kernel file per device with
// TORCH_LIBRARY_IMPL (see ops/ms_deform_attn.cpp, ops/cpu/, ops/cuda/). setup.py compiles every
// ops/*.cpp, ops/cpu/*.cpp (and ops/cuda/*.cu), so a new op adds files, not lines here.
#include <Python.h>

#include <torch/library.h>

#include "cpu/cpu_capability.h"

// Public ops, called from Python as torch.ops.detrx.<op>.
TORCH_LIBRARY(detrx, m) {}

// Test and debugging hooks (torch.ops.detrx_testing.<op>): not part of the API.
TORCH_LIBRARY(detrx_testing, m) {}

// A plain CPython extension module: `import mmdet_detrx._C` dlopens this library, whose static
// initialisers register the ops with the dispatcher and choose the CPU kernels' instruction-set
// level (ops/cpu/cpu_capability.h). The module itself carries no functions; its init fails with
// a clear error when MMDET_DETRX_CPU_CAPABILITY names a level this CPU or build lacks.
static struct PyModuleDef detrx_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native kernels of mmdet-detrx, registered as torch.ops.detrx.*", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  const std::string& error = detrx::cpu::capability_error();
  if (!error.empty()) {
    // RuntimeError, not ImportError: a level asked for and refused must not turn silently into
    // the PyTorch fallback.
    PyErr_SetString(PyExc_RuntimeError, ("mmdet_detrx._C: " + error).c_str());
    return nullptr;
  }
  return PyModule_Create(&detrx_module);
}
