// Native CPU kernels (float32) for the conv's inner ops, computing only the (output,
// slot) pairs that exist: the gather-matmul y[m] = sum_s x[nbr[m, s]] @ w[s] (forward,
// and the feature gradient through the inverse map) and the weight gradient
// dw[s] = sum_m x[nbr[m, s]]^T ct[m]. (The neighbour search's kernels: search_cpu.cc.)
//
// Ops (FFI targets, this file's table at the end):
//   jsc_cpu_gather_matmul:  x (N, Cin), w (S, Cin, Cout), nbr (M, S) -> y (M, Cout)
//   jsc_cpu_weight_grad:    x (N, Cin), ct (M, Cout), nbr (M, S) -> dw (S, Cin, Cout)
//   jsc_cpu_grouped_gather_matmul, jsc_cpu_grouped_weight_grad: the same with G groups
//                           (w, dw (S, Cin / G, Cout); G from the shapes; depthwise: G = Cin)
//
// Unlike the jnp path, which gathers a dense (rows, slots * Cin) block (the ~45% of empty
// slots included) and hands it to a matmul, this walks the map: for a tile of output rows
// and one slot at a time (that slot's Cin x Cout weights stay in L1), every row with a
// neighbour there adds x[j] @ w[s] to its output row, six rows by sixteen columns in
// registers at a time (the x rows read in place).
// Each output element is summed by one thread, slots then input channels in order:
// results do not depend on the thread count (bitwise reproducible).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

// Output rows a forward tile: 256 rather than 64, because the generated convs' maps are
// sparse (2-3 pairs an output row over 27 slots): at 64 rows a tile most (tile, slot)
// groups hold fewer than six rows and the micro-kernel runs on one to three rows (1.2-1.3x
// slower on those maps; no change on dense ones). The rows' sums are the same either way.
constexpr int kTileRows = 256;
constexpr int kGroupRows = 6;  // rows a forward micro-kernel call updates together

// AVX-512 (with AVX2): the 512-bit micro-kernels; $JAX_SPARSECONV_NO_AVX512 set: AVX2 only.
inline bool has_avx512() {
#ifdef JSC_X86
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          std::getenv("JAX_SPARSECONV_NO_AVX512") == nullptr;
  return yes;
#else
  return false;
#endif
}

// Same sums, plain C++ (no AVX2, or the last cout % 8 columns): acc[0, cols) += xr[0, cin)
// @ ws[0, cin) x [0, cols) (row stride cout).
inline void row_update_scalar(float* acc, const float* xr, const float* ws, int cin, int cout,
                              int cols) {
  for (int k = 0; k < cin; ++k) {
    const float b = xr[k];
    const float* wr = ws + int64_t(k) * cout;
    for (int c = 0; c < cols; ++c) acc[c] += b * wr[c];
  }
}

// The loops over registers below carry `unroll` pragmas: without them GCC keeps some of
// the accumulator arrays in memory, storing them at every step (1.6x slower).
#define JSC_UNROLL _Pragma("GCC unroll 16")
// Keeps a loaded vector in a register: for fewer than four rows GCC otherwise folds the
// weight loads into the FMAs, loading each weight vector once per row (R times instead of
// once), and the small-R calls become load-bound at about half the FMA rate.
#define JSC_IN_REGISTER(v) asm("" : "+x"(v))

