// Native CPU kernels (float32) for the conv's inner ops, computing only the (output,
// slot) pairs that exist: the gather-matmul y[m] = sum_s x[nbr[m, s]] @ w[s] (forward,
// and the feature gradient through the inverse map) and the kernel gradient
// dw[s] = sum_m x[nbr[m, s]]^T ct[m]. (The neighbour search's kernels: search_cpu.cc.)
//
// Ops (FFI targets, this file's table at the end):
//   jsc_cpu_gather_matmul:  x (N, Cin), w (S, Cin, Cout), nbr (M, S) -> y (M, Cout)
//   jsc_cpu_kernel_grad:    x (N, Cin), ct (M, Cout), nbr (M, S) -> dw (S, Cin, Cout)
//
// Unlike the jnp path, which gathers a dense (rows, slots * Cin) block (the ~45% of empty
// slots included) and hands it to a matmul, this walks the map: for a tile of output rows
// and one slot at a time (that slot's Cin x Cout weights stay in L1), every row with a
// neighbour there adds x[j] @ w[s] to its output row, eight columns per AVX2 register.
// Each output element is summed by one thread, slots then input channels in order:
// results do not depend on the thread count (bitwise reproducible).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

constexpr int kTileRows = 32;

#ifdef JSC_X86
// acc[0, 8 NV) += xr[0, cin) @ ws[0, cin) x [0, 8 NV) (row stride cout).
template <int NV>
__attribute__((target("avx2,fma"))) void row_update_avx2(float* acc, const float* xr,
                                                         const float* ws, int cin, int cout) {
  __m256 a[NV];
  for (int t = 0; t < NV; ++t) a[t] = _mm256_loadu_ps(acc + 8 * t);
  for (int k = 0; k < cin; ++k) {
    const __m256 b = _mm256_broadcast_ss(xr + k);
    const float* wr = ws + int64_t(k) * cout;
    for (int t = 0; t < NV; ++t) a[t] = _mm256_fmadd_ps(b, _mm256_loadu_ps(wr + 8 * t), a[t]);
  }
  for (int t = 0; t < NV; ++t) _mm256_storeu_ps(acc + 8 * t, a[t]);
}
#endif

// Same sums, plain C++ (no AVX2, or the last cout % 8 columns).
inline void row_update_scalar(float* acc, const float* xr, const float* ws, int cin, int cout,
                              int cols) {
  for (int k = 0; k < cin; ++k) {
    const float b = xr[k];
    const float* wr = ws + int64_t(k) * cout;
    for (int c = 0; c < cols; ++c) acc[c] += b * wr[c];
  }
}

#ifdef JSC_X86
__attribute__((target("avx2,fma"))) void row_update_cols_avx2(float* acc, const float* xr,
                                                              const float* ws, int cin,
                                                              int cout) {
  int c = 0;
  for (; c + 64 <= cout; c += 64) row_update_avx2<8>(acc + c, xr, ws + c, cin, cout);
  switch ((cout - c) / 8) {
    case 7: row_update_avx2<7>(acc + c, xr, ws + c, cin, cout); break;
    case 6: row_update_avx2<6>(acc + c, xr, ws + c, cin, cout); break;
    case 5: row_update_avx2<5>(acc + c, xr, ws + c, cin, cout); break;
    case 4: row_update_avx2<4>(acc + c, xr, ws + c, cin, cout); break;
    case 3: row_update_avx2<3>(acc + c, xr, ws + c, cin, cout); break;
    case 2: row_update_avx2<2>(acc + c, xr, ws + c, cin, cout); break;
    case 1: row_update_avx2<1>(acc + c, xr, ws + c, cin, cout); break;
    default: break;
  }
  c += (cout - c) / 8 * 8;
  if (c < cout) row_update_scalar(acc + c, xr, ws + c, cin, cout, cout - c);
}
#endif

// acc[0, cout) += xr[0, k) @ ws (k x cout, row stride cout): AVX2 when the CPU has it.
void row_update(float* acc, const float* xr, const float* ws, int k, int cout, bool avx2) {
#ifdef JSC_X86
  if (avx2) {
    row_update_cols_avx2(acc, xr, ws, k, cout);
    return;
  }
#endif
  (void)avx2;
  row_update_scalar(acc, xr, ws, k, cout, cout);
}

