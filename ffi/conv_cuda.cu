// Sparse-conv kernels and their XLA FFI handlers.
//
// One source, two builds: nvcc makes the CUDA library, and g++ makes a CPU library of
// the same file through cuda_host_shim.h (see conv_cuda_host.cc), so CI runs every
// kernel's indexing through the whole test suite without a GPU.
//
// Ops (FFI targets, this file's table at the end; kernel map `nbr` (M, S) int32, entry
// outside [0, N) = no neighbour):
//   jsc_gather_matmul:  y[m] = sum_s x[nbr[m, s]] @ w[s]          x (N, Cin), w (S, Cin, Cout)
//   jsc_weight_grad:    dw[s] = sum_m x[nbr[m, s]]^T ct[m]        ct (M, Cout)
// The conv's feature gradient is jsc_gather_matmul over the inverse map with w
// transposed (a gather, no atomics). Every output element is summed by one thread in a
// fixed order (slots, then channels; the weight gradient over fixed row partitions,
// then the partials in partition order), so results are bitwise reproducible.
//
// Kernels: float32 / float64 on the CUDA cores (SIMT, 4 x 4 outputs a thread), float16 and
// bfloat16 on the tensor cores (WMMA 16x16x16, float32 accumulation), both ops. bfloat16
// has no tensor cores below compute capability 8.0: which body a bf16 kernel runs is
// decided by the code the GPU runs (nvcc's __CUDA_ARCH__: the sm_75 image holds the SIMT
// body, sm_80 and newer the WMMA one), not by a runtime query of the device, so the
// handlers make no runtime call but the launch check (capture-safe).
//
// Memory traffic: a gather-matmul block copies its tile's block of the neighbour map
// (64 rows x up to 32 slots, contiguous when S <= 32) to shared memory once, with a flag
// per slot that any row has a neighbour there (slots without one are skipped); the
// weight gradient does the same for 256 rows of its slot at a time. Every tile copy loads
// its elements into registers first (a fixed, unrolled count per thread, all loads in
// flight), then stores them to shared memory. The column tiles of one row tile are
// neighbouring blocks, so the second gather of the same rows hits the cache. The
// tensor-core kernels copy whole rows: 8 half elements (16 bytes) a thread, one 16-byte
// load when the row length is a multiple of 8 (Cin for the gathered rows, Cout for the
// weights and the cotangent) and the buffer 16-byte aligned, else eight 2-byte loads; the
// shared-memory stores are 16 bytes either way, and no tile is transposed on the way (the
// weight gradient reads its gathered rows as a column-major A operand). bf16 tiles are
// loaded with the .shared PTX load (ldmatrix, as nvcc does for fp16).
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "cuda_common.h"

