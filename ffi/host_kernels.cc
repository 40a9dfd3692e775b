// The CPU build of the CUDA kernels: g++ compiles kernels.cu unchanged, with
// cuda_host_shim.h standing in for the CUDA compiler and runtime.
#include "kernels.cu"
