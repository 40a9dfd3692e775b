// Host shim: lets g++ compile the unchanged CUDA source (conv_cuda.cu) into a CPU library.
//
// The kernels keep their per-thread work in __host__ __device__ functions; this header
// supplies what the CUDA compiler would: the qualifiers, dim3, threadIdx/blockIdx/
// blockDim/gridDim, the launch, __syncthreads (and its _or reduction), the half types
// and the few WMMA calls the kernels use.
//
// Execution model: blocks run one after another on the calling thread. Inside a block
// every CUDA thread is a fiber (ucontext) with its own stack, so per-thread registers
// and local arrays are private and `__shared__` variables (static thread_local here)
// are shared by the block. Fibers run in thread order until they finish or reach a
// barrier; a barrier releases only when every thread of the block has reached it.
// A block in which some threads finish while others wait at a barrier is the
// divergent-__syncthreads bug that deadlocks or corrupts a GPU; the shim aborts on it,
// so that bug fails CI instead of passing silently.
//
// WMMA (nvcuda::wmma) is warp-collective on the GPU. Here lane 0 of each warp does the
// whole 16x16x16 tile and the other lanes do nothing, which gives the same values in
// shared memory as long as kernels touch fragments only through load/mma/store/fill
// (they do). Accumulation is float32 in k order; tensor cores may round the inner sums
// differently, so half-type results are compared with a tolerance.
//
// Checks, so that CI catches what only hardware would (each fails on a planted bug in
// tests/test_shim_modes.py):
// * launch limits: gridDim.x in [1, 2^31 - 1], .y and .z in [1, 65535], blockDim.x/.y <= 1024,
//   .z <= 64, at most 1024 threads and none zero. A launch outside them runs nothing and
//   leaves "invalid configuration argument" for JSC_CHECK_LAUNCH(), as cudaGetLastError would.
// * WMMA load/store: the pointer 32-byte aligned, ldm a multiple of 16 bytes (8 half /
//   4 float elements) and at least the tile's width; otherwise abort (undefined on a GPU).
// * $JSC_SHIM_MODE, read at every launch, comma-separated:
//     reverse  run the threads of each barrier interval in reverse order (thread order
//              hides a race in which a lower thread writes what a higher one reads before
//              the barrier);
//     poison   fill the kernels' shared memory (declared with JSC_SHARED) with 0xFF bytes
//              (NaN in every float type, -1 in integers) at the start of every block: on
//              a GPU it is undefined there, while here it would keep the previous block's
//              values.
//     capture  every launch is recorded into a CUDA graph that XLA is capturing (its
//              command buffers): the runtime queries that CUDA rejects on a capturing
//              stream (cudaStreamGetDevice, cudaGetDevice, cudaDeviceGetAttribute,
//              cudaStreamSynchronize, cudaDeviceSynchronize) fail with
//              cudaErrorStreamCaptureUnsupported and invalidate the capture, which the
//              next JSC_CHECK_LAUNCH() reports (as XLA would fail the whole graph);
//     interleave  each atomic operation yields to the block's other threads before and
//              after it, and the passes over the runnable threads alternate in direction,
//              so the threads of a block interleave at every atomic in both orders (code
//              that relies on a thread's atomic and its next plain stores landing together,
//              e.g. reading an entry's key right after another thread claimed it, fails).
//   An unknown word aborts. tests/kernels/test_shim_modes.py reruns the kernel tests under
//   JSC_SHIM_MODE=reverse,poison,capture; tests/kernels/test_search_cuda.py the search
//   tests under interleave.
// * Shared memory: JSC_SHARED(type, name, dims) declares it (a plain __shared__ also
//   compiles, but is not poisoned; the kernels use JSC_SHARED only).
// * 16-byte vector loads and stores (ld16/st16 in the kernels): the address 16-byte aligned,
//   else abort (a GPU faults with "misaligned address").
// * Atomics (atomicCAS/Min/Max/Add/Or on int): plain read-modify-writes, atomic because a
//   fiber runs undisturbed between its switch points.
// $JSC_SHIM_CC (default 90) is the compute capability the kernels see (read at each launch:
// device code picks its bf16 path from it, as nvcc's __CUDA_ARCH__ would), e.g. 75 for a
// GPU without bf16 tensor cores.
#pragma once

