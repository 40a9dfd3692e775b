// The neighbour search and the inverse map on the GPU, and their XLA FFI handlers: the
// same contract as the native CPU kernels (search_cpu.cc: jsc_cpu_neighbors, jsc_cpu_invert),
// giving exactly their tables. One source, two builds, as conv_cuda.cu: nvcc's, and g++'s
// through cuda_host_shim.h (search_cuda_host.cc), which CI runs.
//
// Ops (FFI targets, this file's table at the end; `...` = leading batch axes, handled here:
// the Python side calls them with vmap_method="broadcast_all"):
//   jsc_neighbors:  in_coords (..., N, 3), in_batch (..., N), in_valid (..., N),
//                   out_coords (..., M, 3), out_batch (..., M), out_valid (..., M),
//                   deltas (S, 3) or (..., S, 3) -> neighbors (..., M, S), duplicate (...),
//                   and a workspace table (..., T, 4) (T a power of two > N, from Python)
//   jsc_invert:     nbr (..., M, S) -> inv (..., N, S), unique (...)
//
// neighbors[i, s] = the valid input j at out_coords[i] + deltas[s] in cloud out_batch[i],
// N where there is none, output i is not valid, or the query leaves [0, 2^21) on an axis
// (no wrap-around); with duplicates (two valid inputs of one cloud in one voxel:
// duplicate = true) the first copy, the smallest j. Valid inputs outside [0, 2^21) are
// never found and count for no duplicate.
//
// The search: a hash table of voxels (open addressing, linear probing, at most half full),
// an entry per occupied (cloud, voxel): [owner, cloud, key low, key high] with owner = the
// smallest input index of the voxel + 1 (0: empty) and key = x | y << 21 | z << 42. One
// thread per input inserts (atomicCAS claims an empty entry with its own index; a thread
// that meets its voxel's entry lowers the owner with atomicMin and flags the duplicate;
// while inserting, an entry's voxel is read from its owner's coordinates, since the owner
// writes the key after claiming it); then one thread per (output, slot) query probes from
// the hash of its voxel to that voxel's entry or an empty one (one 16-byte load an entry).
// Where an entry lands depends on the order of the atomics, what it holds does not, so the
// tables are deterministic. Cost O(N + M S) whatever the coordinates' extent.
//
// The inverse: inv[j, s] = the output m with nbr[m, s] = j (M where none), the last such m
// where several (atomicMax), unique = no (j, s) read twice (the second atomic to reach an
// entry sees it taken).
//
// Each op is a few launches on XLA's stream (no runtime query, no allocation: the table
// comes from XLA as a result buffer), each checked; batch entries go on gridDim.y, at most
// 65535 a launch.
#include <cstdint>
#include <string>

#include "cuda_common.h"

