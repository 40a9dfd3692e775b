// Host shim: lets g++ compile the unchanged CUDA source (kernels.cu) into a CPU library.
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

struct Fiber {
  ucontext_t ctx;  // the start (makecontext); later switches use jb
  jmp_buf jb;
  dim3 tid;
  bool started = false;
  bool done = false;
  bool at_barrier = false;
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
  for (;;) {
    size_t finished = 0, waiting = 0;
    int any = 0;
    for (Fiber& f : b.fibers) {
      if (!f.done) {
        f.at_barrier = false;
        b.cur = &f;
        if (!_setjmp(b.sched)) {
          if (!f.started) {
            f.started = true;
            setcontext(&f.ctx);
          }
          _longjmp(f.jb, 1);
        }
      }
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
  }
}

template <class F>
void trampoline(void* p) {
  (*static_cast<F*>(p))();
}

// kernel<<<grid, block>>>(args...): every block in turn, x fastest.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 bdim, A... args) {
  Block b;
  b.bdim = bdim;
  b.gdim = grid;
  auto call = [&]() { kernel(args...); };
  b.body = &trampoline<decltype(call)>;
  b.arg = &call;
  Block* saved = g_block;
  g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.bid = dim3(x, y, z);
        run_block(b);
      }
  g_block = saved;
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

// Stream and launch as the kernels spell them.
using jsc_stream_t = int;
#define JSC_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::jsc_shim::launch(kernel, grid, block, __VA_ARGS__))
#define JSC_CHECK_LAUNCH() (static_cast<const char*>(nullptr))

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

template <class Use, int M, int N, int K, class T, class Layout, class S>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  if (jsc_shim::lane_id() != 0) return;
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool col = std::is_same<Layout, col_major>::value;
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
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * N + j];
}
}  // namespace wmma
}  // namespace nvcuda