// Fibers switch with _setjmp/_longjmp (no signal-mask system call, unlike swapcontext);
// the fortified longjmp rejects jumps between stacks, so it must be off here.
#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace jsc_shim {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "jax_sparseconv host shim: %s\n", what);
  std::abort();
}

// ---- checking modes ($JSC_SHIM_MODE) ----
struct Mode {
  bool reverse = false;
  bool poison = false;
  bool capture = false;
  bool interleave = false;
};

inline Mode parse_mode(const char* text) {
  Mode m;
  if (text == nullptr) return m;
  std::string s(text);
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    const std::string word = s.substr(start, end - start);
    if (word == "reverse") {
      m.reverse = true;
    } else if (word == "poison") {
      m.poison = true;
    } else if (word == "capture") {
      m.capture = true;
    } else if (word == "interleave") {
      m.interleave = true;
    } else if (!word.empty()) {
      std::fprintf(stderr, "jax_sparseconv host shim: JSC_SHIM_MODE=%s: unknown mode '%s' "
                   "(use reverse, poison, capture, interleave, comma-separated)\n", text,
                   word.c_str());
      std::abort();
    }
    start = end + 1;
  }
  return m;
}

inline Mode mode_from_env() { return parse_mode(std::getenv("JSC_SHIM_MODE")); }

// The modes' canonical name ("reverse,poison,capture,interleave" order; "" for none).
inline std::string mode_name(const Mode& m) {
  std::string s;
  for (auto [on, word] : {std::pair<bool, const char*>{m.reverse, "reverse"},
                          {m.poison, "poison"}, {m.capture, "capture"},
                          {m.interleave, "interleave"}}) {
    if (on) s += (s.empty() ? "" : ",") + std::string(word);
  }
  return s;
}

// ---- shared memory that poison mode fills (JSC_SHARED registers it) ----
struct SharedRegion {
  void* p;
  size_t bytes;
};
constexpr unsigned char kPoisonByte = 0xFF;
inline thread_local std::vector<SharedRegion> g_shared;  // this thread's, every kernel
inline thread_local bool g_poison = false;               // the running launch's mode

inline void poison_shared() {
  for (const SharedRegion& r : g_shared) std::memset(r.p, kPoisonByte, r.bytes);
}

// Registers one __shared__ variable when a thread first passes its declaration (and
// poisons it then: the first block runs before the next block start).
struct SharedReg {
  SharedReg(void* p, size_t bytes) {
    g_shared.push_back({p, bytes});
    if (g_poison) std::memset(p, kPoisonByte, bytes);
  }
};

// ---- the error a launch leaves for JSC_CHECK_LAUNCH (cudaGetLastError) ----
inline thread_local std::string g_launch_error;
// Capture mode: what invalidated the capture (empty: nothing), until JSC_CHECK_LAUNCH().
inline thread_local std::string g_capture_error;

inline const char* take_launch_error() {
  static thread_local std::string taken;
  if (!g_capture_error.empty()) {
    taken = "operation failed due to a previous error during capture (host shim capture "
            "mode: " + g_capture_error + ")";
    g_capture_error.clear();
    g_launch_error.clear();
    return taken.c_str();
  }
  if (g_launch_error.empty()) return nullptr;
  taken.swap(g_launch_error);
  g_launch_error.clear();
  return taken.c_str();
}

// In capture mode, a runtime call CUDA rejects on a capturing stream: invalidates the
// capture (reported by the next JSC_CHECK_LAUNCH); true when it must fail.
inline bool rejected_during_capture(const char* api) {
  if (!mode_from_env().capture) return false;
  if (g_capture_error.empty()) {
    g_capture_error = std::string(api) + " is not permitted while the stream is capturing";
  }
  return true;
}

// The launch limits of every GPU since compute capability 3.0; empty when within them.
inline std::string launch_config_error(dim3 grid, dim3 block) {
  char buf[200];
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    std::snprintf(buf, sizeof(buf), "gridDim (%u, %u, %u) has a zero dimension", grid.x,
                  grid.y, grid.z);
  } else if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    std::snprintf(buf, sizeof(buf),
                  "gridDim (%u, %u, %u) exceeds (2^31 - 1, 65535, 65535)", grid.x, grid.y,
                  grid.z);
  } else if (threads == 0) {
    std::snprintf(buf, sizeof(buf), "blockDim (%u, %u, %u) has a zero dimension", block.x,
                  block.y, block.z);
  } else if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024) {
    std::snprintf(buf, sizeof(buf),
                  "blockDim (%u, %u, %u) exceeds (1024, 1024, 64) or 1024 threads", block.x,
                  block.y, block.z);
  } else {
    return std::string();
  }
  return std::string("invalid configuration argument (host shim: ") + buf + ")";
}

