// The CPU build of the CUDA search kernels: g++ compiles search_cuda.cu unchanged, with
// cuda_host_shim.h standing in for the CUDA compiler and runtime.
#include "search_cuda.cu"
