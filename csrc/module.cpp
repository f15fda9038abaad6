// The Python module fastmae._C. Importing it loads this library, whose TORCH_LIBRARY blocks
// (one per op file) register the CPU kernels as torch.ops.fastmae_C.*.
#include <Python.h>

static struct PyModuleDef fastmae_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastmae_c_module); }
