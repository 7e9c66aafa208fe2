// The schemas of every medcare C++ op, in one list: `torch.ops.medcare.<op>`.
// Implementations register per device in their own files (TORCH_LIBRARY_IMPL(medcare, CPU|CUDA, m));
// Python adds register_fake and register_autograd in medcare_kernels/_ext.py.
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
  // route_topk.cpp / route_topk_cuda.cu: fp32 softmax -> top-K (ties to the lower index) -> renormalise.
  // stats [..., 2] = (max logit, sum of exp) per token: what the backward needs besides the logits.
  m.def("route_topk(Tensor logits, int top_k) -> (Tensor gates, Tensor indices, Tensor stats)");
  m.def("route_topk_backward(Tensor d_gates, Tensor logits, Tensor indices, Tensor stats) -> Tensor");
  // orth_penalty.cpp / orth_penalty_cuda.cu: sum_i sum |A_base_i A_orth_i^T| over all pairs in one launch;
  // signs = sign(A_base_i A_orth_i^T) packed pair after pair (all the backward keeps).
  m.def("orth_penalty(Tensor[] a_base, Tensor[] a_orth) -> (Tensor loss, Tensor signs)");
  // The gradients of each side come back flat, parameter after parameter ([0] for a side that needs none):
  // one allocation, and outputs that do not alias each other (the custom-op rule torch.compile enforces);
  // medcare_kernels/_ext.py views them per parameter.
  m.def("orth_penalty_backward(Tensor grad, Tensor signs, Tensor[] a_base, Tensor[] a_orth, bool need_base, "
        "bool need_orth) -> (Tensor d_base, Tensor d_orth)");
}
