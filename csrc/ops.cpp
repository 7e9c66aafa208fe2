// The schemas of every medcare C++ op, in one list: `torch.ops.medcare.<op>`.
// Implementations register per device in their own files (TORCH_LIBRARY_IMPL(medcare, CPU|CUDA, m));
// Python adds register_fake and register_autograd in medcare_kernels/_ext.py.
// The route_topk and orth_penalty schemas arrive with their implementations (the extension issue).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing medcare_kernels._C only runs the static registrars below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(medcare, m) {
}