namespace jsc {

// bfloat16 WMMA needs compute capability 8.0. Device code compiled for an older GPU
// (sm_75) runs the bf16 kernels on the CUDA cores (float32 accumulation, the same results);
// device code for 8.0 and newer on the tensor cores. The host build decides per launch
// from $JSC_SHIM_CC (jsc_shim::device_cc()).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kArchHasBf16Mma = false;
#else
constexpr bool kArchHasBf16Mma = true;
#endif
#ifndef __CUDACC__
constexpr int kMinCcBf16Mma = 80;  // the host build's choice (jsc_shim::device_cc())
#endif
// Device code for 8.0 and newer (loads bf16 tiles with the .shared PTX load).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kDeviceHasBf16Mma = true;
#else
constexpr bool kDeviceHasBf16Mma = false;
#endif

template <class T>
constexpr bool kIsHalf = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// ---------------------------------------------------------------- per-thread helpers
template <class T>
struct Acc {
  using type = float;  // half types and float accumulate in float32
};
template <>
struct Acc<double> {
  using type = double;
};

__host__ __device__ inline float load_acc(float v) { return v; }
__host__ __device__ inline double load_acc(double v) { return v; }
__host__ __device__ inline float load_acc(__half v) { return __half2float(v); }
__host__ __device__ inline float load_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__host__ __device__ inline void store(float* p, float v) { *p = v; }
__host__ __device__ inline void store(double* p, double v) { *p = v; }
__host__ __device__ inline void store(__half* p, float v) { *p = __float2half(v); }
__host__ __device__ inline void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

__device__ inline uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ inline uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Tile sizes: a block owns BM output rows x BN output channels (SIMT: 256 threads,
// 4x4 each, strided by 16 so shared-memory reads are conflict free).
constexpr int kThreads = 256;
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;        // reduction step of the SIMT kernels
constexpr int HBK = 32;       // reduction step of the tensor-core kernels
constexpr int SC = 32;        // slots of the gather-matmul's neighbour block in shared memory
constexpr int KG_ROWS = kThreads;  // rows of the weight gradient's neighbour batch
constexpr int LDA = BM + 1;   // k-major A tile, padded against bank conflicts
constexpr int LDH = HBK + 8;  // row-major half A tile xs[r][k] (WMMA: multiple of 8)
constexpr int LDB = BN + 8;   // row-major half B tile ws[k][c]; the weight gradient's tiles
constexpr int LDC = BN + 4;   // float staging of the accumulators
constexpr int kVec = 8;       // half elements in 16 bytes
// Elements each thread copies per tile (loaded into registers first, all in flight, then
// stored to shared memory).
constexpr int kNbrPerThread = BM * SC / kThreads;  // neighbour block
constexpr int kXPerThread = BM * BK / kThreads;    // SIMT gather / weight-gradient gather
constexpr int kWPerThread = BK * BN / kThreads;    // SIMT weights / weight-gradient cotangent
// Flags of the launch: which tiles may be copied with 16-byte loads.
constexpr unsigned kVecX = 1;  // x's rows (Cin % 8 == 0, x 16-byte aligned)
constexpr unsigned kVecB = 2;  // w's rows (forward) / ct's rows (weight gradient): Cout % 8 == 0

// What the indexing below assumes of the tile constants (checked for both builds).
static_assert(kThreads == 256 && BM * BN == kThreads * 16, "SIMT: 4 x 4 outputs per thread");
static_assert(BM == 4 * 16 && BN == 4 * 16, "SIMT: thread (tr, tc) owns rows tr + 16 i, cols tc + 16 j");
static_assert(kThreads / 32 == (BM / 16) * (BN / 32), "WMMA: 8 warps own 16 x 32 each");
static_assert(HBK % 16 == 0 && BK % 4 == 0, "reduction steps: whole WMMA k-steps");
static_assert((BM * BK) % kThreads == 0 && (BK * BN) % kThreads == 0 &&
                  (BM * SC) % kThreads == 0,
              "tile copies: a whole number of elements per thread");
static_assert(BM * HBK == kVec * kThreads && HBK * BN == kVec * kThreads && BM == BN,
              "tensor-core tile copies: one 16-byte row piece per thread");
static_assert(kThreads % BK == 0 && kThreads % BM == 0 && kThreads % BN == 0,
              "tile copies: each thread keeps one column");
static_assert(SC <= 32 && KG_ROWS == kThreads && KG_ROWS / BK <= 32 && KG_ROWS % HBK == 0,
              "neighbour blocks: one warp scans the slots / row groups, one row per thread");
// WMMA: ldm a multiple of 16 bytes (8 half / 4 float elements), and every fragment
// pointer 32-byte aligned: row offsets of 16 rows and column offsets of 16 elements; the
// 16-byte tile stores need rows of a multiple of 16 bytes.
static_assert(LDH % 8 == 0 && LDB % 8 == 0 && LDC % 4 == 0, "WMMA ldm: multiple of 16 bytes");
static_assert((16 * LDH * 2) % 32 == 0 && (16 * LDB * 2) % 32 == 0 &&
                  (16 * LDC * 4) % 32 == 0 && (16 * 2) % 32 == 0,
              "WMMA fragment pointers stay 32-byte aligned");
static_assert(LDH >= HBK && LDB >= BN && LDC >= BN, "padded rows hold the tile");

template <class T>
__host__ __device__ inline T from_float(float v) {
  T r;
  store(&r, v);
  return r;
}

// Neighbour index, or -1 for none (anything outside [0, n) counts as none).
__host__ __device__ inline int32_t neighbour(const int32_t* __restrict__ nbr, int64_t row,
                                            int64_t rows, int s, int num_slots, int64_t n) {
  if (row >= rows) return -1;
  const int32_t j = nbr[row * num_slots + s];
  return (j >= 0 && j < n) ? j : -1;
}

// 8 half elements p[0, count) (zero from `count` on) as 16 bytes, by 2-byte loads: the
// copy of a row piece that a 16-byte load cannot take (unaligned, or the row's end).
template <class T>
__device__ inline uint4 pack8(const T* p, int count) {
  uint32_t v[4];
  JSC_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = 2 * i < count ? bits16(p[2 * i]) : 0u;
    const uint32_t hi = 2 * i + 1 < count ? bits16(p[2 * i + 1]) : 0u;
    v[i] = lo | hi << 16;
  }
  return uint4{v[0], v[1], v[2], v[3]};
}

// The 8 elements of a row at p: `avail` of them exist (<= 0: none); 16-byte load when
// `vec` (then p is 16-byte aligned and all 8 exist or none).
template <class T>
__device__ inline uint4 row_piece(const T* p, int avail, bool vec) {
  if (avail <= 0) return uint4{0u, 0u, 0u, 0u};
  return vec ? ld16(p) : pack8(p, avail);
}

// The gather-matmul tile's neighbour block, once per tile (per SC slots): nbrs[r * SC + t]
// = the neighbour of row m0 + r at slot s0 + t (-1: none) for t < sc <= SC - a contiguous
// block of the map when S <= SC - and present[t] = whether any row has one. Returns whether
// any slot does, for the whole block (barriers: every thread calls it).
__device__ inline bool load_neighbours(int32_t* nbrs, int32_t* present,
                                       const int32_t* __restrict__ nbr, int64_t m0, int64_t m,
                                       int s0, int sc, int num_slots, int64_t n, int tid) {
  int32_t v[kNbrPerThread];
  JSC_UNROLL
  for (int i = 0; i < kNbrPerThread; ++i) {
    const int e = tid + i * kThreads;
    v[i] = e < BM * sc ? neighbour(nbr, m0 + e / sc, m, s0 + e % sc, num_slots, n) : -1;
  }
  JSC_UNROLL
  for (int i = 0; i < kNbrPerThread; ++i) {
    const int e = tid + i * kThreads;
    if (e < BM * sc) nbrs[(e / sc) * SC + e % sc] = v[i];
  }
  __syncthreads();
  int any = 0;
  if (tid < sc) {
    JSC_UNROLL_4  // (a full unroll would hold 64 loads in registers)
    for (int r = 0; r < BM; ++r) any |= nbrs[r * SC + tid] >= 0;
    present[tid] = any;
  }
  return __syncthreads_or(any);
}

// acc[i][j] += sum_k a[k][tr + 16 i] * b[k][tc + 16 j] over one BK step.
template <class A>
__host__ __device__ inline void fma_tile(const A* a, const A* b, int tr, int tc, A (&acc)[4][4]) {
  for (int k = 0; k < BK; ++k) {
    A av[4], bv[4];
    for (int i = 0; i < 4; ++i) av[i] = a[k * LDA + tr + 16 * i];
    for (int j = 0; j < 4; ++j) bv[j] = b[k * BN + tc + 16 * j];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// Block b of a gather-matmul grid owns rows BM * (b / col_tiles) and columns
// BN * (b % col_tiles): the column tiles of one row tile run next to each other, so the
// second one's gather finds the rows in cache.

// ---------------------------------------------------------------- gather-matmul, SIMT
// float32 and float64 (and bfloat16 below compute capability 8.0).
template <class T>
__device__ inline void gather_matmul_simt(const T* __restrict__ x, const T* __restrict__ w,
                                          const int32_t* __restrict__ nbr, T* __restrict__ y,
                                          int64_t n, int64_t m, int num_slots, int cin,
                                          int cout, int col_tiles) {
  using A = typename Acc<T>::type;
  JSC_SHARED(int32_t, nbrs, [BM * SC]);
  JSC_SHARED(int32_t, present, [SC]);
  JSC_SHARED(A, xs, [BK * LDA]);
  JSC_SHARED(A, ws, [BK * BN]);
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  // This thread's elements of the tile copies: row xr + 16 i, column xk of the gather;
  // row wk + 4 i, column wc of the weights (constant strides: no per-element indices).
  const int xr = tid / BK, xk = tid % BK, wk = tid / BN, wc = tid % BN;
  const int64_t m0 = int64_t(blockIdx.x / unsigned(col_tiles)) * BM;
  const int n0 = int(blockIdx.x % unsigned(col_tiles)) * BN;
  A acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  for (int s0 = 0; s0 < num_slots; s0 += SC) {
    const int sc = num_slots - s0 < SC ? num_slots - s0 : SC;
    if (!load_neighbours(nbrs, present, nbr, m0, m, s0, sc, num_slots, n, tid)) continue;
    for (int t = 0; t < sc; ++t) {
      if (!present[t]) continue;  // no row of the tile has a neighbour at this slot
      const T* ws_src = w + int64_t(s0 + t) * cin * cout;
      for (int k0 = 0; k0 < cin; k0 += BK) {
        A xv[kXPerThread], wv[kWPerThread];
        JSC_UNROLL
        for (int i = 0; i < kXPerThread; ++i) {  // the gather: reused by all BN columns
          const int32_t j = nbrs[(xr + i * (kThreads / BK)) * SC + t];
          xv[i] = (j >= 0 && k0 + xk < cin) ? load_acc(x[int64_t(j) * cin + k0 + xk]) : A(0);
        }
        JSC_UNROLL
        for (int i = 0; i < kWPerThread; ++i) {
          const int k = wk + i * (kThreads / BN);
          wv[i] = (k0 + k < cin && n0 + wc < cout)
                      ? load_acc(ws_src[int64_t(k0 + k) * cout + n0 + wc]) : A(0);
        }
        JSC_UNROLL
        for (int i = 0; i < kXPerThread; ++i) xs[xk * LDA + xr + i * (kThreads / BK)] = xv[i];
        JSC_UNROLL
        for (int i = 0; i < kWPerThread; ++i) ws[tid + i * kThreads] = wv[i];  // ws[wk + 4 i][wc]
        __syncthreads();
        fma_tile(xs, ws, tr, tc, acc);
        __syncthreads();
      }
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t r = m0 + tr + 16 * i;
      const int c = n0 + tc + 16 * j;
      if (r < m && c < cout) store(&y[r * cout + c], acc[i][j]);
    }
}

// ---------------------------------------------------------------- tensor-core tile loads
// WMMA tile loads from shared memory. nvcc's load_matrix_sync for bf16 takes a generic
// address (LD instructions, not LDS/LDSM as for fp16); the PTX it stands for, with the
// .shared state space spelled out, does not.
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define JSC_BF16_SHARED_LOAD(USE, LAYOUT, FRAG_USE, FRAG_LAYOUT)                              \
  __device__ inline void load_shared_bf16(                                                  \
      nvcuda::wmma::fragment<nvcuda::wmma::FRAG_USE, 16, 16, 16, __nv_bfloat16,              \
                             nvcuda::wmma::FRAG_LAYOUT>& f,                                  \
      const __nv_bfloat16* p, unsigned ldm) {                                                \
    unsigned* r = reinterpret_cast<unsigned*>(f.x);                                          \
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));                   \
    asm volatile("wmma.load." USE ".sync.aligned." LAYOUT                                    \
                 ".m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"                       \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                            \
                 : "r"(a), "r"(ldm)                                                          \
                 : "memory");                                                                \
  }
JSC_BF16_SHARED_LOAD("a", "row", matrix_a, row_major)  // the forward's gathered rows
JSC_BF16_SHARED_LOAD("a", "col", matrix_a, col_major)  // the weight gradient's, transposed
JSC_BF16_SHARED_LOAD("b", "row", matrix_b, row_major)  // weights / cotangent rows
#undef JSC_BF16_SHARED_LOAD
#endif

template <class T, class Frag>
__device__ inline void load_tile(Frag& f, const T* p, unsigned ldm) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value && kDeviceHasBf16Mma) {
    load_shared_bf16(f, p, ldm);
  } else {
    nvcuda::wmma::load_matrix_sync(f, p, ldm);
  }
}