#ifdef JSC_X86
// The forward micro-kernel: rows yr[0, R), columns [c0, c0 + 8 V) += xr[0, R) @ ws (cin x
// cout, row stride cout), an R x (8 V) block in R * V registers; per input channel, V
// loads of the weights and R broadcasts from the x rows (read in place).
template <int R, int V>
__attribute__((target("avx2,fma"))) inline void group_block_avx2(float* const* yr,
                                                                 const float* const* xr,
                                                                 const float* ws, int cin,
                                                                 int cout, int c0) {
  __m256 acc[R][V];
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v) acc[a][v] = _mm256_loadu_ps(yr[a] + c0 + 8 * v);
  const float* wk = ws + c0;
  for (int k = 0; k < cin; ++k, wk += cout) {
    __m256 wv[V];
    JSC_UNROLL for (int v = 0; v < V; ++v) {
      wv[v] = _mm256_loadu_ps(wk + 8 * v);
      JSC_IN_REGISTER(wv[v]);
    }
    JSC_UNROLL for (int a = 0; a < R; ++a) {
      const __m256 b = _mm256_broadcast_ss(xr[a] + k);
      JSC_UNROLL for (int v = 0; v < V; ++v)
        acc[a][v] = _mm256_fmadd_ps(b, wv[v], acc[a][v]);
    }
  }
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v) _mm256_storeu_ps(yr[a] + c0 + 8 * v, acc[a][v]);
}

// R rows, every column: 16-column blocks, then 8, then the scalar tail.
template <int R>
__attribute__((target("avx2,fma"))) void group_rows_avx2(float* const* yr,
                                                         const float* const* xr,
                                                         const float* ws, int cin, int cout) {
  int c = 0;
  for (; c + 16 <= cout; c += 16) group_block_avx2<R, 2>(yr, xr, ws, cin, cout, c);
  for (; c + 8 <= cout; c += 8) group_block_avx2<R, 1>(yr, xr, ws, cin, cout, c);
  if (c < cout)
    for (int a = 0; a < R; ++a) row_update_scalar(yr[a] + c, xr[a], ws + c, cin, cout, cout - c);
}

// The same micro-kernel on 512-bit registers (AVX-512: 32 of them, so R x 64 columns fit):
// the same FMAs on the same elements in the same order, so the same bits as AVX2.
template <int R, int V>
__attribute__((target("avx512f,avx2,fma"))) inline void group_block_avx512(
    float* const* yr, const float* const* xr, const float* ws, int cin, int cout, int c0) {
  __m512 acc[R][V];
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v) acc[a][v] = _mm512_loadu_ps(yr[a] + c0 + 16 * v);
  const float* wk = ws + c0;
  for (int k = 0; k < cin; ++k, wk += cout) {
    __m512 wv[V];
    JSC_UNROLL for (int v = 0; v < V; ++v) {
      wv[v] = _mm512_loadu_ps(wk + 16 * v);
      JSC_IN_REGISTER(wv[v]);
    }
    JSC_UNROLL for (int a = 0; a < R; ++a) {
      const __m512 b = _mm512_set1_ps(xr[a][k]);
      JSC_UNROLL for (int v = 0; v < V; ++v)
        acc[a][v] = _mm512_fmadd_ps(b, wv[v], acc[a][v]);
    }
  }
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v) _mm512_storeu_ps(yr[a] + c0 + 16 * v, acc[a][v]);
}

// R rows, every column: 64-column blocks, then 16, then AVX2's 8 and the scalar tail.
template <int R>
__attribute__((target("avx512f,avx2,fma"))) void group_rows_avx512(float* const* yr,
                                                                   const float* const* xr,
                                                                   const float* ws, int cin,
                                                                   int cout) {
  int c = 0;
  for (; c + 64 <= cout; c += 64) group_block_avx512<R, 4>(yr, xr, ws, cin, cout, c);
  for (; c + 16 <= cout; c += 16) group_block_avx512<R, 1>(yr, xr, ws, cin, cout, c);
  for (; c + 8 <= cout; c += 8) group_block_avx2<R, 1>(yr, xr, ws, cin, cout, c);
  if (c < cout)
    for (int a = 0; a < R; ++a) row_update_scalar(yr[a] + c, xr[a], ws + c, cin, cout, cout - c);
}
#endif

