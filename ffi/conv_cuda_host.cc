// The CPU build of the CUDA conv kernels: g++ compiles conv_cuda.cu unchanged, with
// cuda_host_shim.h standing in for the CUDA compiler and runtime.
#include "conv_cuda.cu"

// The checking modes $JSC_SHIM_MODE selects now, for the module (a test that the setting
// reaches the kernels): e.g. "reverse,poison,capture", "interleave" or "".
extern "C" const char* jsc_shim_mode_name() {
  static thread_local std::string name;
  name = jsc_shim::mode_name(jsc_shim::mode_from_env());
  return name.c_str();
}
