// The Python module fastmae._C. Importing it loads this library, whose TORCH_LIBRARY blocks
// (one per op file) register the CPU kernels as torch.ops.fastmae_C.*; the module itself holds
// one function, _eager_route, the test behind fastmae.ops._backend.eager_cpp.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TracerMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "route.h"

namespace {

// FASTMAE_BACKEND unset, empty, "auto" or "cpp" (any case, ASCII blanks around it): CPU tensors
// go to the C++ kernels. Any other value is left to fastmae.ops._backend.select_backend (which
// also refuses unknown names). Read with getenv: os.environ's assignments call putenv.
bool backend_is_cpp() {
  const char* env = std::getenv("FASTMAE_BACKEND");
  if (env == nullptr) return true;
  std::string name(env);
  auto blank = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!name.empty() && blank(name.back())) name.pop_back();
  size_t first = 0;
  while (first < name.size() && blank(name[first])) ++first;
  name.erase(0, first);
  for (char& c : name) c = char(std::tolower(static_cast<unsigned char>(c)));
  return name.empty() || name == "auto" || name == "cpp";
}

// _eager_route(*tensors) -> bool: whether an op on these arguments (None for an absent optional)
// may take the eager C++ route (torch.ops.fastmae_C.<op>, csrc/autograd.cpp): every argument a
// plain CPU tensor (torch.Tensor or Parameter, no subclass) or None, the first a tensor, the cpp
// backend in force, and nothing watching that the route does not support: no torch.jit.trace, no
// dispatch or torch-function mode (fake tensors, FLOP counters, set_default_device), no functorch
// transform. The same tests as the Python ones they replace, in one call: a call into Python
// code costs microseconds when its caches are cold (bench/NOTES.md), and this one runs before
// every fused op. torch.compile is tested before calling this (it must not trace into it).
PyObject* eager_route(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  bool ok = nargs > 0 && args[0] != Py_None && !at::tracer::impl::is_dispatch_enabled() &&
            !fastmae::dispatcher_watched() &&
            !at::impl::torch_function_mode_enabled() && backend_is_cpp();
  for (Py_ssize_t i = 0; ok && i < nargs; ++i) {
    if (args[i] != Py_None) ok = THPVariable_CheckExact(args[i]) && THPVariable_Unpack(args[i]).is_cpu();
  }
  return PyBool_FromLong(ok);
}

PyMethodDef methods[] = {
    {"_eager_route", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_route)), METH_FASTCALL,
     "_eager_route(*tensors) -> bool: whether a fused op on these arguments takes the eager C++ route."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef fastmae_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastmae_c_module); }