// yr[a][0, cout) += xr[a][0, cin) @ ws for a < count: kGroupRows rows at a time.
// f(R, a) over [0, count) in blocks of R = 6 rows starting at a, then one block of the
// rest (R a compile-time constant: std::integral_constant).
template <class F>
inline void in_blocks_of_six(int count, const F& f) {
  int a = 0;
  for (; a + 6 <= count; a += 6) f(std::integral_constant<int, 6>{}, a);
  switch (count - a) {
    case 5: f(std::integral_constant<int, 5>{}, a); break;
    case 4: f(std::integral_constant<int, 4>{}, a); break;
    case 3: f(std::integral_constant<int, 3>{}, a); break;
    case 2: f(std::integral_constant<int, 2>{}, a); break;
    case 1: f(std::integral_constant<int, 1>{}, a); break;
    default: break;
  }
}

void group_update(float* const* yr, const float* const* xr, int count, const float* ws, int cin,
                  int cout, bool avx2) {
  static_assert(kGroupRows == 6, "in_blocks_of_six takes six rows a block");
#ifdef JSC_X86
  if (avx2 && has_avx512()) {
    in_blocks_of_six(count, [&](auto r, int a) {
      group_rows_avx512<decltype(r)::value>(yr + a, xr + a, ws, cin, cout);
    });
    return;
  }
  if (avx2) {
    in_blocks_of_six(count, [&](auto r, int a) {
      group_rows_avx2<decltype(r)::value>(yr + a, xr + a, ws, cin, cout);
    });
    return;
  }
#endif
  (void)avx2;
  for (int a = 0; a < count; ++a) row_update_scalar(yr[a], xr[a], ws, cin, cout, cout);
}

// One op over a kernel map: x (n, cin), nbr (m, s); `b` is w (s, cin, cout) for the
// gather-matmul and ct (m, cout) for the weight gradient; `out` is y or dw.
struct Problem {
  const float* x;
  const float* b;
  const int32_t* nbr;
  float* out;
  int64_t n, m;
  int s, cin, cout;
};