// The compute capability of the "device": 90, or $JSC_SHIM_CC (e.g. 75, to run the paths
// of GPUs without bf16 tensor cores). Device code reads it as device_cc(), set at launch
// (what __CUDA_ARCH__ is to nvcc's device code).
inline int compute_capability() {
  const char* cc = std::getenv("JSC_SHIM_CC");
  return cc != nullptr && *cc != 0 ? std::atoi(cc) : 90;
}
inline thread_local int g_device_cc = 90;
inline int device_cc() { return g_device_cc; }

struct Fiber {
  ucontext_t ctx;  // the start (makecontext); later switches use jb
  jmp_buf jb;
  dim3 tid;
  bool started = false;
  bool done = false;
  bool at_barrier = false;  // waiting at a barrier (until every thread is there)
  int pred = 0;
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  jmp_buf sched;
  Fiber* cur = nullptr;
  int barrier_result = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  bool reverse = false;     // fibers of each interval in reverse thread order
  bool interleave = false;  // atomics yield (see yield_point)
};

inline thread_local Block* g_block = nullptr;
constexpr size_t kStackBytes = 128 * 1024;

inline Block& block() { return *g_block; }

inline void fiber_entry() {
  Block& b = block();
  b.body(b.arg);
  b.cur->done = true;
  _longjmp(b.sched, 1);
}

// Reaching a barrier: record the predicate, yield to the scheduler, return the
// block-wide OR of the predicates once everyone has arrived.
inline int barrier(int pred) {
  Block& b = block();
  Fiber* f = b.cur;
  f->at_barrier = true;
  f->pred = pred;
  if (!_setjmp(f->jb)) _longjmp(b.sched, 1);
  return b.barrier_result;
}

// Interleave mode: the running thread steps aside for the block's other threads and
// resumes in the next pass (no barrier semantics; a no-op otherwise).
inline void yield_point() {
  Block* b = g_block;
  if (b == nullptr || !b->interleave) return;
  Fiber* f = b->cur;
  if (!_setjmp(f->jb)) _longjmp(b->sched, 1);
}

// Runs one block of `body` with every thread as a fiber.
inline void run_block(Block& b) {
  const size_t n = size_t(b.bdim.x) * b.bdim.y * b.bdim.z;
  b.fibers.assign(n, Fiber{});
  if (b.stacks.size() < n * kStackBytes) b.stacks.resize(n * kStackBytes);
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = dim3(unsigned(i % b.bdim.x), unsigned((i / b.bdim.x) % b.bdim.y),
                 unsigned(i / (size_t(b.bdim.x) * b.bdim.y)));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks.data() + i * kStackBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Passes over the runnable threads (not finished, not waiting at the barrier) until
  // none is left (a thread that yielded runs again in the next pass); then the barrier
  // releases every waiting thread.
  for (unsigned pass = 0;; ++pass) {
    bool yielded = false;
    const bool backwards = b.reverse != (b.interleave && (pass & 1) != 0);
    for (size_t i = 0; i < n; ++i) {
      Fiber& f = b.fibers[backwards ? n - 1 - i : i];
      if (f.done || f.at_barrier) continue;
      b.cur = &f;
      if (!_setjmp(b.sched)) {
        if (!f.started) {
          f.started = true;
          setcontext(&f.ctx);
        }
        _longjmp(f.jb, 1);
      }
      yielded |= !f.done && !f.at_barrier;
    }
    if (yielded) continue;
    size_t finished = 0, waiting = 0;
    int any = 0;
    for (Fiber& f : b.fibers) {
      if (f.done) {
        ++finished;
      } else {
        ++waiting;
        any |= f.pred != 0;
      }
    }
    if (finished == n) return;
    if (finished != 0) {
      std::fprintf(stderr,
                   "jax_sparseconv host shim: divergent __syncthreads in block (%u,%u,%u): "
                   "%zu threads finished while %zu wait at a barrier\n",
                   b.bid.x, b.bid.y, b.bid.z, finished, waiting);
      std::abort();
    }
    b.barrier_result = any;
    for (Fiber& f : b.fibers) f.at_barrier = false;  // released
  }
}

