// What the CUDA kernel sources (conv_cuda.cu, search_cuda.cu) share, in both of their builds:
// nvcc's (the CUDA library) and g++'s through cuda_host_shim.h (the host library that CI
// runs). The handler macros, XLA's stream, the launch check, 16-byte vector loads and the
// grid limits.
//
// Handlers only enqueue kernels on XLA's stream: no host synchronisation, no allocation,
// no runtime query (cudaStreamGetDevice, cudaGetDevice, cudaDeviceGetAttribute ... are
// rejected while XLA captures the stream into a CUDA graph, and invalidate the capture).
// The one runtime call they make is cudaGetLastError after each launch.
// tests/kernels/test_shim_modes.py lints the sources for that, and runs the kernel tests
// under the shim's capture mode, which fails those queries.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
using jsc_stream_t = cudaStream_t;
#define JSC_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define JSC_CHECK_LAUNCH() ::jsc::launch_error()
#define JSC_SHARED(type, name, dims) __shared__ type name dims
// The handlers take XLA's stream, and only enqueue kernels on it, so XLA may record them
// into command buffers (CUDA graphs).
#define JSC_BIND() ::xla::ffi::Ffi::Bind().Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
#define JSC_DEFINE_HANDLER(fn, impl, binding)                  \
  XLA_FFI_DEFINE_HANDLER_EXPLICIT_WITH_TRAITS(fn, impl, binding, \
                                              {::xla::ffi::Traits::kCmdBufferCompatible})
#define JSC_STREAM_PARAM cudaStream_t stream,
#define JSC_UNROLL _Pragma("unroll")
#define JSC_UNROLL_4 _Pragma("unroll 4")
#else
#include "cuda_host_shim.h"
// The host build has no stream.
#define JSC_BIND() ::xla::ffi::Ffi::Bind()
#define JSC_DEFINE_HANDLER(fn, impl, binding) XLA_FFI_DEFINE_HANDLER(fn, impl, binding)
#define JSC_STREAM_PARAM
#define JSC_UNROLL
#define JSC_UNROLL_4
namespace {
constexpr jsc_stream_t stream = 0;
}  // namespace
#endif

#include <cstdint>
#include <cstring>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {

#ifdef __CUDACC__
// The launch's error, if any (cudaGetLastError: the one runtime call of the handlers; it
// is allowed while the stream is captured).
inline const char* launch_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
#endif

constexpr int64_t kMaxGridYZ = 65535;      // CUDA's limit on gridDim.y and .z
constexpr int64_t kMaxGridX = 2147483647;  // and on gridDim.x

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks the launch just made: one call after each launch, so each launch's error is its
// own (and none is left behind for the next one).
inline ffi::Error launched(const char* what) {
  if (const char* err = JSC_CHECK_LAUNCH()) {
    return error(ffi::ErrorCode::kInternal, std::string(what) + ": " + err);
  }
  return ffi::Error::Success();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-byte loads and stores (p 16-byte aligned; the host build checks it).
__device__ inline uint4 ld16(const void* p) {
#ifdef __CUDACC__
  return *static_cast<const uint4*>(p);
#else
  return jsc_shim::load16<uint4>(p);
#endif
}
__device__ inline void st16(void* p, uint4 v) {
#ifdef __CUDACC__
  *static_cast<uint4*>(p) = v;
#else
  jsc_shim::store16(p, v);
#endif
}

}  // namespace jsc