// Output rows [begin, end) of the gather-matmul, in tiles of kTileRows: for each slot, the
// tile's rows with a neighbour there (their x rows fetched ahead of use) are updated by the
// micro-kernel, kGroupRows at a time.
void rows(const Problem& p, int64_t begin, int64_t end, bool avx2) {
  const int64_t wstride = int64_t(p.cin) * p.cout;
  float* yr[kTileRows];
  const float* xr[kTileRows];
  for (int64_t m0 = begin; m0 < end; m0 += kTileRows) {
    const int64_t m1 = std::min(end, m0 + kTileRows);
    std::memset(p.out + m0 * p.cout, 0, sizeof(float) * (m1 - m0) * p.cout);
    for (int s = 0; s < p.s; ++s) {
      int count = 0;
      for (int64_t r = m0; r < m1; ++r) {
        const int32_t j = p.nbr[r * p.s + s];
        if (j < 0 || j >= p.n) continue;  // no neighbour (sentinel, or out of range)
        yr[count] = p.out + r * p.cout;
        xr[count++] = p.x + int64_t(j) * p.cin;
        for (int k = 0; k < p.cin; k += 16) __builtin_prefetch(xr[count - 1] + k);
      }
      group_update(yr, xr, count, p.b + s * wstride, p.cin, p.cout, avx2);
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
  advise_huge_pages(p.out, p.m * p.cout * int64_t(sizeof(float)));
  const bool avx2 = has_avx2();
  // Blocks of 4 tiles, taken by the threads as they come free.
  parallel_blocks(num_threads(p.m, p.m), p.m, 4 * kTileRows,
                  [&](int64_t begin, int64_t end) { rows(p, begin, end, avx2); });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------- weight gradient
// dw[s] = sum_m x[nbr[m, s]]^T ct[m]. Each slot is summed by one thread (slots are dealt
// to threads largest first). A thread walks the rows in tiles, so that the x and ct rows
// it reads stay in cache for all of its slots; for each of its slots, the tile's pairs are
// taken kPairs at a time and dw[s] += X^T G is computed by a register-blocked micro-kernel
// (R rows of dw by V * 8 columns, accumulated in registers over the pairs, reading the x
// and ct rows in place). Every dw element is a sequential sum over its pairs in row order
// whatever the tiles and threads: results do not depend on the thread count.
// (Sizes for sparse maps, as kTileRows: about 100 pairs per (tile, slot) at 2.6 pairs a row.)
constexpr int kPairs = 64;
constexpr int64_t kGradTileRows = 1024;

// dw[0, r) x [0, cols) (row stride cout) += sum_k xr[k][0, r)^T gr[k][0, cols).
inline void outer_block_scalar(float* dw, const float* const* xr, const float* const* gr,
                               int pairs, int r, int cols, int cout) {
  for (int a = 0; a < r; ++a) {
    float* d = dw + int64_t(a) * cout;
    for (int k = 0; k < pairs; ++k) {
      const float b = xr[k][a];
      for (int c = 0; c < cols; ++c) d[c] += b * gr[k][c];
    }
  }
}

#ifdef JSC_X86
// The micro-kernel: an R x (8 V) block of dw in R * V registers; per pair, V loads of its
// ct row and R broadcasts from its x row.
template <int R, int V>
__attribute__((target("avx2,fma"))) inline void outer_block_avx2(float* dw,
                                                                 const float* const* xr,
                                                                 const float* const* gr,
                                                                 int pairs, int i0, int c0,
                                                                 int cout) {
  __m256 acc[R][V];
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v)
      acc[a][v] = _mm256_loadu_ps(dw + int64_t(a) * cout + 8 * v);
  for (int k = 0; k < pairs; ++k) {
    const float* g = gr[k] + c0;
    const float* xk = xr[k] + i0;
    __m256 gv[V];
    JSC_UNROLL for (int v = 0; v < V; ++v) gv[v] = _mm256_loadu_ps(g + 8 * v);
    JSC_UNROLL for (int a = 0; a < R; ++a) {
      const __m256 b = _mm256_broadcast_ss(xk + a);
      JSC_UNROLL for (int v = 0; v < V; ++v)
        acc[a][v] = _mm256_fmadd_ps(b, gv[v], acc[a][v]);
    }
  }
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v)
      _mm256_storeu_ps(dw + int64_t(a) * cout + 8 * v, acc[a][v]);
}

// Rows [i0, i0 + R) of dw, every column: 16-column blocks, then 8, then the scalar tail.
template <int R>
__attribute__((target("avx2,fma"))) void outer_rows_avx2(float* dw, const float* const* xr,
                                                         const float* const* gr, int pairs,
                                                         int i0, int cout) {
  float* d = dw + int64_t(i0) * cout;
  int c = 0;
  for (; c + 16 <= cout; c += 16) outer_block_avx2<R, 2>(d + c, xr, gr, pairs, i0, c, cout);
  for (; c + 8 <= cout; c += 8) outer_block_avx2<R, 1>(d + c, xr, gr, pairs, i0, c, cout);
  if (c < cout) {
    const float* xs[kPairs];
    const float* gs[kPairs];
    for (int k = 0; k < pairs; ++k) xs[k] = xr[k] + i0, gs[k] = gr[k] + c;
    outer_block_scalar(d + c, xs, gs, pairs, R, cout - c, cout);
  }
}
// The same on 512-bit registers (an R x (16 V) block; the same bits as AVX2).
template <int R, int V>
__attribute__((target("avx512f,avx2,fma"))) inline void outer_block_avx512(
    float* dw, const float* const* xr, const float* const* gr, int pairs, int i0, int c0,
    int cout) {
  __m512 acc[R][V];
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v)
      acc[a][v] = _mm512_loadu_ps(dw + int64_t(a) * cout + 16 * v);
  for (int k = 0; k < pairs; ++k) {
    const float* g = gr[k] + c0;
    const float* xk = xr[k] + i0;
    __m512 gv[V];
    JSC_UNROLL for (int v = 0; v < V; ++v) gv[v] = _mm512_loadu_ps(g + 16 * v);
    JSC_UNROLL for (int a = 0; a < R; ++a) {
      const __m512 b = _mm512_set1_ps(xk[a]);
      JSC_UNROLL for (int v = 0; v < V; ++v)
        acc[a][v] = _mm512_fmadd_ps(b, gv[v], acc[a][v]);
    }
  }
  JSC_UNROLL for (int a = 0; a < R; ++a)
    JSC_UNROLL for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(dw + int64_t(a) * cout + 16 * v, acc[a][v]);
}

