// The CPU build of the CUDA kernels: g++ compiles conv_cuda.cu unchanged, with
// cuda_host_shim.h standing in for the CUDA compiler and runtime.
#include "conv_cuda.cu"

// The checking modes $JSC_SHIM_MODE selects now, for the module (a test that the setting
// reaches the kernels): "reverse,poison", "reverse", "poison" or "".
extern "C" const char* jsc_shim_mode_name() {
  const jsc_shim::Mode m = jsc_shim::mode_from_env();
  return m.reverse ? (m.poison ? "reverse,poison" : "reverse") : (m.poison ? "poison" : "");
}
