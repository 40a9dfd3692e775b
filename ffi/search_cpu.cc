// Native CPU kernels of the neighbour search (the kernel map and what is built from it).
// Each handles any number of leading batch axes itself (the Python side calls them with
// vmap_method="broadcast_all").
//
// Ops (FFI targets, this file's table at the end; `...` = leading batch axes):
//   jsc_cpu_sort_keys:  top, hi, lo (..., N) uint32 -> top, hi, lo sorted by
//                       (top, hi, lo, position), perm (..., N) int32
//   jsc_cpu_invert:     nbr (..., M, S) -> inv (..., N, S), unique (...)
//   jsc_cpu_neighbors:  in_coords (..., N, 3), in_batch (..., N), in_valid (..., N),
//                       out_coords (..., M, 3), out_batch (..., M), out_valid (..., M),
//                       deltas (S, 3) -> neighbors (..., M, S), duplicate (...)
//   jsc_cpu_generate:   coords (..., N, 3), valid, batch (..., N) -> out (..., C, 3),
//                       out_batch (..., C), inverse (..., N, S), neighbors (..., C, S),
//                       unique, count, flags (...)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace jsc {
namespace {

// ---------------------------------------------------------------- inverse map
// inv[j, s] = the output m with nbr[m, s] = j (M where none), for each of the leading batch
// entries, and unique = no (j, s) is read by two outputs (then inv is an exact inverse).
// Threads own whole slots; a collision keeps the last row, and clears `unique`.
ffi::Error Invert(ffi::Buffer<ffi::S32> nbr, ffi::Result<ffi::Buffer<ffi::S32>> inv,
                  ffi::Result<ffi::Buffer<ffi::PRED>> unique) {
  const Dims lead = leading(nbr.dimensions(), 2);
  const int64_t m = dim(nbr.dimensions(), -2), s = dim(nbr.dimensions(), -1);
  const int64_t n = dim(inv->dimensions(), -2);
  if (!has_shape(nbr.dimensions(), lead, {m, s}) || !has_shape(inv->dimensions(), lead, {n, s}) ||
      !has_shape(unique->dimensions(), lead, {})) {
    return invalid("cpu_invert: inconsistent shapes: expects nbr (..., M, S), inv (..., N, S), "
                   "unique (...)");
  }
  if (!fits_int32(m)) return invalid("cpu_invert: too many rows");
  const int64_t batch = product(lead);
  const int32_t* src = nbr.typed_data();
  int32_t* dst = inv->typed_data();
  bool* uniq = unique->typed_data();
  advise_huge_pages(dst, batch * n * s * int64_t(sizeof(int32_t)));
  const int threads = num_threads(m * s / 8, s);
  std::vector<char> clash(size_t(batch) * threads, 0);
  // Sequential passes only: the table filled row-major, then the map walked row by row,
  // each thread scattering the slots of its contiguous range (each (j, slot) entry is
  // written by one thread, in row order: the result does not depend on the threads).
  parallel_rows(threads, batch * n * s, [&](int64_t begin, int64_t end) {
    std::fill(dst + begin, dst + end, int32_t(m));
  });
  const int64_t per = (s + threads - 1) / threads;
  parallel(threads, [&](int t) {
    const int64_t s0 = std::min<int64_t>(s, t * per), s1 = std::min<int64_t>(s, (t + 1) * per);
    for (int64_t b = 0; b < batch; ++b) {
      const int32_t* nb = src + b * m * s;
      int32_t* out = dst + b * n * s;
      bool any = false;
      for (int64_t r = 0; r < m; ++r) {
        const int32_t* row = nb + r * s;
        for (int64_t sl = s0; sl < s1; ++sl) {
          const int32_t j = row[sl];
          if (j < 0 || j >= n) continue;
          int32_t& e = out[int64_t(j) * s + sl];
          any |= e != m;
          e = int32_t(r);
        }
      }
      if (any) clash[size_t(b) * threads + t] = 1;
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
// Sorts the three-word keys (top, hi, lo) of each leading batch entry with their
// positions: (top, hi, lo, perm) in ascending (top, hi, lo, position) order, so equal keys
// keep their order. `top` is the cloud index of packed batches (zeros for two-word keys).
// LSD radix sort, 16 bits a pass, stable: the four digits of the 64-bit (hi << 32 | lo),
// then the two of `top`; passes whose digit is the same for every key are skipped (so a
// constant `top` costs nothing).
//
// The common case is faster: when the bits that vary between keys and the bits of a
// position fit in 64 together (one cloud's Morton keys span ~33 bits at extents of ~2000,
// a packed batch adds its few cloud bits, 10^6 positions take 20), they are packed into
// one 64-bit word, (varying bits << position bits | position), and only that word is
// sorted, in ceil(bits / 16) passes of equal digits (fewer buckets, better locality),
// then unpacked. Scattering one 8-byte word a pass instead of three arrays (16 bytes) is
// what costs. The order is the same (stable, ties by position).

// The bits of `v` from its lowest set bit to its highest: [lo, lo + width).
inline void bit_span(uint64_t v, int& lo, int& width) {
  if (v == 0) {
    lo = width = 0;
    return;
  }
  lo = __builtin_ctzll(v);
  width = 64 - __builtin_clzll(v) - lo;
}

inline uint64_t low_bits(int width) { return width >= 64 ? ~uint64_t(0) : (uint64_t(1) << width) - 1; }

// Sorts a[0, n) by bits [low, low + width) (stable); `tmp` is scratch.
void sort_packed(std::vector<uint64_t>& a, std::vector<uint64_t>& tmp, int low, int width) {
  const int64_t n = int64_t(a.size());
  const int passes = (width + 15) / 16;
  if (passes == 0) return;
  const int bits = (width + passes - 1) / passes;
  std::vector<int64_t> count(size_t(1) << bits);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = low + pass * bits;
    const uint64_t mask = low_bits(bits);
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & mask];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t v = c;
      c = sum;
      sum += v;
    }
    for (int64_t i = 0; i < n; ++i) tmp[count[(a[i] >> shift) & mask]++] = a[i];
    a.swap(tmp);
  }
}

// How (top, key, position) triples pack into one word: (top bits << kw | key bits) <<
// pos_bits | position, from the words' common bits (and of all keys) and varying spans
// (xor of or and and), so that the words sort like the triples (sort_packed from bit
// pos_bits) and unpack exactly.
struct Packing {
  int klo, kw, tlo, tw, pos_bits = 0;
  uint64_t k_and;
  uint32_t t_and;
  Packing(uint64_t k_or, uint64_t k_and_, uint32_t t_or, uint32_t t_and_, int64_t positions)
      : k_and(k_and_), t_and(t_and_) {
    bit_span(k_or ^ k_and, klo, kw);
    bit_span(uint64_t(t_or ^ t_and), tlo, tw);
    while ((int64_t(1) << pos_bits) < positions) ++pos_bits;
  }
  bool fits() const { return kw + tw + pos_bits <= 64; }
  int width() const { return kw + tw; }
  uint64_t pack(uint32_t top, uint64_t key, int64_t position) const {
    const uint64_t part = ((uint64_t(top >> tlo) & low_bits(tw)) << kw) | ((key >> klo) & low_bits(kw));
    return (part << pos_bits) | uint64_t(position);
  }
  int64_t position(uint64_t w) const { return int64_t(w & low_bits(pos_bits)); }
  uint64_t part(uint64_t w) const { return w >> pos_bits; }
  uint64_t key(uint64_t w) const {
    return (k_and & ~(low_bits(kw) << klo)) | ((part(w) & low_bits(kw)) << klo);
  }
  uint32_t top(uint64_t w) const {
    return (t_and & ~uint32_t(low_bits(tw) << tlo)) | uint32_t((part(w) >> kw) << tlo);
  }
};

// The packed sort of one batch entry, when it applies (else false, nothing written). The
// rows holding the largest possible key, (max top, all-ones hi and lo), are the padding
// sentinels of `lattice.keys` (and any real key equal to them): they sort last, in
// position order, and are left out of the span, which the sentinels would otherwise
// widen to the whole key. `a`, `tmp`: scratch of n words.
bool sort_narrow(const uint32_t* t, const uint32_t* h, const uint32_t* l, int64_t n,
                 uint32_t* to, uint32_t* ho, uint32_t* lw, int32_t* pm,
                 std::vector<uint64_t>& a, std::vector<uint64_t>& tmp) {
  uint32_t top_max = 0;
  for (int64_t i = 0; i < n; ++i) top_max = std::max(top_max, t[i]);
  auto is_max = [&](int64_t i) { return t[i] == top_max && h[i] == ~0u && l[i] == ~0u; };
  uint64_t k_or = 0, k_and = ~uint64_t(0);
  uint32_t t_or = 0, t_and = ~0u;
  int64_t rest = 0;  // rows that are not the maximum key
  for (int64_t i = 0; i < n; ++i) {
    if (is_max(i)) continue;
    const uint64_t k = (uint64_t(h[i]) << 32) | l[i];
    k_or |= k, k_and &= k, t_or |= t[i], t_and &= t[i];
    ++rest;
  }
  const Packing pk(k_or, k_and, t_or, t_and, n);
  if (!pk.fits()) return false;
  a.resize(size_t(rest));
  tmp.resize(size_t(rest));
  for (int64_t i = 0, r = 0; i < n; ++i) {
    if (!is_max(i)) a[size_t(r++)] = pk.pack(t[i], (uint64_t(h[i]) << 32) | l[i], i);
  }
  sort_packed(a, tmp, pk.pos_bits, pk.width());
  for (int64_t r = 0; r < rest; ++r) {
    const uint64_t w = a[size_t(r)], k = pk.key(w);
    to[r] = pk.top(w), ho[r] = uint32_t(k >> 32), lw[r] = uint32_t(k);
    pm[r] = int32_t(pk.position(w));
  }
  for (int64_t i = 0, r = rest; i < n; ++i) {
    if (!is_max(i)) continue;
    to[r] = top_max, ho[r] = ~0u, lw[r] = ~0u, pm[r++] = int32_t(i);
  }
  a.resize(size_t(n));
  tmp.resize(size_t(n));
  return true;
}

// Scratch of sort_one, reused across batch entries.
struct SortScratch {
  std::vector<uint64_t> key, key2;
  std::vector<uint32_t> tw, tw2;
  std::vector<int32_t> idx, idx2;
  std::vector<int64_t> count;
};

// One batch entry of SortKeys: n keys (t, h, l) -> (to, ho, lw, pm).
void sort_one(const uint32_t* t, const uint32_t* h, const uint32_t* l, int64_t n, uint32_t* to,
              uint32_t* ho, uint32_t* lw, int32_t* pm, SortScratch& sc) {
  std::vector<uint64_t>& key = sc.key;
  std::vector<uint64_t>& key2 = sc.key2;
  for (auto* v : {&key, &key2}) v->resize(size_t(n));
  if (sort_narrow(t, h, l, n, to, ho, lw, pm, key, key2)) return;  // the packed sort
  std::vector<uint32_t>& tw = sc.tw;
  std::vector<uint32_t>& tw2 = sc.tw2;
  std::vector<int32_t>& idx = sc.idx;
  std::vector<int32_t>& idx2 = sc.idx2;
  std::vector<int64_t>& count = sc.count;
  for (auto* v : {&tw, &tw2}) v->resize(size_t(n));
  for (auto* v : {&idx, &idx2}) v->resize(size_t(n));
  count.resize(size_t(1) << 16);
  uint64_t all_or = 0, all_and = ~uint64_t(0);
  uint32_t top_or = 0, top_and = ~uint32_t(0);
  for (int64_t i = 0; i < n; ++i) {
    key[i] = (uint64_t(h[i]) << 32) | l[i];
    tw[i] = t[i];
    idx[i] = int32_t(i);
    all_or |= key[i];
    all_and &= key[i];
    top_or |= t[i];
    top_and &= t[i];
  }
  // Passes 0-3 on the 64-bit word, 4-5 on `top`.
  for (int pass = 0; pass < 6; ++pass) {
    const bool on_top = pass >= 4;
    const int shift = 16 * (on_top ? pass - 4 : pass);
    const uint64_t varies = on_top ? uint64_t(top_or ^ top_and) : (all_or ^ all_and);
    if (((varies >> shift) & 0xffff) == 0) continue;  // one digit value: no-op
    auto digit = [&](int64_t i) {
      return on_top ? (tw[i] >> shift) & 0xffff : (key[i] >> shift) & 0xffff;
    };
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[digit(i)];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t v = c;
      c = sum;
      sum += v;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = count[digit(i)]++;
      key2[at] = key[i];
      tw2[at] = tw[i];
      idx2[at] = idx[i];
    }
    key.swap(key2);
    tw.swap(tw2);
    idx.swap(idx2);
  }
  for (int64_t i = 0; i < n; ++i) {
    to[i] = tw[i];
    ho[i] = uint32_t(key[i] >> 32);
    lw[i] = uint32_t(key[i]);
    pm[i] = idx[i];
  }
}

ffi::Error SortKeys(ffi::Buffer<ffi::U32> top, ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                    ffi::Result<ffi::Buffer<ffi::U32>> top_out,
                    ffi::Result<ffi::Buffer<ffi::U32>> hi_out,
                    ffi::Result<ffi::Buffer<ffi::U32>> lo_out,
                    ffi::Result<ffi::Buffer<ffi::S32>> perm) {
  const Dims lead = leading(hi.dimensions(), 1);
  const int64_t n = dim(hi.dimensions(), -1);
  if (!has_shape(top.dimensions(), lead, {n}) || !has_shape(hi.dimensions(), lead, {n}) ||
      !has_shape(lo.dimensions(), lead, {n}) || !has_shape(top_out->dimensions(), lead, {n}) ||
      !has_shape(hi_out->dimensions(), lead, {n}) || !has_shape(lo_out->dimensions(), lead, {n}) ||
      !has_shape(perm->dimensions(), lead, {n})) {
    return invalid("cpu_sort_keys: inconsistent shapes: expects top, hi, lo, and the four "
                   "results all (..., N)");
  }
  if (!fits_int32(n)) return invalid("cpu_sort_keys: too many keys");
  const int64_t batch = product(lead);
  SortScratch scratch;
  for (int64_t b = 0; b < batch; ++b) {
    sort_one(top.typed_data() + b * n, hi.typed_data() + b * n, lo.typed_data() + b * n, n,
             top_out->typed_data() + b * n, hi_out->typed_data() + b * n,
             lo_out->typed_data() + b * n, perm->typed_data() + b * n, scratch);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- generated output sets
// The output set of a generating conv from its candidates (generate.py's jnp path, in one
// pass): flat (..., K, 3) candidate coordinates, ok (..., K) which are real, batch (..., K)
// their clouds -> out (..., cap, 3) the distinct candidates in key order (the Morton key
// of the coordinates shifted so that each axis' smallest real one is 0, the cloud leading;
// padding rows 0), out_batch (..., cap), owner (..., K) the output of each candidate (cap
// where none or beyond the capacity), count (...) the outputs kept (at most cap) and
// flags (...): OUT_OF_RANGE (a shifted coordinate reaches 2^20) | CAPACITY_OVERFLOW.
// Only the real candidates are sorted (sort_one: ties in position order).
constexpr int32_t kMaxCoord = 1 << 20;  // morton.MAX_COORD
constexpr int32_t kOutOfRange = 4, kCapacityOverflow = 64;  // errors.ErrorCode

inline uint32_t compact3(uint32_t v) {  // spread3's inverse
  v &= 0x09249249;
  v = (v ^ (v >> 2)) & 0x030C30C3;
  v = (v ^ (v >> 4)) & 0x0300F00F;
  v = (v ^ (v >> 8)) & 0x030000FF;
  v = (v ^ (v >> 16)) & 0x000003FF;
  return v;
}

inline uint32_t spread3(uint32_t v) {  // the low 10 bits of v, two zero bits between
  v &= 0x3ff;
  v = (v | (v << 16)) & 0x030000FF;
  v = (v | (v << 8)) & 0x0300F00F;
  v = (v | (v << 4)) & 0x030C30C3;
  v = (v | (v << 2)) & 0x09249249;
  return v;
}

// Scratch of merge_candidates, reused across batch entries.
struct MergeScratch {
  SortScratch sort;
  std::vector<uint64_t> a, tmp;
  std::vector<int32_t> cc, cl, ids;  // the real candidates: coordinates (r, 3), clouds, ids
};

// The merge of one batch entry's r real candidates (sc.cc, sc.cl, sc.ids, in id order):
// o (cap, 3) / ob (cap) the distinct ones in key order (padding rows 0), and visit(q, out)
// for every candidate q in key order (stable: ids ascending within an output), out its
// output (cap when beyond the capacity); returns the count of outputs (uncapped) and sets
// `span`.
template <typename Visit>
int64_t merge_candidates(MergeScratch& sc, int64_t cap, int32_t* o, int32_t* ob,
                         const Visit& visit, int64_t& span) {
  const int64_t r = int64_t(sc.cl.size());
  const int32_t* cc = sc.cc.data();
  const int32_t* cl = sc.cl.data();
  int32_t base[3] = {kMaxCoord, kMaxCoord, kMaxCoord};
  for (int64_t q = 0; q < r; ++q) {
    for (int ax = 0; ax < 3; ++ax) base[ax] = std::min(base[ax], cc[3 * q + ax]);
  }
  for (int ax = 0; ax < 3; ++ax) base[ax] = base[ax] == kMaxCoord ? 0 : base[ax];
  std::vector<uint64_t>& a = sc.a;
  a.resize(size_t(r));
  span = 0;
  uint64_t k_or = 0, k_and = ~uint64_t(0);
  uint32_t t_or = 0, t_and = ~0u;
  for (int64_t q = 0; q < r; ++q) {
    uint32_t hi_word = 0, lo_word = 0;
    for (int ax = 0; ax < 3; ++ax) {
      const int64_t g = int64_t(cc[3 * q + ax]) - base[ax];
      span = std::max(span, g);
      const uint32_t u = uint32_t(std::clamp<int64_t>(g, 0, kMaxCoord - 1));
      hi_word |= spread3(u >> 10) << ax;
      lo_word |= spread3(u) << ax;
    }
    const uint64_t key = (uint64_t(hi_word) << 32) | lo_word;
    a[size_t(q)] = key;
    k_or |= key, k_and &= key, t_or |= uint32_t(cl[q]), t_and &= uint32_t(cl[q]);
  }
  std::fill(o, o + cap * 3, 0);
  std::fill(ob, ob + cap, 0);
  const Packing pk(k_or, k_and, t_or, t_and, r);
  int64_t outputs = 0;
  // Output `outputs` (if kept) is candidate q, with cloud `cloud`; candidate q is in it.
  auto emit = [&](bool fresh, int64_t q, uint32_t cloud, const uint32_t* coord) {
    if (fresh) {
      if (outputs < cap) {
        for (int ax = 0; ax < 3; ++ax) o[3 * outputs + ax] = int32_t(coord[ax]);
        ob[outputs] = int32_t(cloud);
      }
      ++outputs;
    }
    visit(q, outputs - 1 < cap ? int32_t(outputs - 1) : int32_t(cap));
  };
  if (pk.fits() && span < kMaxCoord) {
    // One word a candidate: (cloud bits << kw | key bits) << pos_bits | q, sorted; the
    // outputs' coordinates decoded from their keys (exact: no coordinate was clipped).
    for (int64_t q = 0; q < r; ++q) a[size_t(q)] = pk.pack(uint32_t(cl[q]), a[size_t(q)], q);
    sc.tmp.resize(size_t(r));
    sort_packed(a, sc.tmp, pk.pos_bits, pk.width());
    for (int64_t q = 0; q < r; ++q) {
      const uint64_t w = a[size_t(q)];
      const bool fresh = q == 0 || pk.part(w) != pk.part(a[size_t(q - 1)]);
      uint32_t coord[3] = {0, 0, 0};
      if (fresh) {
        const uint64_t key = pk.key(w);
        const uint32_t hi_word = uint32_t(key >> 32), lo_word = uint32_t(key);
        for (int ax = 0; ax < 3; ++ax) {
          coord[ax] = uint32_t(int64_t((compact3(hi_word >> ax) << 10) | compact3(lo_word >> ax)) +
                               base[ax]);
        }
      }
      emit(fresh, pk.position(w), fresh ? pk.top(w) : 0, coord);
    }
  } else {  // the general sort of the three words
    const size_t rn = size_t(r);
    std::vector<uint32_t> t(rn), h(rn), l(rn), to(rn), ho(rn), lw(rn);
    std::vector<int32_t> pm(rn);
    for (int64_t q = 0; q < r; ++q) {
      t[size_t(q)] = uint32_t(cl[q]);
      h[size_t(q)] = uint32_t(a[size_t(q)] >> 32), l[size_t(q)] = uint32_t(a[size_t(q)]);
    }
    sort_one(t.data(), h.data(), l.data(), r, to.data(), ho.data(), lw.data(), pm.data(), sc.sort);
    for (int64_t j = 0; j < r; ++j) {
      const bool fresh = j == 0 || to[size_t(j)] != to[size_t(j - 1)] ||
                         ho[size_t(j)] != ho[size_t(j - 1)] || lw[size_t(j)] != lw[size_t(j - 1)];
      const int64_t q = pm[size_t(j)];
      const uint32_t coord[3] = {uint32_t(cc[3 * q]), uint32_t(cc[3 * q + 1]),
                                 uint32_t(cc[3 * q + 2])};
      emit(fresh, q, uint32_t(cl[q]), coord);
    }
  }
  return outputs;
}

inline int32_t merge_flags(int64_t span, int64_t outputs, int64_t cap) {
  return (span >= kMaxCoord ? kOutOfRange : 0) | (outputs > cap ? kCapacityOverflow : 0);
}

// The output set a conv generates, from its inputs (generate.py's jnp path: candidates,
// merge and the per-slot table, in one pass): coords (..., N, 3), valid (..., N), batch
// (..., N) -> out (..., cap, 3), out_batch (..., cap), inverse (..., N, S) (the output input
// i reaches through slot s, cap where none), neighbors (..., cap, S) (its inverse: the
// input output o reads through slot s, N where none; of two, the later input, as
// cpu_invert), unique (...) (no two inputs reach one output through one slot), count
// (...), flags (...) (OUT_OF_RANGE, CAPACITY_OVERFLOW).
// Attributes (per axis, 3 each): kernel K, stride s, padding p, dilation d, shape (the
// output grid [0, shape), or -1s for no clip), and rule: 0 = "conv" (input x reaches
// o = (x + p - k d) / s through offset k where that divides), 1 = "transpose" (o = x s +
// k d - p), 2 = "floor" (o = floor(x / s), S = 1). Slots in kernel order, axis 0 fastest.
inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// One axis of a generating conv: the (offset, output) pairs of a coordinate, one integer
// division a call ("conv": the offsets of each residue r = (x + p) mod s, tabulated with
// t = (k d - r) / s, so that o = floor((x + p) / s) - t).
struct AxisRule {
  int64_t rule, k, s, p, d;
  std::vector<std::vector<std::pair<int32_t, int64_t>>> by_residue;  // (offset, t)
  AxisRule(int64_t rule_, int64_t k_, int64_t s_, int64_t p_, int64_t d_)
      : rule(rule_), k(k_), s(s_), p(p_), d(d_) {
    if (rule != 0) return;
    by_residue.resize(size_t(s));
    for (int64_t r = 0; r < s; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t num = r - j * d;  // (x + p - j d) with x + p = r (mod s)
        if (num - floor_div(num, s) * s == 0) by_residue[size_t(r)].push_back({int32_t(j), -num / s});
      }
    }
  }
  // Writes the (offset, output) pairs of coordinate x to `out`; returns their number.
  int operator()(int64_t x, int32_t* off, int64_t* o) const {
    if (rule == 2) {
      off[0] = 0, o[0] = floor_div(x, s);
      return 1;
    }
    if (rule == 1) {
      for (int64_t j = 0; j < k; ++j) off[j] = int32_t(j), o[j] = x * s + j * d - p;
      return int(k);
    }
    const int64_t q = floor_div(x + p, s);
    const auto& row = by_residue[size_t(x + p - q * s)];
    for (size_t i = 0; i < row.size(); ++i) off[i] = row[i].first, o[i] = q - row[i].second;
    return int(row.size());
  }
};

ffi::Error Generate(ffi::Buffer<ffi::S32> coords, ffi::Buffer<ffi::PRED> valid,
                    ffi::Buffer<ffi::S32> batch, ffi::Result<ffi::Buffer<ffi::S32>> out,
                    ffi::Result<ffi::Buffer<ffi::S32>> out_batch,
                    ffi::Result<ffi::Buffer<ffi::S32>> inverse,
                    ffi::Result<ffi::Buffer<ffi::S32>> neighbors,
                    ffi::Result<ffi::Buffer<ffi::PRED>> unique,
                    ffi::Result<ffi::Buffer<ffi::S32>> count,
                    ffi::Result<ffi::Buffer<ffi::S32>> flags, int64_t rule,
                    ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> stride,
                    ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation,
                    ffi::Span<const int64_t> shape) {
  const Dims lead = leading(coords.dimensions(), 2);
  const int64_t n = dim(coords.dimensions(), -2), cap = dim(out->dimensions(), -2);
  const int64_t s = dim(inverse->dimensions(), -1);
  if (!has_shape(coords.dimensions(), lead, {n, 3}) || !has_shape(valid.dimensions(), lead, {n}) ||
      !has_shape(batch.dimensions(), lead, {n}) || !has_shape(out->dimensions(), lead, {cap, 3}) ||
      !has_shape(out_batch->dimensions(), lead, {cap}) ||
      !has_shape(inverse->dimensions(), lead, {n, s}) ||
      !has_shape(neighbors->dimensions(), lead, {cap, s}) ||
      !has_shape(unique->dimensions(), lead, {}) || !has_shape(count->dimensions(), lead, {}) ||
      !has_shape(flags->dimensions(), lead, {})) {
    return invalid("cpu_generate: inconsistent shapes: expects coords (..., N, 3), valid "
                   "(..., N), batch (..., N), out (..., C, 3), out_batch (..., C), inverse "
                   "(..., N, S), neighbors (..., C, S), unique (...), count (...), flags (...)");
  }
  for (const auto* a : {&kernel, &stride, &padding, &dilation, &shape}) {
    if (a->size() != 3) return invalid("cpu_generate: expects 3 values per axis attribute");
  }
  for (int ax = 0; ax < 3; ++ax) {
    if (kernel[ax] < 1 || kernel[ax] > 64 || stride[ax] < 1 || stride[ax] > 1024 || dilation[ax] < 1)
      return invalid("cpu_generate: kernel sizes must be in [1, 64], strides in [1, 1024], "
                     "dilations positive");
  }
  if (rule < 0 || rule > 2 || s != (rule == 2 ? 1 : kernel[0] * kernel[1] * kernel[2])) {
    return invalid("cpu_generate: expects rule 0-2 and S = the kernel's slots (1 for floor)");
  }
  if (!fits_int32(n * s) || !fits_int32(cap * s)) return invalid("cpu_generate: too many rows");
  const bool clip = shape[0] >= 0;
  const AxisRule axes[3] = {{rule, kernel[0], stride[0], padding[0], dilation[0]},
                            {rule, kernel[1], stride[1], padding[1], dilation[1]},
                            {rule, kernel[2], stride[2], padding[2], dilation[2]}};
  // Slot of offsets (k0, k1, k2): k0 + K0 (k1 + K1 k2); 0 for floor.
  const int64_t stride1 = rule == 2 ? 0 : kernel[0], stride2 = rule == 2 ? 0 : kernel[0] * kernel[1];
  MergeScratch sc;
  int32_t off[3][64];
  int64_t o[3][64];
  for (int64_t b = 0; b < product(lead); ++b) {
    const int32_t* c = coords.typed_data() + b * n * 3;
    const bool* v = valid.typed_data() + b * n;
    const int32_t* cb = batch.typed_data() + b * n;
    int32_t* inv = inverse->typed_data() + b * n * s;
    int32_t* nbr = neighbors->typed_data() + b * cap * s;
    sc.cc.clear(), sc.cl.clear(), sc.ids.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (!v[i]) continue;
      int cnt[3];
      for (int ax = 0; ax < 3; ++ax) {
        const int raw = axes[ax](c[3 * i + ax], off[ax], o[ax]);
        cnt[ax] = 0;  // kept: inside the grid
        for (int j = 0; j < raw; ++j) {
          if (clip && (o[ax][j] < 0 || o[ax][j] >= shape[ax])) continue;
          off[ax][cnt[ax]] = off[ax][j], o[ax][cnt[ax]] = o[ax][j], ++cnt[ax];
        }
      }
      for (int j2 = 0; j2 < cnt[2]; ++j2) {
        for (int j1 = 0; j1 < cnt[1]; ++j1) {
          for (int j0 = 0; j0 < cnt[0]; ++j0) {
            sc.cc.push_back(int32_t(o[0][j0]));
            sc.cc.push_back(int32_t(o[1][j1]));
            sc.cc.push_back(int32_t(o[2][j2]));
            sc.cl.push_back(cb[i]);
            sc.ids.push_back(int32_t(i * s + off[0][j0] + stride1 * off[1][j1] + stride2 * off[2][j2]));
          }
        }
      }
    }
    advise_huge_pages(inv, n * s * int64_t(sizeof(int32_t)));
    advise_huge_pages(nbr, cap * s * int64_t(sizeof(int32_t)));
    std::fill(inv, inv + n * s, int32_t(cap));
    std::fill(nbr, nbr + cap * s, int32_t(n));
    int64_t span = 0;
    bool clash = false;
    const int32_t* ids = sc.ids.data();
    // In key order the outputs come in turn (the table's rows written in order) and, within
    // one, the inputs ascending: the later input wins a shared slot, as in cpu_invert.
    auto visit = [&](int64_t q, int32_t to) {
      inv[ids[q]] = to;
      if (to == cap) return;
      const int32_t i = ids[q] / int32_t(s), slot = ids[q] - i * int32_t(s);
      int32_t& e = nbr[int64_t(to) * s + slot];
      clash |= e != int32_t(n);
      e = i;
    };
    const int64_t outputs = merge_candidates(sc, cap, out->typed_data() + b * cap * 3,
                                             out_batch->typed_data() + b * cap, visit, span);
    unique->typed_data()[b] = !clash;
    count->typed_data()[b] = int32_t(std::min(outputs, cap));
    flags->typed_data()[b] = merge_flags(span, outputs, cap);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- neighbour search
// neighbors[i, s] = the valid input j at out_coords[i] + deltas[s] in cloud out_batch[i]
// (in_batch[j] == out_batch[i]), N where there is none or output i is not valid, or
// where out_coords[i] + deltas[s] leaves [0, 2^21) on an axis (no wrap-around).
//
// The inputs go into a hash table of occupied 4 x 4 x 4 blocks keyed by (cloud, block
// coordinates): per block a 64-bit occupancy mask and where its voxels' input indices
// start in one dense array (`order`, in the order of the bits). A voxel is found by one
// table lookup (for its block), a bit test and a popcount, so the cost is O(N + M S)
// whatever the coordinates' extent (anything in [0, 2^21) per axis), memory O(N).
// The table is built on one thread, in input order, which also finds duplicates (the
// first copy of a voxel is the one found); the queries run on threads over output rows,
// each row written by one thread: results do not depend on the thread count.
//
// One output's slots touch few blocks (a 3x3x3 kernel: 1 to 8, 3.4 on average), and
// where each slot lands (which block around the output's own, which bit) depends only
// on the output's position within its block (64 cases): that is tabulated once a call
// (SlotPlan). Per output its blocks are looked up once each, then every slot is a bit
// test and a popcount, without branches. Lookups go a chunk of outputs at a time, with
// prefetches, so their cache misses overlap; on sparse clouds most blocks looked up are
// empty, and a small Bloom filter (16 bits a block) answers those without the table.
// Valid inputs whose coordinates leave [0, 2^21) (the contract excludes them) are never
// found and count for no duplicate.
constexpr int kCoordBits = 21;  // coordinates in [0, 2^21) per axis
constexpr int64_t kCoordLimit = int64_t(1) << kCoordBits;
constexpr int kBlockAxisBits = kCoordBits - 2;  // block coordinates: 19 bits per axis
constexpr uint64_t kNoKey = ~uint64_t(0);       // no block's key (keys have 57 bits)
constexpr int64_t kPrefetchAhead = 8;  // inputs ahead whose table slot the build prefetches
constexpr int64_t kChunk = 16;         // outputs whose lookups go together
// Tabulated plans only up to these sizes (else a lookup a slot): blocks around an output
// (deltas spread over ~40 voxels an axis) and slots.
constexpr int64_t kMaxBox = 4096;
constexpr int64_t kMaxPlanSlots = 16384;

// One occupied block of one cloud: a slot of the hash table (empty: mask 0).
struct Block {
  uint64_t key;   // block coordinates bx | by << 19 | bz << 38
  uint64_t mask;  // bit (x & 3) | (y & 3) << 2 | (z & 3) << 4 set: that voxel is an input
  int32_t batch;  // the cloud
  int32_t base;   // its voxels' input indices: order[base + rank of the voxel's bit in mask]
};

inline uint64_t block_key(int64_t bx, int64_t by, int64_t bz) {
  return uint64_t(bx) | uint64_t(by) << kBlockAxisBits | uint64_t(bz) << (2 * kBlockAxisBits);
}

inline int voxel_bit(int64_t x, int64_t y, int64_t z) {
  return int((x & 3) | (y & 3) << 2 | (z & 3) << 4);
}

// Rank of `bit` among the set bits of mask.
inline __attribute__((always_inline)) int64_t rank(uint64_t mask, int bit) {
  return __builtin_popcountll(mask & ((uint64_t(1) << bit) - 1));
}

// murmur3's 64-bit finalizer over the key and the cloud. The table index takes the low
// bits, the filter the high ones.
inline uint64_t block_hash(uint64_t key, int32_t batch) {
  uint64_t h = key ^ (uint64_t(uint32_t(batch)) * 0x9e3779b97f4a7c15ull);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

// The filter's two bits of a hash, in one 64-bit word.
inline uint64_t filter_bits(uint64_t h) {
  return (uint64_t(1) << (h >> 58)) | (uint64_t(1) << ((h >> 52) & 63));
}

// Open addressing, linear probing, capacity a power of two at least twice the blocks;
// once every block is in, a Bloom filter of them for the lookups (seal(), then
// add_to_filter() for each block).
class BlockTable {
 public:
  explicit BlockTable(int64_t expected_blocks) {
    int64_t cap = 16;
    while (cap < 2 * expected_blocks) cap *= 2;
    slots_.assign(size_t(cap), Block{0, 0, 0, 0});
  }

  // The block of (key, batch) (hash: block_hash), inserted (mask 0, base -1) when absent.
  Block& find_or_insert(uint64_t key, int32_t batch, uint64_t hash) {
    if (2 * (size_ + 1) > int64_t(slots_.size())) grow();
    Block& b = slots_[probe(key, batch, hash)];
    if (b.mask == 0) {
      b = Block{key, 0, batch, -1};
      ++size_;
    }
    return b;
  }

  // The block of (key, batch), nullptr when absent.
  Block* find(uint64_t key, int32_t batch, uint64_t hash) {
    Block* b = &slots_[probe(key, batch, hash)];
    return b->mask != 0 ? b : nullptr;
  }
  const Block* find(uint64_t key, int32_t batch, uint64_t hash) const {
    return const_cast<BlockTable*>(this)->find(key, batch, hash);
  }

  // With the filter complete: false when no block has this hash.
  bool may_hold(uint64_t hash) const {
    const uint64_t want = filter_bits(hash);
    return (filter_[(hash >> 32) & filter_wrap_] & want) == want;
  }

  // With the filter complete: find() behind the filter.
  const Block* find_sealed(uint64_t key, int32_t batch) const {
    const uint64_t h = block_hash(key, batch);
    return may_hold(h) ? find(key, batch, h) : nullptr;
  }

  void prefetch(uint64_t hash) const { __builtin_prefetch(&slots_[hash & (slots_.size() - 1)]); }
  void prefetch_filter(uint64_t hash) const {
    __builtin_prefetch(&filter_[(hash >> 32) & filter_wrap_]);
  }

  // Ends the inserts: an empty filter sized for the blocks, for add_to_filter().
  void seal() {
    int64_t words = 1;
    while (words < size_ / 4) words *= 2;  // 16 bits a block
    filter_.assign(size_t(words), 0);
    filter_wrap_ = uint64_t(words - 1);
  }
  void add_to_filter(uint64_t hash) { filter_[(hash >> 32) & filter_wrap_] |= filter_bits(hash); }

 private:
  // The slot holding (key, batch), or the empty slot where it would go.
  size_t probe(uint64_t key, int32_t batch, uint64_t hash) const {
    const size_t wrap = slots_.size() - 1;
    for (size_t i = hash & wrap;; i = (i + 1) & wrap) {
      const Block& b = slots_[i];
      if (b.mask == 0 || (b.key == key && b.batch == batch)) return i;
    }
  }

  void grow() {
    std::vector<Block> old(slots_.size() * 2, Block{0, 0, 0, 0});
    old.swap(slots_);
    for (const Block& b : old) {
      if (b.mask != 0) slots_[probe(b.key, b.batch, block_hash(b.key, b.batch))] = b;
    }
  }

  std::vector<Block> slots_;
  int64_t size_ = 0;
  std::vector<uint64_t> filter_;
  uint64_t filter_wrap_ = 0;
};

// About how many distinct values among the hashes (linear counting, 8 bits a hash):
// sizes the table once, so that it rarely has to grow.
int64_t estimate_distinct(const std::vector<uint64_t>& hashes) {
  int64_t bits = 64;
  while (bits < 8 * int64_t(hashes.size())) bits *= 2;
  std::vector<uint64_t> seen(size_t(bits / 64), 0);
  for (uint64_t h : hashes) {
    const uint64_t b = (h >> 20) & uint64_t(bits - 1);
    seen[b >> 6] |= uint64_t(1) << (b & 63);
  }
  int64_t set = 0;
  for (uint64_t w : seen) set += __builtin_popcountll(w);
  const double zeros = double(std::max<int64_t>(1, bits - set));
  return int64_t(double(bits) * std::log(double(bits) / zeros) * 1.1) + 1;
}

// The inputs of one batch entry, found by voxel.
struct Blocks {
  BlockTable table;            // with its filter complete
  std::vector<int32_t> order;  // the input index of each distinct voxel, then N
  bool duplicate = false;      // two valid inputs share a voxel
};

// The input indices, each block's at its `base` (blocks in the order the inputs first
// reach them, so that inputs near each other in the input order stay near in `order`),
// and each block into the filter; with kKeepFirst the first copy of a voxel stays (else
// every voxel comes once).
template <bool kKeepFirst>
inline __attribute__((always_inline)) void place_voxels(const std::vector<int32_t>& usable,
                                                        const std::vector<uint64_t>& keys,
                                                        const std::vector<uint64_t>& hashes,
                                                        const int32_t* coords,
                                                        const int32_t* batch, Blocks& out) {
  int64_t next = 0;
  for (size_t u = 0; u < usable.size(); ++u) {
    if (u + kPrefetchAhead < usable.size()) out.table.prefetch(hashes[u + kPrefetchAhead]);
    const int64_t j = usable[u];
    Block* b = out.table.find(keys[u], batch[j], hashes[u]);
    if (b->base < 0) {  // the block's first input
      b->base = int32_t(next);
      next += __builtin_popcountll(b->mask);
      out.table.add_to_filter(hashes[u]);
    }
    const int32_t* c = coords + 3 * j;
    int32_t& at = out.order[size_t(b->base + rank(b->mask, voxel_bit(c[0], c[1], c[2])))];
    if (!kKeepFirst || at < 0) at = int32_t(j);
  }
}

inline __attribute__((always_inline)) Blocks build_blocks_body(const int32_t* coords,
                                                               const int32_t* batch,
                                                               const bool* valid, int64_t n) {
  // The inputs that can be found: valid, coordinates in range.
  std::vector<int32_t> usable;
  std::vector<uint64_t> keys, hashes;
  usable.reserve(size_t(n));
  keys.reserve(size_t(n));
  hashes.reserve(size_t(n));
  for (int64_t j = 0; j < n; ++j) {
    const int32_t* c = coords + 3 * j;
    if (!valid[j] || uint32_t(c[0]) >= kCoordLimit || uint32_t(c[1]) >= kCoordLimit ||
        uint32_t(c[2]) >= kCoordLimit) {
      continue;
    }
    usable.push_back(int32_t(j));
    keys.push_back(block_key(c[0] >> 2, c[1] >> 2, c[2] >> 2));
    hashes.push_back(block_hash(keys.back(), batch[j]));
  }
  Blocks out{BlockTable(estimate_distinct(hashes)), {}, false};
  int64_t voxels = 0;  // distinct ones
  for (size_t u = 0; u < usable.size(); ++u) {  // occupancy
    if (u + kPrefetchAhead < usable.size()) out.table.prefetch(hashes[u + kPrefetchAhead]);
    const int32_t* c = coords + 3 * usable[u];
    Block& b = out.table.find_or_insert(keys[u], batch[usable[u]], hashes[u]);
    const uint64_t bit = uint64_t(1) << voxel_bit(c[0], c[1], c[2]);
    out.duplicate |= (b.mask & bit) != 0;
    voxels += (b.mask & bit) == 0;
    b.mask |= bit;
  }
  out.table.seal();
  out.order.assign(size_t(voxels) + 1, -1);
  out.order.back() = int32_t(n);  // what a slot with no input reads
  if (out.duplicate) {
    place_voxels<true>(usable, keys, hashes, coords, batch, out);
  } else {
    place_voxels<false>(usable, keys, hashes, coords, batch, out);
  }
  return out;
}

// Where the slots land relative to an output's block, tabulated by the output's position
// in its block (64 cases). The blocks around the output's block that any slot reaches
// form a box; for each case, the box entries its slots touch (a 3x3x3 kernel: 1 to 8),
// and for each (case, slot) which of those and the bit.
struct SlotPlan {
  int64_t s = 0;
  int64_t lo[3] = {0, 0, 0}, ext[3] = {1, 1, 1};  // the box: block offsets lo + [0, ext)
  int64_t dmin[3] = {0, 0, 0}, dmax[3] = {0, 0, 0};
  bool tabulated = false;
  int64_t most = 0;                // the most blocks one case touches
  std::vector<int64_t> offset;     // box entry -> its block offsets (3 a row)
  std::vector<int64_t> first;      // case -> where its entries start in `used` (65 rows)
  std::vector<uint16_t> used;      // the box entries each case touches, case after case
  std::vector<uint16_t> which;     // (case, slot) -> index into the case's entries
  std::vector<uint8_t> bit;        // (case, slot) -> voxel bit

  SlotPlan(const int32_t* deltas, int64_t num_slots) : s(num_slots) {
    for (int a = 0; a < 3; ++a) {
      for (int64_t k = 0; k < s; ++k) {
        dmin[a] = std::min<int64_t>(dmin[a], deltas[3 * k + a]);
        dmax[a] = std::max<int64_t>(dmax[a], deltas[3 * k + a]);
      }
      lo[a] = dmin[a] >> 2;  // floor (arithmetic shift)
      ext[a] = ((3 + dmax[a]) >> 2) - lo[a] + 1;
    }
    tabulated = s > 0 && s <= kMaxPlanSlots && ext[0] <= kMaxBox && ext[1] <= kMaxBox &&
                ext[2] <= kMaxBox && ext[0] * ext[1] * ext[2] <= kMaxBox;
    if (!tabulated) return;
    const int64_t volume = ext[0] * ext[1] * ext[2];
    offset.resize(size_t(3 * volume));
    for (int64_t e = 0; e < volume; ++e) {
      offset[size_t(3 * e)] = lo[0] + e % ext[0];
      offset[size_t(3 * e + 1)] = lo[1] + e / ext[0] % ext[1];
      offset[size_t(3 * e + 2)] = lo[2] + e / (ext[0] * ext[1]);
    }
    which.resize(size_t(64 * s));
    bit.resize(size_t(64 * s));
    std::vector<int64_t> index_of(static_cast<size_t>(volume));
    for (int r = 0; r < 64; ++r) {
      first.push_back(int64_t(used.size()));
      std::fill(index_of.begin(), index_of.end(), -1);
      const int64_t in[3] = {r & 3, (r >> 2) & 3, (r >> 4) & 3};
      for (int64_t k = 0; k < s; ++k) {
        int64_t p[3], e = 0;
        for (int a = 0; a < 3; ++a) p[a] = in[a] + deltas[3 * k + a];
        for (int a = 2; a >= 0; --a) e = e * ext[a] + ((p[a] >> 2) - lo[a]);
        if (index_of[size_t(e)] < 0) {
          index_of[size_t(e)] = int64_t(used.size()) - first.back();
          used.push_back(uint16_t(e));
        }
        which[size_t(r * s + k)] = uint16_t(index_of[size_t(e)]);
        bit[size_t(r * s + k)] = uint8_t(voxel_bit(p[0], p[1], p[2]));
      }
      most = std::max(most, int64_t(used.size()) - first.back());
    }
    first.push_back(int64_t(used.size()));
  }

  // The case of an output at c, or -1 where it is not tabulated (some slot of it may
  // leave [0, 2^21), or the plan is not tabulated).
  int64_t case_of(const int32_t* c) const {
    const int64_t x = c[0], y = c[1], z = c[2];
    if (!tabulated || x + dmin[0] < 0 || y + dmin[1] < 0 || z + dmin[2] < 0 ||
        x + dmax[0] >= kCoordLimit || y + dmax[1] >= kCoordLimit || z + dmax[2] >= kCoordLimit) {
      return -1;
    }
    return voxel_bit(x, y, z);
  }
};

struct Query {
  const Blocks* blocks;
  const SlotPlan* plan;
  const int32_t* coords;  // (m, 3)
  const int32_t* batch;   // (m,)
  const bool* valid;      // (m,)
  const int32_t* deltas;  // (s, 3)
  int32_t* out;           // (m, s)
  int32_t none;           // the sentinel n
};

// The slots of an output of case r from its blocks' masks and bases, without branches
// (hits are random: a branch would mispredict); `none` (the last entry of `order`) where
// the voxel is no input.
inline __attribute__((always_inline)) void fill_row(const Query& q, int64_t r,
                                                    const uint64_t* masks, const int64_t* bases,
                                                    int32_t* row) {
  const int64_t s = q.plan->s;
  const uint16_t* which = q.plan->which.data() + r * s;
  const uint8_t* bit = q.plan->bit.data() + r * s;
  const int32_t* order = q.blocks->order.data();
  const int64_t none_at = int64_t(q.blocks->order.size()) - 1;
  for (int64_t k = 0; k < s; ++k) {
    const uint64_t mask = masks[which[k]];
    const int bt = bit[k];
    const int64_t set = -int64_t((mask >> bt) & 1);  // all ones when the voxel is an input
    row[k] = order[none_at + ((bases[which[k]] + rank(mask, bt) - none_at) & set)];
  }
}

// Output i the slow way, a lookup a slot (outputs not tabulated).
inline __attribute__((always_inline)) void fill_row_by_slot(const Query& q, int64_t i,
                                                            int32_t* row) {
  const int32_t* c = q.coords + 3 * i;
  for (int64_t k = 0; k < q.plan->s; ++k) {
    const int32_t* d = q.deltas + 3 * k;
    const int64_t x = int64_t(c[0]) + d[0], y = int64_t(c[1]) + d[1], z = int64_t(c[2]) + d[2];
    row[k] = q.none;
    if (uint64_t(x) >= uint64_t(kCoordLimit) || uint64_t(y) >= uint64_t(kCoordLimit) ||
        uint64_t(z) >= uint64_t(kCoordLimit)) {
      continue;  // off the range: nothing there
    }
    const Block* b = q.blocks->table.find_sealed(block_key(x >> 2, y >> 2, z >> 2), q.batch[i]);
    const int bt = voxel_bit(x, y, z);
    if (b != nullptr && ((b->mask >> bt) & 1)) {
      row[k] = q.blocks->order[size_t(b->base + rank(b->mask, bt))];
    }
  }
}

// Output rows [begin, end), kChunk at a time: first every block lookup of the chunk in
// stages (filter words prefetched, then the table slots of the blocks that pass, then
// the lookups, which prefetch the blocks' input indices), then the rows.
inline __attribute__((always_inline)) void query_rows_body(const Query& q, int64_t begin,
                                                           int64_t end) {
  const SlotPlan& plan = *q.plan;
  const BlockTable& table = q.blocks->table;
  const int32_t* order = q.blocks->order.data();
  const size_t most = size_t(kChunk * plan.most);
  std::vector<uint64_t> keys(most), hashes(most), masks(most);
  std::vector<int64_t> bases(most);
  std::vector<int32_t> clouds(most);
  int64_t first[kChunk + 1], cases[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    int64_t count = 0;
    for (int64_t i = c0; i < c1; ++i) {  // the blocks of each tabulated output
      const int32_t* c = q.coords + 3 * i;
      const int64_t r = q.valid[i] ? plan.case_of(c) : -1;
      first[i - c0] = count;
      cases[i - c0] = r;
      if (r < 0) continue;
      const int64_t bx = c[0] >> 2, by = c[1] >> 2, bz = c[2] >> 2;
      for (int64_t u = plan.first[r]; u < plan.first[r + 1]; ++u, ++count) {
        const int64_t* o = plan.offset.data() + 3 * plan.used[size_t(u)];
        keys[count] = block_key(bx + o[0], by + o[1], bz + o[2]);
        clouds[count] = q.batch[i];
        hashes[count] = block_hash(keys[count], clouds[count]);
        table.prefetch_filter(hashes[count]);
      }
    }
    first[c1 - c0] = count;
    for (int64_t t = 0; t < count; ++t) {  // the filter; prefetch the slots that pass
      if (table.may_hold(hashes[t])) {
        table.prefetch(hashes[t]);
      } else {
        keys[t] = kNoKey;
      }
    }
    for (int64_t t = 0; t < count; ++t) {  // the lookups; prefetch the blocks' indices
      const Block* b = keys[t] == kNoKey ? nullptr : table.find(keys[t], clouds[t], hashes[t]);
      masks[t] = b != nullptr ? b->mask : 0;
      bases[t] = b != nullptr ? b->base : 0;
      if (b != nullptr) {
        __builtin_prefetch(order + b->base);
        __builtin_prefetch(order + b->base + __builtin_popcountll(b->mask) - 1);
      }
    }
    for (int64_t i = c0; i < c1; ++i) {  // the rows
      int32_t* row = q.out + i * plan.s;
      if (cases[i - c0] >= 0) {
        fill_row(q, cases[i - c0], masks.data() + first[i - c0], bases.data() + first[i - c0],
                 row);
      } else if (!q.valid[i]) {
        std::fill(row, row + plan.s, q.none);
      } else {
        fill_row_by_slot(q, i, row);
      }
    }
  }
}

// The build and the queries take popcounts all the time: on x86 they are compiled twice,
// for the baseline target (a library call a popcount) and with the popcnt instruction,
// taken when the CPU has it (all that run jaxlib do).
bool has_popcnt() {
#ifdef JSC_X86
  static const bool popcnt = __builtin_cpu_supports("popcnt");
  return popcnt;
#else
  return false;
#endif
}

#ifdef JSC_X86
__attribute__((target("popcnt"))) Blocks build_blocks_popcnt(const int32_t* coords,
                                                             const int32_t* batch,
                                                             const bool* valid, int64_t n) {
  return build_blocks_body(coords, batch, valid, n);
}

__attribute__((target("popcnt"))) void query_rows_popcnt(const Query& q, int64_t begin,
                                                         int64_t end) {
  query_rows_body(q, begin, end);
}
#endif

Blocks build_blocks(const int32_t* coords, const int32_t* batch, const bool* valid, int64_t n) {
#ifdef JSC_X86
  if (has_popcnt()) return build_blocks_popcnt(coords, batch, valid, n);
#endif
  return build_blocks_body(coords, batch, valid, n);
}

void query_rows(const Query& q, int64_t begin, int64_t end) {
#ifdef JSC_X86
  if (has_popcnt()) {
    query_rows_popcnt(q, begin, end);
    return;
  }
#endif
  query_rows_body(q, begin, end);
}

ffi::Error Neighbors(ffi::Buffer<ffi::S32> in_coords, ffi::Buffer<ffi::S32> in_batch,
                     ffi::Buffer<ffi::PRED> in_valid, ffi::Buffer<ffi::S32> out_coords,
                     ffi::Buffer<ffi::S32> out_batch, ffi::Buffer<ffi::PRED> out_valid,
                     ffi::Buffer<ffi::S32> deltas, ffi::Result<ffi::Buffer<ffi::S32>> neighbors,
                     ffi::Result<ffi::Buffer<ffi::PRED>> duplicate) {
  const Dims lead = leading(in_coords.dimensions(), 2);
  const int64_t n = dim(in_coords.dimensions(), -2);
  const int64_t m = dim(out_coords.dimensions(), -2);
  const int64_t s = dim(deltas.dimensions(), -2);
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
      !has_shape(duplicate->dimensions(), lead, {})) {
    return invalid("cpu_neighbors: inconsistent shapes: expects in_coords (..., N, 3), in_batch "
                   "(..., N), in_valid (..., N), out_coords (..., M, 3), out_batch (..., M), "
                   "out_valid (..., M), deltas (S, 3) or (..., S, 3), neighbors (..., M, S), "
                   "duplicate (...)");
  }
  if (!fits_int32(n) || !fits_int32(m) || !fits_int32(s)) {
    return invalid("cpu_neighbors: too many inputs, outputs or slots (2^31 - 2 at most)");
  }
  advise_huge_pages(neighbors->typed_data(), product(lead) * m * s * int64_t(sizeof(int32_t)));
  for (int64_t b = 0; b < product(lead); ++b) {
    const Blocks blocks = build_blocks(in_coords.typed_data() + b * 3 * n,
                                       in_batch.typed_data() + b * n,
                                       in_valid.typed_data() + b * n, n);
    duplicate->typed_data()[b] = blocks.duplicate;
    if (m == 0 || s == 0) continue;
    const int32_t* d = deltas.typed_data() + (batched_deltas ? b * 3 * s : 0);
    const SlotPlan plan(d, s);
    const Query q{&blocks,
                  &plan,
                  out_coords.typed_data() + b * 3 * m,
                  out_batch.typed_data() + b * m,
                  out_valid.typed_data() + b * m,
                  d,
                  neighbors->typed_data() + b * m * s,
                  int32_t(n)};
    parallel_rows(num_threads(m, m), m,
                  [&](int64_t begin, int64_t end) { query_rows(q, begin, end); });
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- FFI handlers
XLA_FFI_DEFINE_HANDLER(
    JscCpuInvert, Invert,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::S32>>()     // nbr: (..., M, S) kernel map
        .Ret<ffi::Buffer<ffi::S32>>()     // inv: (..., N, S) inverse map, M = none
        .Ret<ffi::Buffer<ffi::PRED>>());  // unique: (...) no (j, s) read twice

XLA_FFI_DEFINE_HANDLER(
    JscCpuSortKeys, SortKeys,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::U32>>()    // top: (..., N) leading key words (cloud index)
        .Arg<ffi::Buffer<ffi::U32>>()    // hi: (..., N) high key words
        .Arg<ffi::Buffer<ffi::U32>>()    // lo: (..., N) low key words
        .Ret<ffi::Buffer<ffi::U32>>()    // top_out: (..., N) top, sorted
        .Ret<ffi::Buffer<ffi::U32>>()    // hi_out: (..., N) hi, sorted
        .Ret<ffi::Buffer<ffi::U32>>()    // lo_out: (..., N) lo, sorted
        .Ret<ffi::Buffer<ffi::S32>>());  // perm: (..., N) positions, sorted

XLA_FFI_DEFINE_HANDLER(
    JscCpuGenerate, Generate,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::S32>>()    // coords: (..., N, 3) input voxels
        .Arg<ffi::Buffer<ffi::PRED>>()   // valid: (..., N) false = padding
        .Arg<ffi::Buffer<ffi::S32>>()    // batch: (..., N) cloud of each input
        .Ret<ffi::Buffer<ffi::S32>>()    // out: (..., C, 3) the outputs in key order
        .Ret<ffi::Buffer<ffi::S32>>()    // out_batch: (..., C)
        .Ret<ffi::Buffer<ffi::S32>>()    // inverse: (..., N, S) output per (input, slot), C: none
        .Ret<ffi::Buffer<ffi::S32>>()    // neighbors: (..., C, S) input per (output, slot), N: none
        .Ret<ffi::Buffer<ffi::PRED>>()   // unique: (...) no (output, slot) reached twice
        .Ret<ffi::Buffer<ffi::S32>>()    // count: (...) outputs kept
        .Ret<ffi::Buffer<ffi::S32>>()    // flags: (...) OUT_OF_RANGE | CAPACITY_OVERFLOW
        .Attr<int64_t>("rule")           // 0 conv, 1 transpose, 2 floor
        .Attr<ffi::Span<const int64_t>>("kernel")     // (3)
        .Attr<ffi::Span<const int64_t>>("stride")     // (3)
        .Attr<ffi::Span<const int64_t>>("padding")    // (3)
        .Attr<ffi::Span<const int64_t>>("dilation")   // (3)
        .Attr<ffi::Span<const int64_t>>("shape"));  // (3) output grid, or -1s for none

XLA_FFI_DEFINE_HANDLER(
    JscCpuNeighbors, Neighbors,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::S32>>()     // in_coords: (..., N, 3) input voxels
        .Arg<ffi::Buffer<ffi::S32>>()     // in_batch: (..., N) cloud of each input
        .Arg<ffi::Buffer<ffi::PRED>>()    // in_valid: (..., N) false = padding
        .Arg<ffi::Buffer<ffi::S32>>()     // out_coords: (..., M, 3) query centres
        .Arg<ffi::Buffer<ffi::S32>>()     // out_batch: (..., M) cloud of each output
        .Arg<ffi::Buffer<ffi::PRED>>()    // out_valid: (..., M) false = padding
        .Arg<ffi::Buffer<ffi::S32>>()     // deltas: (S, 3) offset of each slot
        .Ret<ffi::Buffer<ffi::S32>>()     // neighbors: (..., M, S) input index, N = none
        .Ret<ffi::Buffer<ffi::PRED>>());  // duplicate: (...) two inputs share a voxel

constexpr JscHandler kHandlers[] = {
    {"jsc_cpu_invert", JscCpuInvert},
    {"jsc_cpu_sort_keys", JscCpuSortKeys},
    {"jsc_cpu_generate", JscCpuGenerate},
    {"jsc_cpu_neighbors", JscCpuNeighbors},
};

}  // namespace
}  // namespace jsc

JSC_EXPORT_HANDLERS(search_cpu, jsc::kHandlers)