// ---------------------------------------------------------------- gather-matmul, tensor cores
// float16 / bfloat16 inputs, float32 accumulation (WMMA 16x16x16). 8 warps: warp w owns
// rows 16 (w / 2) and columns 32 (w % 2) + [0, 32) of the block's 64 x 64 tile. Both tiles
// are row-major: the gathered rows xs[r][k] (A) and the weights ws[k][c] (B), each copied
// a 16-byte row piece per thread.
// Shared memory: the accumulators' float staging (used after the main loop only) shares
// its bytes with the A and B tiles: 25 KiB, so that 2 blocks fit a 7.5 GPU's 64 KiB and 4
// an 8.0's.
template <class T>
struct MmaShared {
  union {
    struct {
      T xs[BM * LDH];   // xs[r][k]: the gathered rows
      T ws[HBK * LDB];  // ws[k][c]: the weight tile
    } in;
    float cs[BM * LDC];  // cs[r][c]: the accumulators
  } u;
  int32_t nbrs[BM * SC];
  int32_t present[SC];
};
static_assert((BM * LDH * 2) % 32 == 0, "MmaShared: ws stays 32-byte aligned");

template <class T, bool vec_x, bool vec_w>
__device__ inline void gather_matmul_mma_body(MmaShared<T>& sm, const T* __restrict__ x,
                                              const T* __restrict__ w,
                                              const int32_t* __restrict__ nbr,
                                              T* __restrict__ y, int64_t n, int64_t m,
                                              int num_slots, int cin, int cout, int col_tiles) {
  namespace wmma = nvcuda::wmma;
  T* const xs = sm.u.in.xs;
  T* const ws = sm.u.in.ws;
  float* const cs = sm.u.cs;
  int32_t* const nbrs = sm.nbrs;
  int32_t* const present = sm.present;
  const int tid = threadIdx.x, warp = tid / 32, wr = warp / 2, wc = warp % 2;
  // This thread's row pieces: elements [8 gq, 8 gq + 8) of gathered row gr; elements
  // [8 wq, 8 wq + 8) of weight row wk.
  const int gr = tid / (HBK / kVec), gq = tid % (HBK / kVec);
  const int wk = tid / (BN / kVec), wq = tid % (BN / kVec);
  const int64_t m0 = int64_t(blockIdx.x / unsigned(col_tiles)) * BM;
  const int n0 = int(blockIdx.x % unsigned(col_tiles)) * BN;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int s0 = 0; s0 < num_slots; s0 += SC) {
    const int sc = num_slots - s0 < SC ? num_slots - s0 : SC;
    if (!load_neighbours(nbrs, present, nbr, m0, m, s0, sc, num_slots, n, tid)) continue;
    for (int t = 0; t < sc; ++t) {
      if (!present[t]) continue;
      const int32_t j = nbrs[gr * SC + t];
      // This thread's pieces of the k0 = 0 tiles (the pointers step HBK columns / rows); what
      // is left of their rows (<= 0: nothing).
      const T* xp = x + int64_t(j < 0 ? 0 : j) * cin + gq * kVec;
      const T* wp = w + (int64_t(s0 + t) * cin + wk) * cout + n0 + wq * kVec;
      const int x_left = j >= 0 ? cin - gq * kVec : 0, w_left = cout - n0 - wq * kVec;
      for (int k0 = 0; k0 < cin; k0 += HBK, xp += HBK, wp += int64_t(HBK) * cout) {
        const uint4 xv = row_piece(xp, x_left - k0, vec_x);
        const uint4 wv = row_piece(wp, k0 + wk < cin ? w_left : 0, vec_w);
        st16(xs + gr * LDH + gq * kVec, xv);
        st16(ws + wk * LDB + wq * kVec, wv);
        __syncthreads();
        JSC_UNROLL
        for (int k = 0; k < HBK; k += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          load_tile(a, xs + wr * 16 * LDH + k, LDH);
          JSC_UNROLL
          for (int jj = 0; jj < 2; ++jj) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            load_tile(b, ws + k * LDB + wc * 32 + jj * 16, LDB);
            wmma::mma_sync(acc[jj], a, b, acc[jj]);
          }
        }
        __syncthreads();
      }
    }
  }
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(cs + wr * 16 * LDC + wc * 32 + j * 16, acc[j], LDC,
                            wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    if (m0 + r < m && n0 + c < cout) store(&y[(m0 + r) * cout + n0 + c], cs[r * LDC + c]);
  }
}

