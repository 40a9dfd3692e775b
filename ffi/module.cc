// The Python extension module around the kernels: exposes each FFI handler as a
// PyCapsule (`handlers()`), which jax.ffi.register_ffi_target takes. Being an
// extension module (not a bare .so opened with ctypes) lets editable and regular
// installs find it by import, and only PyInit_* needs to be exported.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "common.h"

// The handler table of each source this module links (see CMakeLists.txt): adding an
// op means a handler and its row in its source's table, nothing here.
JSC_HANDLER_TABLE(conv_cuda);    // conv_cuda.cu: nvcc's build, or g++'s through the host shim
JSC_HANDLER_TABLE(search_cuda);  // search_cuda.cu: likewise
#ifdef JSC_WITH_CPU_KERNELS
JSC_HANDLER_TABLE(conv_cpu);    // conv_cpu.cc
JSC_HANDLER_TABLE(search_cpu);  // search_cpu.cc
#endif

#ifdef JSC_WITH_CUDA_RUNTIME
// The CUDA build only (cuda_probe.cu, nvcc): what Python needs to decide whether the
// kernels can run on this machine (jax_sparseconv/_src/cuda_support.py).
extern "C" int jsc_cuda_runtime_version();
extern "C" int jsc_cuda_driver_version();
extern "C" int jsc_cuda_probe(int device, char* msg, int msg_len, int* binary_version,
                              int* ptx_version);
#endif
#ifdef JSC_WITH_CPU_KERNELS
// The host build only (cuda_host_shim.h): the checking modes in force ($JSC_SHIM_MODE).
extern "C" const char* jsc_shim_mode_name();
#endif

#define JSC_STR2(x) #x
#define JSC_STR(x) JSC_STR2(x)
#define JSC_CAT2(a, b) a##b
#define JSC_CAT(a, b) JSC_CAT2(a, b)

// {target name: capsule} over every table; a name in two tables is an error.
static PyObject* handlers(PyObject*, PyObject*) {
  using Table = const JscHandler* (*)(int*);
  static constexpr Table tables[] = {
      &jsc_conv_cuda_handlers,
      &jsc_search_cuda_handlers,
#ifdef JSC_WITH_CPU_KERNELS
      &jsc_conv_cpu_handlers,
      &jsc_search_cpu_handlers,
#endif
  };
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  for (Table table : tables) {
    int count = 0;
    const JscHandler* rows = table(&count);
    for (int i = 0; i < count; ++i) {
      if (PyDict_GetItemString(d, rows[i].name) != nullptr) {
        PyErr_Format(PyExc_RuntimeError, "FFI target %s defined twice", rows[i].name);
        Py_DECREF(d);
        return nullptr;
      }
      PyObject* cap = PyCapsule_New(reinterpret_cast<void*>(rows[i].handler), nullptr, nullptr);
      if (cap == nullptr || PyDict_SetItemString(d, rows[i].name, cap) != 0) {
        Py_XDECREF(cap);
        Py_DECREF(d);
        return nullptr;
      }
      Py_DECREF(cap);
    }
  }
  return d;
}

#ifdef JSC_WITH_CUDA_RUNTIME
static PyObject* cuda_runtime_version(PyObject*, PyObject*) {
  return PyLong_FromLong(jsc_cuda_runtime_version());
}

static PyObject* cuda_driver_version(PyObject*, PyObject*) {
  return PyLong_FromLong(jsc_cuda_driver_version());
}

// (error or None, binaryVersion, ptxVersion) of a trivial kernel launched on `device`.
static PyObject* cuda_probe(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  char msg[512] = {0};
  int binary = 0, ptx = 0;
  int ok;
  Py_BEGIN_ALLOW_THREADS
  ok = jsc_cuda_probe(int(device), msg, int(sizeof(msg)), &binary, &ptx);
  Py_END_ALLOW_THREADS
  if (ok) return Py_BuildValue("(Oii)", Py_None, binary, ptx);
  return Py_BuildValue("(sii)", msg, binary, ptx);
}
#endif

#ifdef JSC_WITH_CPU_KERNELS
static PyObject* shim_mode(PyObject*, PyObject*) {
  return PyUnicode_FromString(jsc_shim_mode_name());
}
#endif

static PyMethodDef methods[] = {
    {"handlers", handlers, METH_NOARGS, "FFI target name -> handler capsule."},
#ifdef JSC_WITH_CUDA_RUNTIME
    {"cuda_runtime_version", cuda_runtime_version, METH_NOARGS,
     "cudaRuntimeGetVersion() of the static CUDA runtime linked in (e.g. 13000)."},
    {"cuda_driver_version", cuda_driver_version, METH_NOARGS,
     "cudaDriverGetVersion(): the CUDA version the installed driver supports; 0 = none."},
    {"cuda_probe", cuda_probe, METH_O,
     "cuda_probe(device) -> (error or None, binaryVersion, ptxVersion): launches a trivial "
     "kernel of this module on the device and reads its result back."},
#endif
#ifdef JSC_WITH_CPU_KERNELS
    {"shim_mode", shim_mode, METH_NOARGS,
     "The host shim's checking modes that $JSC_SHIM_MODE selects now ('' = none)."},
#endif
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
#ifdef JSC_WITH_CUDA_RUNTIME
  // CMake's CUDA_ARCHITECTURES, comma-separated ("75-real,80-real,90").
  if (PyModule_AddStringConstant(m, "cuda_architectures", JSC_CUDA_ARCHITECTURES) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
#endif
  return m;
}
