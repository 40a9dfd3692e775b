// Native CPU kernels (float32) for the conv's inner ops, computing only the (output,
// slot) pairs that exist: the gather-matmul y[m] = sum_s x[nbr[m, s]] @ w[s] (forward,
// and the feature gradient through the inverse map) and the kernel gradient
// dw[s] = sum_m x[nbr[m, s]]^T ct[m]; and two pieces of the neighbour search: the
// sort of the input keys and the kernel map's inverse.
//
// Unlike the jnp path, which gathers a dense (rows, slots * Cin) block (the ~45% of empty
// slots included) and hands it to a matmul, this walks the map: for a tile of output rows
// and one slot at a time (that slot's Cin x Cout weights stay in L1), every row with a
// neighbour there adds x[j] @ w[s] to its output row, eight columns per AVX2 register.
// Each output element is summed by one thread, slots then input channels in order:
// results do not depend on the thread count (bitwise reproducible).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JSC_X86 1
#endif

namespace jsc_cpu {
namespace ffi = xla::ffi;

constexpr int kTileRows = 32;
constexpr int64_t kRowsPerThread = 512;  // below this, fewer threads

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

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_sparseconv cpu kernels: " + what);
}

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

// Threads for `work` rows of work, at most `cap`: hardware threads, fewer for small work.
int num_threads(int64_t work, int64_t cap) {
  static const int64_t hw = [] {
    const char* env = std::getenv("JAX_SPARSECONV_CPU_THREADS");  // optional cap
    const int64_t n = std::max(1u, std::thread::hardware_concurrency());
    return env != nullptr && std::atoi(env) > 0 ? std::min<int64_t>(n, std::atoi(env)) : n;
  }();
  return int(std::max<int64_t>(1, std::min({hw, cap, work / kRowsPerThread})));
}

// f(t) for t in [0, threads), on that many threads (the caller's included).
template <class F>
void parallel(int threads, const F& f) {
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back([&f, t] { f(t); });
  f(0);
  for (auto& th : pool) th.join();
}

void run(const Problem& p) {
  const bool avx2 = has_avx2();
  const int threads = num_threads(p.m, p.m);
  const int64_t per = (p.m + threads - 1) / threads;
  parallel(threads, [&](int t) { rows(p, t * per, std::min(p.m, (t + 1) * per), avx2); });
}

ffi::Error GatherMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), nd = nbr.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || nd.size() != 2 || yd.size() != 2 || wd[1] != xd[1] ||
      nd[1] != wd[0] || yd[0] != nd[0] || yd[1] != wd[2]) {
    return invalid("gather_matmul: inconsistent shapes");
  }
  Problem p{x.typed_data(), w.typed_data(), nbr.typed_data(), y->typed_data(),
            xd[0],          nd[0],          int(wd[0]),       int(xd[1]),
            int(wd[2])};
  if (p.m == 0 || p.cout == 0) return ffi::Error::Success();
  run(p);
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
  auto xd = x.dimensions(), cd = ct.dimensions(), nd = nbr.dimensions(), dd = dw->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || nd.size() != 2 || dd.size() != 3 || nd[0] != cd[0] ||
      dd[0] != nd[1] || dd[1] != xd[1] || dd[2] != cd[1]) {
    return invalid("kernel_grad: inconsistent shapes");
  }
  Problem p{x.typed_data(), ct.typed_data(), nbr.typed_data(), dw->typed_data(),
            xd[0],          cd[0],          int(nd[1]),        int(xd[1]),
            int(cd[1])};
  if (p.s == 0 || p.cin == 0 || p.cout == 0) return ffi::Error::Success();
  const bool avx2 = has_avx2();
  const int threads = num_threads(p.m, p.s);
  parallel(threads, [&](int t) { grad_slots(p, t, threads, avx2); });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------- inverse map