namespace jsc {
namespace search {

constexpr int kThreads = 256;
constexpr int kCoordBits = 21;  // coordinates in [0, 2^21) per axis
constexpr int64_t kCoordLimit = int64_t(1) << kCoordBits;
constexpr int kEntryWords = 4;  // owner, cloud, key low, key high
constexpr int64_t kClearBlocks = 4096;  // grid of the fill kernels (grid-stride loops)

__host__ __device__ inline bool in_range(int64_t x, int64_t y, int64_t z) {
  return uint64_t(x) < uint64_t(kCoordLimit) && uint64_t(y) < uint64_t(kCoordLimit) &&
         uint64_t(z) < uint64_t(kCoordLimit);
}

__host__ __device__ inline uint64_t voxel_key(int64_t x, int64_t y, int64_t z) {
  return uint64_t(x) | uint64_t(y) << kCoordBits | uint64_t(z) << (2 * kCoordBits);
}

// murmur3's 64-bit finalizer over the key and the cloud; the table takes the low bits.
__host__ __device__ inline uint64_t voxel_hash(uint64_t key, int32_t cloud) {
  uint64_t h = key ^ (uint64_t(uint32_t(cloud)) * 0x9e3779b97f4a7c15ull);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

// a[e] = value for e < count, flag[e] = flag_value for e < flags (grid-stride).
__global__ void __launch_bounds__(kThreads)
    fill_i32(int32_t* __restrict__ a, int64_t count, int32_t value, bool* __restrict__ flag,
             int64_t flags, bool flag_value) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < count || e < flags;
       e += stride) {
    if (e < count) a[e] = value;
    if (e < flags) flag[e] = flag_value;
  }
}

// Inserts input j of batch entry b0 + blockIdx.y (grid (ceil(N / kThreads), entries)).
__global__ void __launch_bounds__(kThreads)
    insert_inputs(const int32_t* __restrict__ coords, const int32_t* __restrict__ cloud,
                  const bool* __restrict__ valid, int32_t* __restrict__ table,
                  bool* __restrict__ duplicate, int64_t n, int64_t size, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  const int64_t at = b * n + j;
  const int32_t* c = coords + 3 * at;
  if (!valid[at] || !in_range(c[0], c[1], c[2])) return;
  const uint64_t key = voxel_key(c[0], c[1], c[2]);
  const int32_t bt = cloud[at];
  int32_t* tab = table + b * size * kEntryWords;
  const uint64_t wrap = uint64_t(size - 1);
  for (uint64_t h = voxel_hash(key, bt) & wrap;; h = (h + 1) & wrap) {
    int32_t* e = tab + h * kEntryWords;
    const int32_t owner = atomicCAS(e, 0, int32_t(j + 1));
    if (owner == 0) {  // claimed: this voxel's entry
      e[1] = bt;
      e[2] = int32_t(uint32_t(key));
      e[3] = int32_t(uint32_t(key >> 32));
      return;
    }
    // Whose entry? Its key may not be written yet: read an owner's coordinates (any owner
    // this entry has had is an input of its voxel).
    const int64_t o = b * n + (owner - 1);
    const int32_t* oc = coords + 3 * o;
    if (oc[0] == c[0] && oc[1] == c[1] && oc[2] == c[2] && cloud[o] == bt) {
      atomicMin(e, int32_t(j + 1));  // the first copy wins
      duplicate[b] = true;
      return;
    }
  }
}

// neighbors[b, i, k] for q = i * S + k of batch entry b0 + blockIdx.y (grid
// (ceil(M S / kThreads), entries)).
__global__ void __launch_bounds__(kThreads)
    query_outputs(const int32_t* __restrict__ table, const int32_t* __restrict__ coords,
                  const int32_t* __restrict__ cloud, const bool* __restrict__ valid,
                  const int32_t* __restrict__ deltas, int64_t deltas_stride,
                  int32_t* __restrict__ neighbors, int64_t n, int64_t m, int64_t s,
                  int64_t size, int64_t b0, bool vec) {
  const int64_t b = b0 + blockIdx.y;
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (q >= m * s) return;
  const int64_t i = q / s, k = q % s;
  const int64_t at = b * m + i;
  int32_t found = int32_t(n);
  if (valid[at]) {
    const int32_t* c = coords + 3 * at;
    const int32_t* d = deltas + b * deltas_stride + 3 * k;
    const int64_t x = int64_t(c[0]) + d[0], y = int64_t(c[1]) + d[1], z = int64_t(c[2]) + d[2];
    if (in_range(x, y, z)) {
      const uint64_t key = voxel_key(x, y, z);
      const int32_t bt = cloud[at];
      const uint32_t lo = uint32_t(key), hi = uint32_t(key >> 32);
      const int32_t* tab = table + b * size * kEntryWords;
      const uint64_t wrap = uint64_t(size - 1);
      for (uint64_t h = voxel_hash(key, bt) & wrap;; h = (h + 1) & wrap) {
        const int32_t* e = tab + h * kEntryWords;
        uint4 v;
        if (vec) {
          v = ld16(e);
        } else {
          v = uint4{uint32_t(e[0]), uint32_t(e[1]), uint32_t(e[2]), uint32_t(e[3])};
        }
        if (v.x == 0) break;  // empty: no input there
        if (v.z == lo && v.w == hi && int32_t(v.y) == bt) {
          found = int32_t(v.x) - 1;
          break;
        }
      }
    }
  }
  neighbors[at * s + k] = found;
}

// inv[b, j, k] = max m with nbr[b, m, k] = j (grid (ceil(M S / kThreads), entries)); a
// second writer clears unique[b].
__global__ void __launch_bounds__(kThreads)
    scatter_rows(const int32_t* __restrict__ nbr, int32_t* __restrict__ inv,
                 bool* __restrict__ unique, int64_t m, int64_t s, int64_t n, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (q >= m * s) return;
  const int32_t j = nbr[b * m * s + q];
  if (j < 0 || j >= n) return;
  const int64_t r = q / s, k = q % s;
  if (atomicMax(inv + (b * n + j) * s + k, int32_t(r)) != -1) unique[b] = false;
}

// inv[e] = m where no output reads it (-1) (grid-stride).
__global__ void __launch_bounds__(kThreads)
    finish_inverse(int32_t* __restrict__ inv, int64_t count, int32_t m) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < count; e += stride) {
    if (inv[e] < 0) inv[e] = m;
  }
}

