// The `moe_runtime` op library (schemas only) and the Python module `moe_runtime._C`.
//
// Importing `moe_runtime._C` loads this shared object, which runs the TORCH_LIBRARY and
// TORCH_LIBRARY_IMPL blocks of every source file; the ops then live under torch.ops.moe_runtime.
// Fake (shape-only) kernels are registered from Python, in the module named below.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(moe_runtime, m) {
  m.set_python_module("moe_runtime.ops._fake");
  m.def(
      "reroute_permute(Tensor top_k_index, Tensor token_owner, Tensor slot_table, int num_slots)"
      " -> (Tensor slot_ids, Tensor perm, Tensor inv_perm, Tensor offsets)",
      {at::Tag::pt2_compliant_tag});
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled ops of moe-runtime; loading registers them under torch.ops.moe_runtime.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
