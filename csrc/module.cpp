// The Python module fastmae._C. Importing it loads this library, whose TORCH_LIBRARY blocks (one
// per op file) register the CPU kernels as torch.ops.fastmae_C.*. Every kernel takes the
// instruction-set cap and the streaming-store mode as arguments (fastmae/config.py reads them);
// cpu_isa reports the variant a cap selects on this CPU, for `fastmae env`.
#include <Python.h>

#include "common.h"

namespace fastmae {
namespace {

int64_t cpu_isa_op(int64_t cap) { return static_cast<int64_t>(cpu_isa(cap)); }

}  // namespace
}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_C, m) {
  m.def("cpu_isa(int cap) -> int");
  m.impl("cpu_isa", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(fastmae::cpu_isa_op));
}

namespace {
PyModuleDef fastmae_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastmae_c_module); }
