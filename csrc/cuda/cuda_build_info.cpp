// The Python module omniret_kernels._C_cuda. Importing it loads the library, whose TORCH_LIBRARY_IMPL blocks (one per
// op: csrc/cuda/<op>_glue.cpp) register the CUDA kernels. Its one function says which GPU code the build carries,
// so the Python dispatcher (omniret_kernels/_ext.py: cuda_built_archs) can gate the CUDA backend on the device:
//   omniret_kernels._C_cuda.built_archs() -> ('sm_80', 'sm_90', 'compute_90')
// 'sm_XY' is SASS (runs on compute capability X.Y' with Y' >= Y, same major X; 'sm_XYa' only on exactly X.Y);
// 'compute_XY' is PTX, which the driver JIT-compiles for any capability >= X.Y. setup.py passes the list (the
// -gencode code= targets that torch expands TORCH_CUDA_ARCH_LIST to) as OMNIRET_CUDA_BUILD_ARCHS; this replaces the
// empty module of omniret/py_module.h for this extension.
#include <Python.h>

#include <sstream>
#include <string>

#ifndef OMNIRET_CUDA_BUILD_ARCHS
#error "setup.py defines OMNIRET_CUDA_BUILD_ARCHS (the code= targets of the build), e.g. sm_80,sm_90,compute_90"
#endif
#ifndef TORCH_EXTENSION_NAME
#error "built by setup.py as the extension omniret_kernels._C_cuda (TORCH_EXTENSION_NAME=_C_cuda)"
#endif
#define OMNIRET_STRINGIFY2(...) #__VA_ARGS__
#define OMNIRET_STRINGIFY(...) OMNIRET_STRINGIFY2(__VA_ARGS__)
#define OMNIRET_CONCAT2(a, b) a##b
#define OMNIRET_CONCAT(a, b) OMNIRET_CONCAT2(a, b)

namespace {

PyObject* built_archs(PyObject*, PyObject*) {
  std::stringstream list(OMNIRET_STRINGIFY(OMNIRET_CUDA_BUILD_ARCHS));
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  std::string target;
  while (std::getline(list, target, ',')) {
    if (target.empty()) continue;
    PyObject* item = PyUnicode_FromString(target.c_str());
    if (item == nullptr || PyList_Append(out, item) != 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(item);
  }
  PyObject* tuple = PyList_AsTuple(out);
  Py_DECREF(out);
  return tuple;
}

PyMethodDef methods[] = {
    {"built_archs", built_archs, METH_NOARGS,
     "The GPU code in this build: 'sm_XY' (SASS) and 'compute_XY' (PTX) targets, e.g. ('sm_80', 'sm_90', "
     "'compute_90')."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC OMNIRET_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, OMNIRET_STRINGIFY(TORCH_EXTENSION_NAME),
                                   "omniret CUDA kernels (registered with the torch dispatcher on import)", -1,
                                   methods};
  return PyModule_Create(&module_def);
}