// Rows [i0, i0 + R) of dw: 64-column blocks, then 16, then AVX2's 8 and the scalar tail.
template <int R>
__attribute__((target("avx512f,avx2,fma"))) void outer_rows_avx512(float* dw,
                                                                   const float* const* xr,
                                                                   const float* const* gr,
                                                                   int pairs, int i0, int cout) {
  float* d = dw + int64_t(i0) * cout;
  int c = 0;
  for (; c + 64 <= cout; c += 64) outer_block_avx512<R, 4>(d + c, xr, gr, pairs, i0, c, cout);
  for (; c + 16 <= cout; c += 16) outer_block_avx512<R, 1>(d + c, xr, gr, pairs, i0, c, cout);
  for (; c + 8 <= cout; c += 8) outer_block_avx2<R, 1>(d + c, xr, gr, pairs, i0, c, cout);
  if (c < cout) {
    const float* xs[kPairs];
    const float* gs[kPairs];
    for (int k = 0; k < pairs; ++k) xs[k] = xr[k] + i0, gs[k] = gr[k] + c;
    outer_block_scalar(d + c, xs, gs, pairs, R, cout - c, cout);
  }
}
#endif

// dw (cin x cout) += sum_k x_k^T g_k over `pairs` (<= kPairs) pairs of rows.
void outer_accumulate(float* dw, const float* const* xr, const float* const* gr, int pairs,
                      int cin, int cout, bool avx2) {
#ifdef JSC_X86
  if (avx2 && has_avx512()) {
    in_blocks_of_six(cin, [&](auto r, int i) {
      outer_rows_avx512<decltype(r)::value>(dw, xr, gr, pairs, i, cout);
    });
    return;
  }
  if (avx2) {
    in_blocks_of_six(cin, [&](auto r, int i) {
      outer_rows_avx2<decltype(r)::value>(dw, xr, gr, pairs, i, cout);
    });
    return;
  }
#endif
  (void)avx2;
  outer_block_scalar(dw, xr, gr, pairs, cin, cout, cout);
}