template <class F>
void trampoline(void* p) {
  (*static_cast<F*>(p))();
}

// kernel<<<grid, block>>>(args...): every block in turn, x fastest; nothing (and an error
// for JSC_CHECK_LAUNCH) outside the launch limits.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 bdim, A... args) {
  std::string err = launch_config_error(grid, bdim);
  if (!err.empty()) {
    std::fprintf(stderr, "jax_sparseconv host shim: %s\n", err.c_str());
    g_launch_error = err;  // until JSC_CHECK_LAUNCH() takes it, as cudaGetLastError
    return;
  }
  const Mode mode = mode_from_env();
  const bool saved_poison = g_poison;
  const int saved_cc = g_device_cc;
  g_poison = mode.poison;
  g_device_cc = compute_capability();
  Block b;
  b.bdim = bdim;
  b.gdim = grid;
  b.reverse = mode.reverse;
  b.interleave = mode.interleave;
  auto call = [&]() { kernel(args...); };
  b.body = &trampoline<decltype(call)>;
  b.arg = &call;
  Block* saved = g_block;
  g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.bid = dim3(x, y, z);
        if (mode.poison) poison_shared();
        run_block(b);
      }
  g_block = saved;
  g_poison = saved_poison;
  g_device_cc = saved_cc;
}

inline unsigned lane_id() {
  const Block& b = block();
  const dim3& t = b.cur->tid;
  return (t.x + b.bdim.x * (t.y + b.bdim.y * t.z)) % 32u;
}

}  // namespace jsc_shim

#define threadIdx (::jsc_shim::block().cur->tid)
#define blockIdx (::jsc_shim::block().bid)
#define blockDim (::jsc_shim::block().bdim)
#define gridDim (::jsc_shim::block().gdim)

inline void __syncthreads() { jsc_shim::barrier(0); }
inline int __syncthreads_or(int pred) { return jsc_shim::barrier(pred); }
[[noreturn]] inline void __trap() { jsc_shim::fail("__trap() in a kernel"); }

// Shared memory, as the kernels declare it: JSC_SHARED(type, name, dims);
#define JSC_SHARED(type, name, dims) \
  static thread_local type name dims;  \
  static thread_local ::jsc_shim::SharedReg name##_jsc_shared_reg(&name, sizeof(name))

// Stream and launch as the kernels spell them.
using jsc_stream_t = int;
#define JSC_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::jsc_shim::launch(kernel, grid, block, __VA_ARGS__))
#define JSC_CHECK_LAUNCH() (::jsc_shim::take_launch_error())

// ---- half types: storage plus round-to-nearest-even conversions, as cuda_fp16/bf16 ----
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half(float f) {
  _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if (std::isnan(f)) {
    h.bits = uint16_t((u >> 16) | 0x40u);
  } else {
    h.bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}

inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

// ---- 16-byte vectors (CUDA's vector_types.h), loads and stores checked for alignment ----
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

namespace jsc_shim {
inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s at %p: not 16-byte aligned (misaligned address)", what,
                  p);
    fail(buf);
  }
}
template <class V>
inline V load16(const void* p) {
  check_aligned16(p, "16-byte load");
  V v;
  std::memcpy(&v, p, 16);
  return v;
}
template <class V>
inline void store16(void* p, const V& v) {
  check_aligned16(p, "16-byte store");
  std::memcpy(p, &v, 16);
}
}  // namespace jsc_shim

// ---- atomics: a fiber is never interrupted between its switch points, so a plain
// read-modify-write is atomic here; in interleave mode the thread yields around each ----
namespace jsc_shim {
template <class F>
inline int atomic_rmw(int* a, F&& f) {
  yield_point();
  const int old = *a;
  *a = f(old);
  yield_point();
  return old;
}
}  // namespace jsc_shim
inline int atomicCAS(int* a, int compare, int value) {
  return jsc_shim::atomic_rmw(a, [&](int old) { return old == compare ? value : old; });
}
inline int atomicMin(int* a, int v) {
  return jsc_shim::atomic_rmw(a, [&](int old) { return v < old ? v : old; });
}
inline int atomicMax(int* a, int v) {
  return jsc_shim::atomic_rmw(a, [&](int old) { return v > old ? v : old; });
}
inline int atomicAdd(int* a, int v) {
  return jsc_shim::atomic_rmw(a, [&](int old) { return int(unsigned(old) + unsigned(v)); });
}
inline int atomicOr(int* a, int v) {
  return jsc_shim::atomic_rmw(a, [&](int old) { return old | v; });
}