inline dim3 fill_grid(int64_t count) {
  const int64_t blocks = ceil_div(count, kThreads);
  return dim3(unsigned(blocks < 1 ? 1 : blocks > kClearBlocks ? kClearBlocks : blocks));
}

// ---------------------------------------------------------------- handlers
ffi::Error Neighbors(JSC_STREAM_PARAM ffi::Buffer<ffi::S32> in_coords,
                     ffi::Buffer<ffi::S32> in_batch, ffi::Buffer<ffi::PRED> in_valid,
                     ffi::Buffer<ffi::S32> out_coords, ffi::Buffer<ffi::S32> out_batch,
                     ffi::Buffer<ffi::PRED> out_valid, ffi::Buffer<ffi::S32> deltas,
                     ffi::Result<ffi::Buffer<ffi::S32>> neighbors,
                     ffi::Result<ffi::Buffer<ffi::PRED>> duplicate,
                     ffi::Result<ffi::Buffer<ffi::S32>> table) {
  const Dims lead = leading(in_coords.dimensions(), 2);
  const int64_t n = dim(in_coords.dimensions(), -2);
  const int64_t m = dim(out_coords.dimensions(), -2);
  const int64_t s = dim(deltas.dimensions(), -2);
  const int64_t size = dim(table->dimensions(), -2);
  // deltas come unbatched, or with the leading axes (vmap's broadcast_all broadcasts it).
  const bool batched_deltas = deltas.dimensions().size() > 2;
  if (!has_shape(in_coords.dimensions(), lead, {n, 3}) ||
      !has_shape(in_batch.dimensions(), lead, {n}) ||
      !has_shape(in_valid.dimensions(), lead, {n}) ||
      !has_shape(out_coords.dimensions(), lead, {m, 3}) ||
      !has_shape(out_batch.dimensions(), lead, {m}) ||
      !has_shape(out_valid.dimensions(), lead, {m}) ||
      !has_shape(deltas.dimensions(), batched_deltas ? lead : Dims(), {s, 3}) ||
      !has_shape(neighbors->dimensions(), lead, {m, s}) ||
      !has_shape(duplicate->dimensions(), lead, {}) ||
      !has_shape(table->dimensions(), lead, {size, kEntryWords})) {
    return invalid("neighbors: inconsistent shapes: expects in_coords (..., N, 3), in_batch "
                   "(..., N), in_valid (..., N), out_coords (..., M, 3), out_batch (..., M), "
                   "out_valid (..., M), deltas (S, 3) or (..., S, 3), neighbors (..., M, S), "
                   "duplicate (...), table (..., T, 4)");
  }
  if (!fits_int32(n) || !fits_int32(m) || !fits_int32(s)) {
    return invalid("neighbors: too many inputs, outputs or slots (2^31 - 2 at most)");
  }
  if (size <= n || (size & (size - 1)) != 0) {
    return invalid("neighbors: the table's T = " + std::to_string(size) +
                   " must be a power of two greater than N = " + std::to_string(n));
  }
  const int64_t batch = product(lead);
  if (ceil_div(m * s, kThreads) > kMaxGridX) return invalid("neighbors: too many queries");
  int32_t* tab = table->typed_data();
  bool* dup = duplicate->typed_data();
  const int64_t words = batch * size * kEntryWords;
  JSC_LAUNCH(fill_i32, fill_grid(words > batch ? words : batch), dim3(kThreads), stream, tab,
             words, 0, dup, batch, false);
  if (ffi::Error e = launched("neighbors: clearing the table"); e.failure()) return e;
  const bool vec = aligned16(tab);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
    const unsigned entries = unsigned(batch - b0 < kMaxGridYZ ? batch - b0 : kMaxGridYZ);
    if (n > 0) {
      JSC_LAUNCH(insert_inputs, dim3(unsigned(ceil_div(n, kThreads)), entries), dim3(kThreads),
                 stream, in_coords.typed_data(), in_batch.typed_data(), in_valid.typed_data(),
                 tab, dup, n, size, b0);
      if (ffi::Error e = launched("neighbors: inserting the inputs"); e.failure()) return e;
    }
    if (m * s > 0) {
      JSC_LAUNCH(query_outputs, dim3(unsigned(ceil_div(m * s, kThreads)), entries),
                 dim3(kThreads), stream, tab, out_coords.typed_data(), out_batch.typed_data(),
                 out_valid.typed_data(), deltas.typed_data(), batched_deltas ? 3 * s : 0,
                 neighbors->typed_data(), n, m, s, size, b0, vec);
      if (ffi::Error e = launched("neighbors: the queries"); e.failure()) return e;
    }
  }
  return ffi::Error::Success();
}

