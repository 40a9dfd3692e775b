// The Python extension module around the kernels: exposes each FFI handler as a
// PyCapsule (`handlers()`), which jax.ffi.register_ffi_target takes. Being an
// extension module (not a bare .so opened with ctypes) lets editable and regular
// installs find it by import, and only PyInit_* needs to be exported.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* JscGatherMatmul(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JscKernelGrad(XLA_FFI_CallFrame* call_frame);
#ifdef JSC_WITH_CPU_KERNELS
extern "C" XLA_FFI_Error* JscCpuGatherMatmul(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JscCpuKernelGrad(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JscCpuInvert(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JscCpuSortKeys(XLA_FFI_CallFrame* call_frame);
#endif

#define JSC_STR2(x) #x
#define JSC_STR(x) JSC_STR2(x)
#define JSC_CAT2(a, b) a##b
#define JSC_CAT(a, b) JSC_CAT2(a, b)

static PyObject* handlers(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  struct {
    const char* name;
    void* fn;
  } const table[] = {{"jsc_gather_matmul", reinterpret_cast<void*>(&JscGatherMatmul)},
                     {"jsc_kernel_grad", reinterpret_cast<void*>(&JscKernelGrad)},
#ifdef JSC_WITH_CPU_KERNELS
                     {"jsc_cpu_gather_matmul", reinterpret_cast<void*>(&JscCpuGatherMatmul)},
                     {"jsc_cpu_kernel_grad", reinterpret_cast<void*>(&JscCpuKernelGrad)},
                     {"jsc_cpu_invert", reinterpret_cast<void*>(&JscCpuInvert)},
                     {"jsc_cpu_sort_keys", reinterpret_cast<void*>(&JscCpuSortKeys)},
#endif
  };
  for (const auto& entry : table) {
    PyObject* cap = PyCapsule_New(entry.fn, nullptr, nullptr);
    if (cap == nullptr || PyDict_SetItemString(d, entry.name, cap) != 0) {
      Py_XDECREF(cap);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(cap);
  }
  return d;
}

static PyMethodDef methods[] = {
    {"handlers", handlers, METH_NOARGS, "FFI target name -> handler capsule."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, JSC_STR(JSC_MODULE),
                             "jax_sparseconv sparse-conv kernels (XLA FFI handlers).", -1,
                             methods};

PyMODINIT_FUNC JSC_CAT(PyInit_, JSC_MODULE)(void) {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "xla_ffi_api_minor", XLA_FFI_API_MINOR) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