// ---- the CUDA runtime calls a handler might make, with capture mode's rule ----
// The kernels' sources call none of the queries below (tests/kernels/test_shim_modes.py
// lints that); they exist so that a handler that did would compile here and fail under
// JSC_SHIM_MODE=capture, as it fails inside XLA's command buffers on a GPU.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
  }
  return "unknown error";
}
inline cudaError_t cudaPeekAtLastError() {
  if (!jsc_shim::g_capture_error.empty()) return cudaErrorStreamCaptureInvalidated;
  return jsc_shim::g_launch_error.empty() ? cudaSuccess : cudaErrorInvalidConfiguration;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cudaPeekAtLastError();
  jsc_shim::take_launch_error();
  return e;
}
inline cudaError_t cudaGetDevice(int* device) {
  if (jsc_shim::rejected_during_capture("cudaGetDevice")) return cudaErrorStreamCaptureUnsupported;
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaStreamGetDevice(jsc_stream_t, int* device) {
  if (jsc_shim::rejected_during_capture("cudaStreamGetDevice")) {
    return cudaErrorStreamCaptureUnsupported;
  }
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (jsc_shim::rejected_during_capture("cudaDeviceGetAttribute")) {
    return cudaErrorStreamCaptureUnsupported;
  }
  if (device != 0) return cudaErrorInvalidValue;
  const int cc = jsc_shim::compute_capability();
  *value = attr == cudaDevAttrComputeCapabilityMajor   ? cc / 10
           : attr == cudaDevAttrComputeCapabilityMinor ? cc % 10
                                                       : 132;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(jsc_stream_t) {
  if (jsc_shim::rejected_during_capture("cudaStreamSynchronize")) {
    return cudaErrorStreamCaptureUnsupported;
  }
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  if (jsc_shim::rejected_during_capture("cudaDeviceSynchronize")) {
    return cudaErrorStreamCaptureUnsupported;
  }
  return cudaSuccess;
}

// ---- the WMMA subset the kernels use ----
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  float v[rows * cols];  // row-major, valid in lane 0 only
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// What the CUDA programming guide requires of load/store_matrix_sync: mptr 256-bit (32-byte)
// aligned, ldm a multiple of 8 for 16-bit elements and of 4 for float (16 bytes), and
// (for the tile to fit) ldm at least the width of the stored rows or columns.
inline void check_matrix_ptr(const char* op, const void* p, unsigned ldm, size_t elem_bytes,
                             unsigned width) {
  char buf[240];
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    std::snprintf(buf, sizeof(buf), "wmma::%s: pointer %p is not 32-byte aligned", op, p);
    jsc_shim::fail(buf);
  }
  if ((ldm * elem_bytes) % 16 != 0 || ldm < width) {
    std::snprintf(buf, sizeof(buf),
                  "wmma::%s: ldm = %u must be a multiple of %zu elements (16 bytes) and >= %u",
                  op, ldm, 16 / elem_bytes, width);
    jsc_shim::fail(buf);
  }
}

template <class Use, int M, int N, int K, class T, class Layout, class S>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  if (jsc_shim::lane_id() != 0) return;
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool col = std::is_same<Layout, col_major>::value;
  check_matrix_ptr("load_matrix_sync", p, ldm, sizeof(S), col ? F::rows : F::cols);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.v[r * F::cols + c] = to_float(col ? p[c * ldm + r] : p[r * ldm + c]);
}

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float value) {
  if (jsc_shim::lane_id() != 0) return;
  for (float& v : f.v) v = value;
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  if (jsc_shim::lane_id() != 0) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i * N + j];
      for (int k = 0; k < K; ++k) s += a.v[i * K + k] * b.v[k * N + j];
      d.v[i * N + j] = s;
    }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  if (jsc_shim::lane_id() != 0) return;
  check_matrix_ptr("store_matrix_sync", p, ldm, sizeof(float), layout == mem_row_major ? N : M);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * N + j];
}
}  // namespace wmma
}  // namespace nvcuda
