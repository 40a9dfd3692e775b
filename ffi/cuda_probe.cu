// Can the CUDA kernels run on this machine? For module.cc (jax_sparseconv/_src/cuda_support.py
// decides): the versions of the static CUDA runtime linked in and of the installed driver,
// and a probe launch. The CUDA build only (nvcc), compiled for the same architectures as
// the kernels (the same fat binary), and never called from a handler: the runtime calls
// here (device switches, allocation, synchronisation) are what the handlers must not make.
#include <cuda_runtime.h>

#include <cstdio>

namespace jsc {
namespace {
constexpr int kProbeValue = 0x5ca1ab1e;
__global__ void probe_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) *out = kProbeValue;
}
}  // namespace
}  // namespace jsc

extern "C" int jsc_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

// The CUDA version the driver supports (e.g. 13000 for 13.0), 0 without a driver.
extern "C" int jsc_cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  return v;
}

// Launches probe_kernel on `device` (a local CUDA ordinal) in a stream of its own and reads
// its result back: 1 on success, else 0 and the step and CUDA error in `msg` ("no kernel
// image is available", "CUDA driver version is insufficient", a PTX JIT failure, ...).
// binaryVersion / ptxVersion of the image the driver picked (e.g. 80 / 90) go to *binary /
// *ptx.
extern "C" int jsc_cuda_probe(int device, char* msg, int msg_len, int* binary, int* ptx) {
  *binary = *ptx = 0;
  const char* step = "cudaGetDevice";
  cudaError_t e = cudaSuccess;
  int previous = 0, host = 0, *out = nullptr;
  cudaStream_t stream = nullptr;
  cudaFuncAttributes attr{};
  bool switched = false;
  if ((e = cudaGetDevice(&previous)) != cudaSuccess) goto done;
  step = "cudaSetDevice";
  if ((e = cudaSetDevice(device)) != cudaSuccess) goto done;
  switched = true;
  step = "cudaFuncGetAttributes";
  if ((e = cudaFuncGetAttributes(&attr, jsc::probe_kernel)) != cudaSuccess) goto done;
  *binary = attr.binaryVersion;
  *ptx = attr.ptxVersion;
  step = "cudaStreamCreate";
  if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess) goto done;
  step = "cudaMalloc";
  if ((e = cudaMalloc(&out, sizeof(int))) != cudaSuccess) goto done;
  step = "cudaMemsetAsync";
  if ((e = cudaMemsetAsync(out, 0, sizeof(int), stream)) != cudaSuccess) goto done;
  step = "launch";
  jsc::probe_kernel<<<1, 32, 0, stream>>>(out);
  if ((e = cudaGetLastError()) != cudaSuccess) goto done;
  step = "cudaMemcpyAsync";
  if ((e = cudaMemcpyAsync(&host, out, sizeof(int), cudaMemcpyDeviceToHost, stream)) !=
      cudaSuccess) {
    goto done;
  }
  step = "cudaStreamSynchronize";
  e = cudaStreamSynchronize(stream);
done:
  if (out != nullptr) cudaFree(out);
  if (stream != nullptr) cudaStreamDestroy(stream);
  if (switched) cudaSetDevice(previous);
  if (e != cudaSuccess) {
    std::snprintf(msg, size_t(msg_len), "%s: %s (%s)", step, cudaGetErrorString(e),
                  cudaGetErrorName(e));
    cudaGetLastError();  // not sticky for the kernels' own launch checks
    return 0;
  }
  if (host != jsc::kProbeValue) {
    std::snprintf(msg, size_t(msg_len), "the probe kernel ran but did not write its result");
    return 0;
  }
  return 1;
}