// The body for the launch's copy flags (a variant each: no flag in the loop).
template <class T>
__device__ inline void gather_matmul_mma(const T* __restrict__ x, const T* __restrict__ w,
                                         const int32_t* __restrict__ nbr, T* __restrict__ y,
                                         int64_t n, int64_t m, int num_slots, int cin, int cout,
                                         int col_tiles, unsigned vec) {
  JSC_SHARED(__align__(32) MmaShared<T>, sm, );
  switch (vec & (kVecX | kVecB)) {
    case kVecX | kVecB:
      return gather_matmul_mma_body<T, true, true>(sm, x, w, nbr, y, n, m, num_slots, cin,
                                                   cout, col_tiles);
    case kVecX:
      return gather_matmul_mma_body<T, true, false>(sm, x, w, nbr, y, n, m, num_slots, cin,
                                                    cout, col_tiles);
    case kVecB:
      return gather_matmul_mma_body<T, false, true>(sm, x, w, nbr, y, n, m, num_slots, cin,
                                                    cout, col_tiles);
    default:
      return gather_matmul_mma_body<T, false, false>(sm, x, w, nbr, y, n, m, num_slots, cin,
                                                     cout, col_tiles);
  }
}

// ---------------------------------------------------------------- gather-matmul kernel
// grid (ceil(M / BM) * ceil(Cout / BN)), kThreads threads. Register caps (ptxas -v: no
// spills): float32 5 blocks per SM (48 registers; 4 on a 7.5 GPU, which holds 1024 threads
// per SM); float64: 3 would spill; tensor cores: no minimum (ptxas picks 74-80 registers,
// no spills, so 3 blocks of 256 threads fit an SM; capped at 4 blocks, 64 registers, or at
// 3, 80, the f16 / bf16 bodies spilled 40-232 bytes on sm_75, sm_80 and sm_90).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
constexpr int kSimtBlocksPerSm = 4;
#else
constexpr int kSimtBlocksPerSm = 5;
#endif
constexpr int kMmaBlocksPerSm = 0;
template <class T>
struct GatherBlocksPerSm {
  static constexpr int value = kIsHalf<T> ? kMmaBlocksPerSm : kSimtBlocksPerSm;
};
template <>
struct GatherBlocksPerSm<double> {
  static constexpr int value = 0;  // no minimum: ptxas picks 75-96 registers, no spills
};