// inv[j, s] = the output m with nbr[m, s] = j (M where none), for each of the leading batch
// entries, and unique = no (j, s) is read by two outputs (then inv is an exact inverse).
// Threads own whole slots; a collision keeps the last row, and clears `unique`.
ffi::Error Invert(ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::S32>> inv,
                  ffi::Result<ffi::Buffer<ffi::PRED>> unique) {
  auto nd = nbr.dimensions(), id = inv->dimensions(), ud = unique->dimensions();
  const size_t rank = nd.size();
  bool ok = rank >= 2 && id.size() == rank && ud.size() == rank - 2 && id[rank - 1] == nd[rank - 1];
  int64_t batch = 1;
  for (size_t k = 0; ok && k + 2 < rank; ++k) {
    ok = id[k] == nd[k] && ud[k] == nd[k];
    batch *= nd[k];
  }
  if (!ok) {
    return invalid("invert: inconsistent shapes");
  }
  const int64_t m = nd[rank - 2], s = nd[rank - 1], n = id[rank - 2];
  if (m >= INT32_MAX) return invalid("invert: too many rows");
  const int32_t* src = nbr.typed_data();
  int32_t* dst = inv->typed_data();
  bool* uniq = unique->typed_data();
  const int threads = num_threads(m * s / 8, s);
  std::vector<char> clash(size_t(batch) * threads, 0);
  parallel(threads, [&](int t) {
    for (int64_t b = 0; b < batch; ++b) {
      const int32_t* nb = src + b * m * s;
      int32_t* out = dst + b * n * s;
      for (int64_t sl = t; sl < s; sl += threads) {
        for (int64_t j = 0; j < n; ++j) out[j * s + sl] = int32_t(m);
        for (int64_t r = 0; r < m; ++r) {
          const int32_t j = nb[r * s + sl];
          if (j < 0 || j >= n) continue;
          int32_t& e = out[int64_t(j) * s + sl];
          if (e != m) clash[size_t(b) * threads + t] = 1;
          e = int32_t(r);
        }
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    bool any = false;
    for (int t = 0; t < threads; ++t) any |= clash[size_t(b) * threads + t] != 0;
    uniq[b] = !any;
  }
  return ffi::Error::Success();
}


// ---------------------------------------------------------------- key sort
// Sorts the two-word keys (hi, lo) of each leading batch entry with their positions:
// (hi, lo, perm) in ascending (hi, lo, position) order, so equal keys keep their order.
// LSD radix sort of the 64-bit key (hi << 32 | lo), 16 bits a pass, stable; passes whose
// digit is the same for every key are skipped.
ffi::Error SortKeys(ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                    ffi::Result<ffi::Buffer<ffi::U32>> hi_out,
                    ffi::Result<ffi::Buffer<ffi::U32>> lo_out,
                    ffi::Result<ffi::Buffer<ffi::S32>> perm) {
  auto d = hi.dimensions();
  const auto same = [&](auto dims) {
    if (dims.size() != d.size()) return false;
    for (size_t k = 0; k < d.size(); ++k)
      if (dims[k] != d[k]) return false;
    return true;
  };
  if (d.size() < 1 || !same(lo.dimensions()) || !same(hi_out->dimensions()) ||
      !same(lo_out->dimensions()) || !same(perm->dimensions())) {
    return invalid("sort_keys: inconsistent shapes");
  }
  const int64_t n = d[d.size() - 1];
  if (n >= INT32_MAX) return invalid("sort_keys: too many keys");
  const int64_t batch = n == 0 ? 0 : int64_t(hi.element_count()) / n;
  std::vector<uint64_t> key(n), key2(n);
  std::vector<int32_t> idx(n), idx2(n);
  std::vector<int64_t> count(1 << 16);
  for (int64_t b = 0; b < batch; ++b) {
    const uint32_t* h = hi.typed_data() + b * n;
    const uint32_t* l = lo.typed_data() + b * n;
    uint64_t all_or = 0, all_and = ~uint64_t(0);
    for (int64_t i = 0; i < n; ++i) {
      key[i] = (uint64_t(h[i]) << 32) | l[i];
      idx[i] = int32_t(i);
      all_or |= key[i];
      all_and &= key[i];
    }
    for (int shift = 0; shift < 64; shift += 16) {
      if ((((all_or ^ all_and) >> shift) & 0xffff) == 0) continue;  // one digit value: no-op
      std::fill(count.begin(), count.end(), 0);
      for (int64_t i = 0; i < n; ++i) ++count[(key[i] >> shift) & 0xffff];
      int64_t sum = 0;
      for (auto& c : count) {
        const int64_t t = c;
        c = sum;
        sum += t;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t at = count[(key[i] >> shift) & 0xffff]++;
        key2[at] = key[i];
        idx2[at] = idx[i];
      }
      key.swap(key2);
      idx.swap(idx2);
    }
    uint32_t* ho = hi_out->typed_data() + b * n;
    uint32_t* lw = lo_out->typed_data() + b * n;
    int32_t* pm = perm->typed_data() + b * n;
    for (int64_t i = 0; i < n; ++i) {
      ho[i] = uint32_t(key[i] >> 32);
      lw[i] = uint32_t(key[i]);
      pm[i] = idx[i];
    }
  }
  return ffi::Error::Success();
}

}  // namespace jsc_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(JscCpuGatherMatmul, jsc_cpu::GatherMatmul,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JscCpuKernelGrad, jsc_cpu::KernelGrad,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JscCpuInvert, jsc_cpu::Invert,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::PRED>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JscCpuSortKeys, jsc_cpu::SortKeys,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