// One op over a kernel map: x (n, cin), nbr (m, s); `b` is w (s, cin, cout) for the
// gather-matmul and ct (m, cout) for the kernel gradient; `out` is y or dw.
struct Problem {
  const float* x;
  const float* b;
  const int32_t* nbr;
  float* out;
  int64_t n, m;
  int s, cin, cout;
};

void rows(const Problem& p, int64_t begin, int64_t end, bool avx2) {
  const int64_t wstride = int64_t(p.cin) * p.cout;
  for (int64_t m0 = begin; m0 < end; m0 += kTileRows) {
    const int64_t m1 = std::min(end, m0 + kTileRows);
    std::memset(p.out + m0 * p.cout, 0, sizeof(float) * (m1 - m0) * p.cout);
    for (int s = 0; s < p.s; ++s) {
      const float* ws = p.b + s * wstride;
      for (int64_t r = m0; r < m1; ++r) {
        const int32_t j = p.nbr[r * p.s + s];
        if (j < 0 || j >= p.n) continue;  // no neighbour (sentinel, or out of range)
        row_update(p.out + r * p.cout, p.x + int64_t(j) * p.cin, ws, p.cin, p.cout, avx2);
      }
    }
  }
}

bool has_avx2() {
#ifdef JSC_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
#else
  return false;
#endif
}

ffi::Error GatherMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  ConvShape sh;
  if (!gather_matmul_shape(x.dimensions(), w.dimensions(), nbr.dimensions(), y->dimensions(),
                           sh)) {
    return invalid(std::string("cpu_gather_matmul: inconsistent shapes: expects ") +
                   kGatherMatmulShapes);
  }
  const Problem p{x.typed_data(), w.typed_data(), nbr.typed_data(), y->typed_data(),
                  sh.n, sh.m, int(sh.s), int(sh.cin), int(sh.cout)};
  if (p.m == 0 || p.cout == 0) return ffi::Error::Success();
  const bool avx2 = has_avx2();
  parallel_rows(num_threads(p.m, p.m), p.m,
                [&](int64_t begin, int64_t end) { rows(p, begin, end, avx2); });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------- kernel gradient
// dw[s] = sum_m x[nbr[m, s]]^T ct[m]. Threads own whole slots (slot t, t + T, ...). For each
// slot the pairs that exist are taken in row order, kPairs at a time, gathered into
// contiguous blocks X^T (Cin x kPairs) and G (kPairs x Cout) that stay in L1, and
// dw[s] += X^T G is computed row by row with the forward's row update.
// The summation order (chunks in row order, pairs in order) is fixed.
constexpr int kPairs = 32;

// dw (cin x cout) += xt^T gs over `pairs` pairs; xt is (cin x kPairs), gs (pairs x cout):
// each row of dw is the forward kernel's row update with the pairs as the reduction.
void outer_accumulate(float* dw, const float* xt, const float* gs, int pairs, int cin, int cout,
                      bool avx2) {
  for (int i = 0; i < cin; ++i) {
    row_update(dw + int64_t(i) * cout, xt + int64_t(i) * kPairs, gs, pairs, cout, avx2);
  }
}