template <class T>
__global__ void __launch_bounds__(kThreads, GatherBlocksPerSm<T>::value)
    gather_matmul_kernel(const T* __restrict__ x, const T* __restrict__ w,
                         const int32_t* __restrict__ nbr, T* __restrict__ y, int64_t n,
                         int64_t m, int num_slots, int cin, int cout, int col_tiles,
                         unsigned vec) {
  if constexpr (std::is_same<T, __half>::value) {
    gather_matmul_mma(x, w, nbr, y, n, m, num_slots, cin, cout, col_tiles, vec);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#ifdef __CUDACC__
    if constexpr (kArchHasBf16Mma) {
      gather_matmul_mma(x, w, nbr, y, n, m, num_slots, cin, cout, col_tiles, vec);
    } else {
      gather_matmul_simt(x, w, nbr, y, n, m, num_slots, cin, cout, col_tiles);
    }
#else
    if (jsc_shim::device_cc() >= kMinCcBf16Mma) {
      gather_matmul_mma(x, w, nbr, y, n, m, num_slots, cin, cout, col_tiles, vec);
    } else {
      gather_matmul_simt(x, w, nbr, y, n, m, num_slots, cin, cout, col_tiles);
    }
#endif
  } else {
    gather_matmul_simt(x, w, nbr, y, n, m, num_slots, cin, cout, col_tiles);
  }
}

// ---------------------------------------------------------------- weight gradient, SIMT
// Partial sums over fixed row partitions: grid (ceil(Cin / BM), ceil(Cout / BN), S * P),
// part[p, s] = sum over rows of partition p of x[nbr[m, s]]^T ct[m]. The neighbours of
// KG_ROWS rows at a time come to shared memory in one read (a thread each), with a flag
// per BK-row group that has any.
template <class T>
__device__ inline void weight_grad_simt(const T* __restrict__ x, const T* __restrict__ ct,
                                        const int32_t* __restrict__ nbr,
                                        typename Acc<T>::type* __restrict__ part, int64_t n,
                                        int64_t m, int num_slots, int cin, int cout, int parts) {
  using A = typename Acc<T>::type;
  constexpr int kGroups = KG_ROWS / BK;
  JSC_SHARED(int32_t, rows, [KG_ROWS]);
  JSC_SHARED(int32_t, present, [kGroups]);
  JSC_SHARED(A, xs, [BK * LDA]);
  JSC_SHARED(A, cs, [BK * BN]);
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  // This thread's elements of the tile copies: row (k) ck + 4 i, column ci / cc.
  const int ck = tid / BM, ci = tid % BM, cc = tid % BN;
  const int i0 = blockIdx.x * BM, c0 = blockIdx.y * BN;
  const int s = blockIdx.z % num_slots, p = blockIdx.z / num_slots;
  const int64_t per = (m + parts - 1) / parts;
  const int64_t mb = p * per, me = mb + per < m ? mb + per : m;
  A acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  for (int64_t b0 = mb; b0 < me; b0 += KG_ROWS) {
    rows[tid] = neighbour(nbr, b0 + tid, me, s, num_slots, n);  // -1 from `me` on
    __syncthreads();
    int any = 0;
    if (tid < kGroups) {
      JSC_UNROLL
      for (int k = 0; k < BK; ++k) any |= rows[tid * BK + k] >= 0;
      present[tid] = any;
    }
    if (!__syncthreads_or(any)) continue;
    for (int g = 0; g < kGroups; ++g) {
      if (!present[g]) continue;
      const int64_t r0 = b0 + g * BK;
      const int32_t* grows = rows + g * BK;
      A xv[kXPerThread], cv[kWPerThread];
      JSC_UNROLL
      for (int i = 0; i < kXPerThread; ++i) {  // xs[k][i] = x[nbr[r0 + k, s], i0 + i]
        const int32_t j = grows[ck + i * (kThreads / BM)];
        xv[i] = (j >= 0 && i0 + ci < cin) ? load_acc(x[int64_t(j) * cin + i0 + ci]) : A(0);
      }
      JSC_UNROLL
      for (int i = 0; i < kWPerThread; ++i) {  // cs[k][c] = ct[r0 + k, c0 + c] where kept
        const int k = ck + i * (kThreads / BN);
        cv[i] = (grows[k] >= 0 && c0 + cc < cout) ? load_acc(ct[(r0 + k) * cout + c0 + cc])
                                                  : A(0);
      }
      JSC_UNROLL
      for (int i = 0; i < kXPerThread; ++i) xs[(ck + i * (kThreads / BM)) * LDA + ci] = xv[i];
      JSC_UNROLL
      for (int i = 0; i < kWPerThread; ++i) cs[tid + i * kThreads] = cv[i];
      __syncthreads();
      fma_tile(xs, cs, tr, tc, acc);
      __syncthreads();
    }
  }
  A* out = part + (int64_t(p) * num_slots + s) * cin * cout;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int ci = i0 + tr + 16 * i, co = c0 + tc + 16 * j;
      if (ci < cin && co < cout) out[int64_t(ci) * cout + co] = acc[i][j];
    }
}