ffi::Error Invert(JSC_STREAM_PARAM ffi::Buffer<ffi::S32> nbr,
                  ffi::Result<ffi::Buffer<ffi::S32>> inv,
                  ffi::Result<ffi::Buffer<ffi::PRED>> unique) {
  const Dims lead = leading(nbr.dimensions(), 2);
  const int64_t m = dim(nbr.dimensions(), -2), s = dim(nbr.dimensions(), -1);
  const int64_t n = dim(inv->dimensions(), -2);
  if (!has_shape(nbr.dimensions(), lead, {m, s}) || !has_shape(inv->dimensions(), lead, {n, s}) ||
      !has_shape(unique->dimensions(), lead, {})) {
    return invalid("invert: inconsistent shapes: expects nbr (..., M, S), inv (..., N, S), "
                   "unique (...)");
  }
  if (!fits_int32(m) || !fits_int32(n) || !fits_int32(s)) {
    return invalid("invert: too many rows");
  }
  if (ceil_div(m * s, kThreads) > kMaxGridX) return invalid("invert: too many entries");
  const int64_t batch = product(lead);
  const int64_t count = batch * n * s;
  int32_t* out = inv->typed_data();
  JSC_LAUNCH(fill_i32, fill_grid(count > batch ? count : batch), dim3(kThreads), stream, out,
             count, -1, unique->typed_data(), batch, true);
  if (ffi::Error e = launched("invert: clearing"); e.failure()) return e;
  if (m * s > 0 && n > 0) {
    for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
      const unsigned entries = unsigned(batch - b0 < kMaxGridYZ ? batch - b0 : kMaxGridYZ);
      JSC_LAUNCH(scatter_rows, dim3(unsigned(ceil_div(m * s, kThreads)), entries),
                 dim3(kThreads), stream, nbr.typed_data(), out, unique->typed_data(), m, s, n,
                 b0);
      if (ffi::Error e = launched("invert: scattering the rows"); e.failure()) return e;
    }
  }
  if (count > 0) {
    JSC_LAUNCH(finish_inverse, fill_grid(count), dim3(kThreads), stream, out, count, int32_t(m));
    return launched("invert: the sentinels");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- FFI handlers
namespace {

JSC_DEFINE_HANDLER(
    JscNeighbors, Neighbors,
    JSC_BIND()
        .Arg<ffi::Buffer<ffi::S32>>()     // in_coords: (..., N, 3) input voxels
        .Arg<ffi::Buffer<ffi::S32>>()     // in_batch: (..., N) cloud of each input
        .Arg<ffi::Buffer<ffi::PRED>>()    // in_valid: (..., N) false = padding
        .Arg<ffi::Buffer<ffi::S32>>()     // out_coords: (..., M, 3) query centres
        .Arg<ffi::Buffer<ffi::S32>>()     // out_batch: (..., M) cloud of each output
        .Arg<ffi::Buffer<ffi::PRED>>()    // out_valid: (..., M) false = padding
        .Arg<ffi::Buffer<ffi::S32>>()     // deltas: (S, 3) or (..., S, 3) offset of each slot
        .Ret<ffi::Buffer<ffi::S32>>()     // neighbors: (..., M, S) input index, N = none
        .Ret<ffi::Buffer<ffi::PRED>>()    // duplicate: (...) two inputs share a voxel
        .Ret<ffi::Buffer<ffi::S32>>());   // table: (..., T, 4) workspace, T = 2^k > N

JSC_DEFINE_HANDLER(
    JscInvert, Invert,
    JSC_BIND()
        .Arg<ffi::Buffer<ffi::S32>>()     // nbr: (..., M, S) kernel map
        .Ret<ffi::Buffer<ffi::S32>>()     // inv: (..., N, S) inverse map, M = none
        .Ret<ffi::Buffer<ffi::PRED>>());  // unique: (...) no (j, s) read twice

constexpr JscHandler kHandlers[] = {
    {"jsc_neighbors", JscNeighbors},
    {"jsc_invert", JscInvert},
};

}  // namespace
}  // namespace search
}  // namespace jsc

JSC_EXPORT_HANDLERS(search_cuda, jsc::search::kHandlers)