#ifdef JSC_X86
// xt[i][q0 + k] = x[pairs[k].second][i] for k < 8: eight rows transposed 8 x 8 at a time.
__attribute__((target("avx2,fma"))) void gather_transposed8_avx2(
    float* xt, int q0, const float* x, int cin, const std::pair<int32_t, int32_t>* pairs) {
  const float* src[8];
  for (int k = 0; k < 8; ++k) src[k] = x + int64_t(pairs[k].second) * cin;
  int i = 0;
  for (; i + 8 <= cin; i += 8) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src[k] + i);
    for (int k = 0; k < 8; k += 2) {
      t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
      t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
      u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(xt + int64_t(i + k) * kPairs + q0, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
      _mm256_storeu_ps(xt + int64_t(i + k + 4) * kPairs + q0,
                       _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
  }
  for (; i < cin; ++i)
    for (int k = 0; k < 8; ++k) xt[int64_t(i) * kPairs + q0 + k] = src[k][i];
}
#endif

void grad_slots(const Problem& p, int first, int step, bool avx2) {
  // The pairs of this thread's slots, in row order: one pass over the map.
  std::vector<std::vector<std::pair<int32_t, int32_t>>> lists((p.s - first + step - 1) / step);
  for (int64_t r = 0; r < p.m; ++r) {
    const int32_t* row = p.nbr + r * p.s;
    for (int s = first, k = 0; s < p.s; s += step, ++k) {
      const int32_t j = row[s];
      if (j >= 0 && j < p.n) lists[k].emplace_back(int32_t(r), j);
    }
  }
  std::vector<float> xt(size_t(kPairs) * p.cin), gs(size_t(kPairs) * p.cout);
  for (int s = first, k = 0; s < p.s; s += step, ++k) {
    float* dw = p.out + int64_t(s) * p.cin * p.cout;
    std::fill(dw, dw + int64_t(p.cin) * p.cout, 0.0f);
    const auto& pairs = lists[k];
    for (size_t q0 = 0; q0 < pairs.size(); q0 += kPairs) {
      const int count = int(std::min<size_t>(kPairs, pairs.size() - q0));
      const std::pair<int32_t, int32_t>* chunk = pairs.data() + q0;
      int q = 0;
#ifdef JSC_X86
      if (avx2) {
        for (; q + 8 <= count; q += 8) gather_transposed8_avx2(xt.data(), q, p.x, p.cin, chunk + q);
      }
#endif
      for (; q < count; ++q) {
        const float* xr = p.x + int64_t(chunk[q].second) * p.cin;
        for (int i = 0; i < p.cin; ++i) xt[size_t(i) * kPairs + q] = xr[i];
      }
      for (q = 0; q < count; ++q) {
        std::memcpy(&gs[size_t(q) * p.cout], p.b + int64_t(chunk[q].first) * p.cout,
                    sizeof(float) * p.cout);
      }
      outer_accumulate(dw, xt.data(), gs.data(), count, p.cin, p.cout, avx2);
    }
    std::vector<std::pair<int32_t, int32_t>>().swap(lists[k]);
  }
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct,
                      ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::F32>> dw) {
  ConvShape sh;
  if (!kernel_grad_shape(x.dimensions(), ct.dimensions(), nbr.dimensions(), dw->dimensions(),
                         sh)) {
    return invalid(std::string("cpu_kernel_grad: inconsistent shapes: expects ") +
                   kKernelGradShapes);
  }
  const Problem p{x.typed_data(), ct.typed_data(), nbr.typed_data(), dw->typed_data(),
                  sh.n, sh.m, int(sh.s), int(sh.cin), int(sh.cout)};
  if (p.s == 0 || p.cin == 0 || p.cout == 0) return ffi::Error::Success();
  const bool avx2 = has_avx2();
  const int threads = num_threads(p.m, p.s);
  parallel(threads, [&](int t) { grad_slots(p, t, threads, avx2); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- FFI handlers
XLA_FFI_DEFINE_HANDLER(
    JscCpuGatherMatmul, GatherMatmul,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // x: (N, Cin) input features
        .Arg<ffi::Buffer<ffi::F32>>()    // w: (S, Cin, Cout) weights of each slot
        .Arg<ffi::Buffer<ffi::S32>>()    // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::Buffer<ffi::F32>>());  // y: (M, Cout) output features

XLA_FFI_DEFINE_HANDLER(
    JscCpuKernelGrad, KernelGrad,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // x: (N, Cin) input features
        .Arg<ffi::Buffer<ffi::F32>>()    // ct: (M, Cout) output cotangent
        .Arg<ffi::Buffer<ffi::S32>>()    // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::Buffer<ffi::F32>>());  // dw: (S, Cin, Cout) kernel gradient

constexpr JscHandler kHandlers[] = {
    {"jsc_cpu_gather_matmul", JscCpuGatherMatmul},
    {"jsc_cpu_kernel_grad", JscCpuKernelGrad},
};

}  // namespace
}  // namespace jsc

JSC_EXPORT_HANDLERS(conv_cpu, jsc::kHandlers)