// ---------------------------------------------------------------- weight gradient, tensor cores
// The same partial sums for float16 / bfloat16 (float32 accumulation, WMMA 16x16x16):
// dw tile (64 input channels x 64 output channels) += X^T C over groups of HBK rows,
// X = the gathered rows xs[k][i] read as a column-major A operand (A[i][k] = xs[k][i]),
// C = the cotangent rows cs[k][c] (row-major B); both copied as they lie in memory, a
// 16-byte row piece per thread. 8 warps: warp w owns input channels 16 (w / 2) and output
// channels 32 (w % 2) + [0, 32). A row without a neighbour is zero in both tiles (so an
// infinite cotangent there adds nothing, as in the SIMT kernel).
template <class T>
struct WeightGradShared {
  union {
    struct {
      T xs[HBK * LDB];  // xs[k][i]: the gathered rows
      T cs[HBK * LDB];  // cs[k][c]: the cotangent rows
    } in;
    float st[BM * LDC];  // st[i][c]: the accumulators
  } u;
  int32_t rows[KG_ROWS];
  int32_t present[KG_ROWS / HBK];
};
static_assert((HBK * LDB * 2) % 32 == 0, "WeightGradShared: cs stays 32-byte aligned");

template <class T>
__device__ inline void weight_grad_mma(const T* __restrict__ x, const T* __restrict__ ct,
                                       const int32_t* __restrict__ nbr, float* __restrict__ part,
                                       int64_t n, int64_t m, int num_slots, int cin, int cout,
                                       int parts, unsigned vec) {
  namespace wmma = nvcuda::wmma;
  constexpr int kGroups = KG_ROWS / HBK;
  JSC_SHARED(__align__(32) WeightGradShared<T>, sm, );
  T* const xs = sm.u.in.xs;
  T* const cs = sm.u.in.cs;
  float* const st = sm.u.st;
  int32_t* const rows = sm.rows;
  int32_t* const present = sm.present;
  const int tid = threadIdx.x, warp = tid / 32, wr = warp / 2, wc = warp % 2;
  // This thread's row pieces: elements [8 cq, 8 cq + 8) of row ck of both tiles.
  const int ck = tid / (BM / kVec), cq = tid % (BM / kVec);
  const bool vec_x = (vec & kVecX) != 0, vec_c = (vec & kVecB) != 0;
  const int i0 = blockIdx.x * BM, c0 = blockIdx.y * BN;
  const int s = blockIdx.z % num_slots, p = blockIdx.z / num_slots;
  const int64_t per = (m + parts - 1) / parts;
  const int64_t mb = p * per, me = mb + per < m ? mb + per : m;
  const int xi = i0 + cq * kVec, cc = c0 + cq * kVec;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int64_t b0 = mb; b0 < me; b0 += KG_ROWS) {
    rows[tid] = neighbour(nbr, b0 + tid, me, s, num_slots, n);  // -1 from `me` on
    __syncthreads();
    int any = 0;
    if (tid < kGroups) {
      JSC_UNROLL
      for (int k = 0; k < HBK; ++k) any |= rows[tid * HBK + k] >= 0;
      present[tid] = any;
    }
    if (!__syncthreads_or(any)) continue;
    for (int g = 0; g < kGroups; ++g) {
      if (!present[g]) continue;
      const int32_t j = rows[g * HBK + ck];
      const int64_t r = b0 + g * HBK + ck;  // < me where j >= 0
      const uint4 xv = row_piece(x + int64_t(j < 0 ? 0 : j) * cin + xi, j >= 0 ? cin - xi : 0,
                                 vec_x);
      const uint4 cv = row_piece(ct + (j < 0 ? 0 : r) * cout + cc, j >= 0 ? cout - cc : 0,
                                 vec_c);
      st16(xs + ck * LDB + cq * kVec, xv);
      st16(cs + ck * LDB + cq * kVec, cv);
      __syncthreads();
      JSC_UNROLL
      for (int k = 0; k < HBK; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
        load_tile(a, xs + k * LDB + wr * 16, LDB);
        JSC_UNROLL
        for (int jj = 0; jj < 2; ++jj) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          load_tile(b, cs + k * LDB + wc * 32 + jj * 16, LDB);
          wmma::mma_sync(acc[jj], a, b, acc[jj]);
        }
      }
      __syncthreads();
    }
  }
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(st + wr * 16 * LDC + wc * 32 + j * 16, acc[j], LDC,
                            wmma::mem_row_major);
  __syncthreads();
  float* out = part + (int64_t(p) * num_slots + s) * cin * cout;
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int i = e / BN, c = e % BN;
    if (i0 + i < cin && c0 + c < cout) out[int64_t(i0 + i) * cout + c0 + c] = st[i * LDC + c];
  }
}