// dw[s] for the slots `mine`, the rows walked in tiles.
void grad_slots(const Problem& p, const std::vector<int>& mine, bool avx2) {
  const int64_t wsize = int64_t(p.cin) * p.cout;
  for (int s : mine) std::fill(p.out + s * wsize, p.out + (s + 1) * wsize, 0.0f);
  const float* xr[kPairs];
  const float* gr[kPairs];
  for (int64_t m0 = 0; m0 < p.m; m0 += kGradTileRows) {
    const int64_t m1 = std::min(p.m, m0 + kGradTileRows);
    for (int s : mine) {
      float* dw = p.out + s * wsize;
      int count = 0;
      for (int64_t r = m0; r < m1; ++r) {
        const int32_t j = p.nbr[r * p.s + s];
        if (j < 0 || j >= p.n) continue;  // no neighbour (sentinel, or out of range)
        xr[count] = p.x + int64_t(j) * p.cin;
        gr[count] = p.b + r * p.cout;
        for (int k = 0; k < p.cin; k += 16) __builtin_prefetch(xr[count] + k);
        if (++count == kPairs) {
          outer_accumulate(dw, xr, gr, count, p.cin, p.cout, avx2);
          count = 0;
        }
      }
      if (count > 0) outer_accumulate(dw, xr, gr, count, p.cin, p.cout, avx2);
    }
  }
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct,
                      ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::F32>> dw) {
  ConvShape sh;
  if (!weight_grad_shape(x.dimensions(), ct.dimensions(), nbr.dimensions(), dw->dimensions(),
                         sh)) {
    return invalid(std::string("cpu_weight_grad: inconsistent shapes: expects ") +
                   kWeightGradShapes);
  }
  const Problem p{x.typed_data(), ct.typed_data(), nbr.typed_data(), dw->typed_data(),
                  sh.n, sh.m, int(sh.s), int(sh.cin), int(sh.cout)};
  if (p.s == 0 || p.cin == 0 || p.cout == 0) return ffi::Error::Success();
  const bool avx2 = has_avx2();
  const int threads = num_threads(p.m, p.s);
  // Pairs per slot (threads over row blocks), then slots dealt largest first to the least
  // loaded thread (which thread sums a slot does not change its result).
  std::vector<int64_t> pairs(p.s, 0);
  {
    std::vector<std::vector<int64_t>> part(threads, std::vector<int64_t>(p.s, 0));
    const int64_t per = (p.m + threads - 1) / threads;
    parallel(threads, [&](int t) {
      std::vector<int64_t>& c = part[t];
      for (int64_t r = t * per; r < std::min(p.m, (t + 1) * per); ++r) {
        const int32_t* nb = p.nbr + r * p.s;
        for (int s = 0; s < p.s; ++s) c[s] += (nb[s] >= 0 && nb[s] < p.n);
      }
    });
    for (const auto& c : part)
      for (int s = 0; s < p.s; ++s) pairs[s] += c[s];
  }
  std::vector<int> order(p.s);
  for (int s = 0; s < p.s; ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pairs[a] > pairs[b]; });
  std::vector<std::vector<int>> mine(threads);
  std::vector<int64_t> load(threads, 0);
  for (int s : order) {
    const int t = int(std::min_element(load.begin(), load.end()) - load.begin());
    mine[t].push_back(s);
    load[t] += pairs[s] + 1;
  }
  parallel(threads, [&](int t) { grad_slots(p, mine[t], avx2); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- grouped convs
// G groups: output channels [g cog, (g + 1) cog) read input channels [g cig, (g + 1) cig)
// through w[s][0, cig) x [g cog, (g + 1) cog) (w (S, cig, cout), cig = Cin / G,
// cog = Cout / G). Few FLOPs a pair (depthwise: one a channel), so the loops go over
// channels (vectorised by the compiler) a row at a time. Each y element sums its slots,
// then its input channels, in order; each dw element its rows in order (slots dealt to
// threads): results do not depend on the thread count.
struct Grouped {
  const float* x;
  const float* b;  // w (S, cig, cout) or ct (M, cout)
  const int32_t* nbr;
  float* out;      // y (M, cout) or dw (S, cig, cout)
  int64_t n, m;
  int s, cin, cout, groups;
};

// yr[0, cout) += the grouped product of xr and ws (cig x cout).
__attribute__((always_inline)) inline void grouped_row(float* yr, const float* xr,
                                                       const float* ws, int cig, int cog,
                                                       int groups, int cout) {
  if (cig == 1 && cog == 1) {  // depthwise
    for (int c = 0; c < cout; ++c) yr[c] += xr[c] * ws[c];
    return;
  }
  for (int g = 0; g < groups; ++g) {
    float* y = yr + g * cog;
    for (int i = 0; i < cig; ++i) {
      const float v = xr[g * cig + i];
      const float* w = ws + int64_t(i) * cout + g * cog;
      for (int o = 0; o < cog; ++o) y[o] += v * w[o];
    }
  }
}

// dw (cig x cout) += the grouped outer product of xr and gr.
__attribute__((always_inline)) inline void grouped_outer(float* dw, const float* xr,
                                                         const float* gr, int cig, int cog,
                                                         int groups, int cout) {
  if (cig == 1 && cog == 1) {
    for (int c = 0; c < cout; ++c) dw[c] += xr[c] * gr[c];
    return;
  }
  for (int g = 0; g < groups; ++g) {
    for (int i = 0; i < cig; ++i) {
      const float v = xr[g * cig + i];
      float* d = dw + int64_t(i) * cout + g * cog;
      const float* c = gr + g * cog;
      for (int o = 0; o < cog; ++o) d[o] += v * c[o];
    }
  }
}

__attribute__((always_inline)) inline void grouped_rows_impl(const Grouped& p, int64_t begin,
                                                             int64_t end) {
  const int cig = p.cin / p.groups, cog = p.cout / p.groups;
  const int64_t wstride = int64_t(cig) * p.cout;
  for (int64_t r = begin; r < end; ++r) {
    float* yr = p.out + r * p.cout;
    std::fill(yr, yr + p.cout, 0.0f);
    for (int s = 0; s < p.s; ++s) {
      const int32_t j = p.nbr[r * p.s + s];
      if (j < 0 || j >= p.n) continue;
      grouped_row(yr, p.x + int64_t(j) * p.cin, p.b + s * wstride, cig, cog, p.groups, p.cout);
    }
  }
}

__attribute__((always_inline)) inline void grouped_grad_impl(const Grouped& p,
                                                             const std::vector<int>& mine) {
  const int cig = p.cin / p.groups, cog = p.cout / p.groups;
  const int64_t wsize = int64_t(cig) * p.cout;
  for (int s : mine) std::fill(p.out + s * wsize, p.out + (s + 1) * wsize, 0.0f);
  for (int64_t r = 0; r < p.m; ++r) {
    const int32_t* nb = p.nbr + r * p.s;
    const float* gr = p.b + r * p.cout;
    for (int s : mine) {
      const int32_t j = nb[s];
      if (j < 0 || j >= p.n) continue;
      grouped_outer(p.out + s * wsize, p.x + int64_t(j) * p.cin, gr, cig, cog, p.groups, p.cout);
    }
  }
}

#ifdef JSC_X86
__attribute__((target("avx2,fma"))) void grouped_rows_avx2(const Grouped& p, int64_t begin,
                                                           int64_t end) {
  grouped_rows_impl(p, begin, end);
}
__attribute__((target("avx2,fma"))) void grouped_grad_avx2(const Grouped& p,
                                                           const std::vector<int>& mine) {
  grouped_grad_impl(p, mine);
}
#endif

void grouped_rows(const Grouped& p, int64_t begin, int64_t end, bool avx2) {
#ifdef JSC_X86
  if (avx2) return grouped_rows_avx2(p, begin, end);
#endif
  (void)avx2;
  grouped_rows_impl(p, begin, end);
}

void grouped_grad(const Grouped& p, const std::vector<int>& mine, bool avx2) {
#ifdef JSC_X86
  if (avx2) return grouped_grad_avx2(p, mine);
#endif
  (void)avx2;
  grouped_grad_impl(p, mine);
}

constexpr char kGroupedShapes[] =
    "x (N, Cin), w or dw (S, Cin / G, Cout), nbr (M, S), y or ct (M, Cout), G dividing Cin "
    "and Cout, every size < 2^31 - 1";

// Shapes of a grouped op: x (n, cin), w (s, cig, cout), nbr (m, s), y (m, cout).
bool grouped_shape(Dims x, Dims w, Dims nbr, Dims y, Grouped& p) {
  p.n = dim(x, 0), p.cin = int(dim(x, 1)), p.s = int(dim(w, 0)), p.cout = int(dim(w, 2));
  p.m = dim(nbr, 0);
  const int64_t cig = dim(w, 1);
  if (!has_shape(x, {p.n, p.cin}) || !has_shape(w, {p.s, cig, p.cout}) ||
      !has_shape(nbr, {p.m, p.s}) || !has_shape(y, {p.m, p.cout}) || cig <= 0 ||
      p.cin % cig != 0) {
    return false;
  }
  p.groups = int(p.cin / cig);
  return p.cout % p.groups == 0 &&
         conv_sizes_fit(ConvShape{p.n, p.m, p.s, p.cin, p.cout}) && fits_int32(p.m);
}

ffi::Error GroupedGatherMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                               ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  Grouped p{};
  if (!grouped_shape(x.dimensions(), w.dimensions(), nbr.dimensions(), y->dimensions(), p)) {
    return invalid(std::string("cpu_grouped_gather_matmul: inconsistent shapes: expects ") +
                   kGroupedShapes);
  }
  p.x = x.typed_data(), p.b = w.typed_data(), p.nbr = nbr.typed_data(), p.out = y->typed_data();
  if (p.m == 0 || p.cout == 0) return ffi::Error::Success();
  advise_huge_pages(p.out, p.m * p.cout * int64_t(sizeof(float)));
  const bool avx2 = has_avx2();
  parallel_blocks(num_threads(p.m, p.m), p.m, 1024,
                  [&](int64_t begin, int64_t end) { grouped_rows(p, begin, end, avx2); });
  return ffi::Error::Success();
}

ffi::Error GroupedWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct,
                             ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::F32>> dw) {
  Grouped p{};
  if (!grouped_shape(x.dimensions(), dw->dimensions(), nbr.dimensions(), ct.dimensions(), p)) {
    return invalid(std::string("cpu_grouped_weight_grad: inconsistent shapes: expects ") +
                   kGroupedShapes);
  }
  p.x = x.typed_data(), p.b = ct.typed_data(), p.nbr = nbr.typed_data(), p.out = dw->typed_data();
  if (p.s == 0 || p.cout == 0) return ffi::Error::Success();
  const bool avx2 = has_avx2();
  const int threads = num_threads(p.m, p.s);
  std::vector<std::vector<int>> mine(threads);
  for (int s = 0; s < p.s; ++s) mine[s % threads].push_back(s);
  parallel(threads, [&](int t) { grouped_grad(p, mine[t], avx2); });
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
    JscCpuWeightGrad, WeightGrad,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // x: (N, Cin) input features
        .Arg<ffi::Buffer<ffi::F32>>()    // ct: (M, Cout) output cotangent
        .Arg<ffi::Buffer<ffi::S32>>()    // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::Buffer<ffi::F32>>());  // dw: (S, Cin, Cout) weight gradient

XLA_FFI_DEFINE_HANDLER(
    JscCpuGroupedGatherMatmul, GroupedGatherMatmul,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // x: (N, Cin) input features
        .Arg<ffi::Buffer<ffi::F32>>()    // w: (S, Cin / G, Cout) weights of each slot
        .Arg<ffi::Buffer<ffi::S32>>()    // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::Buffer<ffi::F32>>());  // y: (M, Cout) output features

XLA_FFI_DEFINE_HANDLER(
    JscCpuGroupedWeightGrad, GroupedWeightGrad,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // x: (N, Cin) input features
        .Arg<ffi::Buffer<ffi::F32>>()    // ct: (M, Cout) output cotangent
        .Arg<ffi::Buffer<ffi::S32>>()    // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::Buffer<ffi::F32>>());  // dw: (S, Cin / G, Cout) weight gradient

constexpr JscHandler kHandlers[] = {
    {"jsc_cpu_gather_matmul", JscCpuGatherMatmul},
    {"jsc_cpu_weight_grad", JscCpuWeightGrad},
    {"jsc_cpu_grouped_gather_matmul", JscCpuGroupedGatherMatmul},
    {"jsc_cpu_grouped_weight_grad", JscCpuGroupedWeightGrad},
};

}  // namespace
}  // namespace jsc

JSC_EXPORT_HANDLERS(conv_cpu, jsc::kHandlers)
