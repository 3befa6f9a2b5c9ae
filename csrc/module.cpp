// The extension mimkernels._C: the `mimkernels` op library and the Python module that loads it.
//
// Each op family lives in its own files and adds itself with TORCH_LIBRARY_FRAGMENT(mimkernels, m) (schemas)
// and TORCH_LIBRARY_IMPL(mimkernels, <CPU|CUDA>, m) (kernels); setup.py compiles every csrc/*.cpp and *.cu, so
// a new family is new files only. The Python-side ops (torch.library.custom_op "mimkernels::...", the Triton
// launchers while torch.compile traces) are fragments of the same namespace.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(mimkernels, m) {
  // The namespace's one definition; the families' fragments hold the schemas.
}

// `import mimkernels._C` loads this library, whose static initialisers register every family's ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mimkernels compiled ops (torch.ops.mimkernels)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