// ---------------------------------------------------------------- weight-gradient kernels
// Register cap: 4 blocks per SM (what ffi.num_partitions assumes) at 64 registers, without
// spills; float64 needs more (2 blocks).
template <class T>
struct WeightGradBlocksPerSm {
  static constexpr int value = 4;
};
template <>
struct WeightGradBlocksPerSm<double> {
  static constexpr int value = 2;
};

template <class T>
__global__ void __launch_bounds__(kThreads, WeightGradBlocksPerSm<T>::value)
    weight_grad_partial(const T* __restrict__ x, const T* __restrict__ ct,
                        const int32_t* __restrict__ nbr,
                        typename Acc<T>::type* __restrict__ part, int64_t n, int64_t m,
                        int num_slots, int cin, int cout, int parts, unsigned vec) {
  if constexpr (std::is_same<T, __half>::value) {
    weight_grad_mma(x, ct, nbr, part, n, m, num_slots, cin, cout, parts, vec);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#ifdef __CUDACC__
    if constexpr (kArchHasBf16Mma) {
      weight_grad_mma(x, ct, nbr, part, n, m, num_slots, cin, cout, parts, vec);
    } else {
      weight_grad_simt(x, ct, nbr, part, n, m, num_slots, cin, cout, parts);
    }
#else
    if (jsc_shim::device_cc() >= kMinCcBf16Mma) {
      weight_grad_mma(x, ct, nbr, part, n, m, num_slots, cin, cout, parts, vec);
    } else {
      weight_grad_simt(x, ct, nbr, part, n, m, num_slots, cin, cout, parts);
    }
#endif
  } else {
    weight_grad_simt(x, ct, nbr, part, n, m, num_slots, cin, cout, parts);
  }
}

// dw[e] = sum_p part[p, e], in partition order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_partials(const typename Acc<T>::type* __restrict__ part, T* __restrict__ dw,
                 int64_t size, int parts) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= size) return;
  typename Acc<T>::type sum = 0;
  for (int p = 0; p < parts; ++p) sum += part[p * size + e];
  store(&dw[e], sum);
}

// ---------------------------------------------------------------- launches and their checks
template <class T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the element type t; false for types the kernels do not take.
template <class F>
bool by_dtype(ffi::DataType t, F&& f) {
  switch (t) {
    case ffi::DataType::F32: f(Tag<float>{}); return true;
    case ffi::DataType::F64: f(Tag<double>{}); return true;
    case ffi::DataType::F16: f(Tag<__half>{}); return true;
    case ffi::DataType::BF16: f(Tag<__nv_bfloat16>{}); return true;
    default: return false;
  }
}

// The 16-byte copy flags of a half-type launch: a's rows (length la) and b's (length lb).
template <class T>
unsigned vector_flags(const void* a, int64_t la, const void* b, int64_t lb) {
  if (!kIsHalf<T>) return 0;
  return (la % kVec == 0 && aligned16(a) ? kVecX : 0) | (lb % kVec == 0 && aligned16(b) ? kVecB : 0);
}

template <class T>
ffi::Error gather_matmul_launch(jsc_stream_t stream, const void* x, const void* w,
                                const int32_t* nbr, void* y, int64_t n, int64_t m, int s,
                                int cin, int cout) {
  const int col_tiles = int(ceil_div(cout, BN));
  const dim3 grid(unsigned(ceil_div(m, BM) * col_tiles));  // checked <= kMaxGridX
  JSC_LAUNCH(gather_matmul_kernel<T>, grid, dim3(kThreads), stream, static_cast<const T*>(x),
             static_cast<const T*>(w), nbr, static_cast<T*>(y), n, m, s, cin, cout, col_tiles,
             vector_flags<T>(x, cin, w, cout));
  return launched("gather_matmul");
}

ffi::Error GatherMatmul(JSC_STREAM_PARAM ffi::AnyBuffer x, ffi::AnyBuffer w,
                        ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::AnyBuffer> y) {
  ConvShape sh;
  if (!gather_matmul_shape(x.dimensions(), w.dimensions(), nbr.dimensions(), y->dimensions(),
                           sh)) {
    return invalid(std::string("gather_matmul: inconsistent shapes: expects ") +
                   kGatherMatmulShapes);
  }
  const int64_t n = sh.n, m = sh.m, s = sh.s, cin = sh.cin, cout = sh.cout;
  const ffi::DataType t = x.element_type();
  if (w.element_type() != t || y->element_type() != t) {
    return invalid("gather_matmul: x, w and y must share one dtype");
  }
  if (!fits_int32(n) || m >= (int64_t(1) << 40)) return invalid("gather_matmul: too many rows");
  if (m == 0 || cout == 0) return ffi::Error::Success();
  if (ceil_div(m, BM) * ceil_div(cout, BN) > kMaxGridX) {  // one block per 64 x 64 tile
    return invalid("gather_matmul: M * Cout = " + std::to_string(m) + " * " +
                   std::to_string(cout) + " needs more 64 x 64 tiles than one launch runs (" +
                   std::to_string(kMaxGridX) + ")");
  }
  ffi::Error result = ffi::Error::Success();
  const bool ok = by_dtype(t, [&](auto tag) {
    result = gather_matmul_launch<typename decltype(tag)::type>(
        stream, x.untyped_data(), w.untyped_data(), nbr.typed_data(), y->untyped_data(), n, m,
        int(s), int(cin), int(cout));
  });
  if (!ok) return invalid("gather_matmul: dtype must be float16, bfloat16, float32 or float64");
  return result;
}

