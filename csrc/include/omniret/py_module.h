// An empty Python module, so that `import omniret_kernels._C` loads the library and runs its
// TORCH_LIBRARY registrations. Include it in exactly one source file of each extension.
#pragma once
// The CMake build (a plain shared library for C++ users) defines no TORCH_EXTENSION_NAME and needs no module.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define OMNIRET_STR2(x) #x
#define OMNIRET_STR(x) OMNIRET_STR2(x)
#define OMNIRET_CAT2(a, b) a##b
#define OMNIRET_CAT(a, b) OMNIRET_CAT2(a, b)

extern "C" PyMODINIT_FUNC OMNIRET_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, OMNIRET_STR(TORCH_EXTENSION_NAME), "omniret operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif  // TORCH_EXTENSION_NAME