template <class T>
ffi::Error weight_grad_launch(jsc_stream_t stream, const void* x, const void* ct,
                              const int32_t* nbr, void* dw, void* part, int64_t n, int64_t m,
                              int s, int cin, int cout, int parts) {
  using A = typename Acc<T>::type;
  const dim3 grid(unsigned(ceil_div(cin, BM)), unsigned(ceil_div(cout, BN)), unsigned(s * parts));
  JSC_LAUNCH(weight_grad_partial<T>, grid, dim3(kThreads), stream, static_cast<const T*>(x),
             static_cast<const T*>(ct), nbr, static_cast<A*>(part), n, m, s, cin, cout, parts,
             vector_flags<T>(x, cin, ct, cout));
  if (ffi::Error e = launched("weight_grad: partial sums"); e.failure()) return e;
  const int64_t size = int64_t(s) * cin * cout;
  JSC_LAUNCH(sum_partials<T>, dim3(unsigned(ceil_div(size, kThreads))), dim3(kThreads), stream,
             static_cast<const A*>(part), static_cast<T*>(dw), size, parts);
  return launched("weight_grad: sum of the partials");
}

ffi::Error WeightGrad(JSC_STREAM_PARAM ffi::AnyBuffer x, ffi::AnyBuffer ct,
                      ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::AnyBuffer> dw,
                      ffi::Result<ffi::AnyBuffer> part) {
  ConvShape sh;
  const int64_t parts = dim(part->dimensions(), 0);
  if (!weight_grad_shape(x.dimensions(), ct.dimensions(), nbr.dimensions(), dw->dimensions(),
                         sh) ||
      !has_shape(part->dimensions(), {parts, sh.s, sh.cin, sh.cout}) || parts < 1) {
    return invalid(std::string("weight_grad: inconsistent shapes: expects ") +
                   kWeightGradShapes + ", part (P, S, Cin, Cout) with P >= 1");
  }
  const int64_t n = sh.n, m = sh.m, s = sh.s, cin = sh.cin, cout = sh.cout;
  // The partial sums run on a grid (ceil(Cin / 64), ceil(Cout / 64), S * P), and CUDA caps
  // gridDim.z. How many partitions P to use is policy, decided in Python (from the shapes
  // alone, so the summation order is fixed) and passed down as the workspace's leading
  // axis; here it is only validated against the launch limit.
  if (s * parts > kMaxGridYZ) {
    return invalid("weight_grad: S * P = " + std::to_string(s) + " * " + std::to_string(parts) +
                   " partial-sum blocks exceed the CUDA grid limit gridDim.z <= " +
                   std::to_string(kMaxGridYZ) + "; pass a workspace with fewer partitions P");
  }
  const ffi::DataType t = x.element_type();
  const ffi::DataType acc = t == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (ct.element_type() != t || dw->element_type() != t || part->element_type() != acc) {
    return invalid("weight_grad: x, ct and dw must share one dtype; part is its accumulator");
  }
  if (!fits_int32(n)) return invalid("weight_grad: too many rows");
  if (ceil_div(cout, BN) > kMaxGridYZ) return invalid("weight_grad: Cout too large for the grid");
  if (s == 0 || cin == 0 || cout == 0) return ffi::Error::Success();
  ffi::Error result = ffi::Error::Success();
  const bool ok = by_dtype(t, [&](auto tag) {
    result = weight_grad_launch<typename decltype(tag)::type>(
        stream, x.untyped_data(), ct.untyped_data(), nbr.typed_data(), dw->untyped_data(),
        part->untyped_data(), n, m, int(s), int(cin), int(cout), int(parts));
  });
  if (!ok) return invalid("weight_grad: dtype must be float16, bfloat16, float32 or float64");
  return result;
}

// ---------------------------------------------------------------- FFI handlers
namespace {

JSC_DEFINE_HANDLER(
    JscGatherMatmul, GatherMatmul,
    JSC_BIND()
        .Arg<ffi::AnyBuffer>()          // x: (N, Cin) input features
        .Arg<ffi::AnyBuffer>()          // w: (S, Cin, Cout) weights of each slot, x's dtype
        .Arg<ffi::Buffer<ffi::S32>>()   // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::AnyBuffer>());        // y: (M, Cout) output features, x's dtype

JSC_DEFINE_HANDLER(
    JscWeightGrad, WeightGrad,
    JSC_BIND()
        .Arg<ffi::AnyBuffer>()          // x: (N, Cin) input features
        .Arg<ffi::AnyBuffer>()          // ct: (M, Cout) output cotangent, x's dtype
        .Arg<ffi::Buffer<ffi::S32>>()   // nbr: (M, S) kernel map, outside [0, N) = none
        .Ret<ffi::AnyBuffer>()          // dw: (S, Cin, Cout) weight gradient, x's dtype
        .Ret<ffi::AnyBuffer>());        // part: (P, S, Cin, Cout) partial sums, f32 (f64: f64)

constexpr JscHandler kHandlers[] = {
    {"jsc_gather_matmul", JscGatherMatmul},
    {"jsc_weight_grad", JscWeightGrad},
};

}  // namespace
}  // namespace jsc

JSC_EXPORT_HANDLERS(conv_cuda, jsc::kHandlers)
