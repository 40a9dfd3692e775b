// Shared by every kernel source (conv_cuda.cu in both builds, conv_cpu.cc, search_cpu.cc)
// and module.cc: the handler table each source exports, the one error helper, the one
// shape check, and the shapes of the conv ops that have two implementations. No CUDA
// header here, so g++ and nvcc both take it.
//
// Shape checks, one style everywhere: read the sizes with dim() (which gives -1 for an
// axis the buffer lacks), then check every buffer, results included (XLA does not check
// the result shapes an ffi_call declares), with has_shape(); a rank or size mismatch
// fails the same way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

// ---------------------------------------------------------------- handler tables
// One row of a source's table: FFI target name -> handler (an XLA_FFI_DEFINE_HANDLER).
struct JscHandler {
  const char* name;
  XLA_FFI_Handler* handler;
};

// Declares the table function of one source ("family"):
//   extern "C" const JscHandler* jsc_<family>_handlers(int* count);
// module.cc declares the families a module links and merges their tables.
#define JSC_HANDLER_TABLE(family) \
  extern "C" const JscHandler* jsc_##family##_handlers(int* count)

// Defines it from the source's table, a constexpr JscHandler array:
//   constexpr JscHandler kTable[] = {{"jsc_op", JscOp}, ...};
//   JSC_EXPORT_HANDLERS(family, kTable)
#define JSC_EXPORT_HANDLERS(family, table)                    \
  JSC_HANDLER_TABLE(family) {                                 \
    *count = int(sizeof(table) / sizeof((table)[0]));         \
    return table;                                             \
  }

namespace jsc {
namespace ffi = xla::ffi;

using Dims = ffi::Span<const int64_t>;

// ---------------------------------------------------------------- errors
// Every error a handler returns: `what` starts with the op's name.
inline ffi::Error error(ffi::ErrorCode code, const std::string& what) {
  return ffi::Error(code, "jax_sparseconv kernels: " + what);
}

// A malformed call (shapes, dtypes, sizes).
inline ffi::Error invalid(const std::string& what) {
  return error(ffi::ErrorCode::kInvalidArgument, what);
}

// ---------------------------------------------------------------- shapes
// Size of axis k (k < 0: from the end), -1 when the buffer has no such axis.
inline int64_t dim(Dims d, int k) {
  const int64_t r = int64_t(d.size());
  const int64_t i = k < 0 ? r + k : k;
  return i >= 0 && i < r ? d[size_t(i)] : -1;
}

// The leading (batch) axes of d, before its last `tail_rank` axes (none when d is shorter).
inline Dims leading(Dims d, size_t tail_rank) {
  return d.first(d.size() > tail_rank ? d.size() - tail_rank : 0);
}

// Number of entries over the axes of d (1 for none).
inline int64_t product(Dims d) {
  int64_t p = 1;
  for (int64_t v : d) p *= v;
  return p;
}

// d == (lead..., tail...): the batch axes `lead`, then the axes `tail`.
inline bool has_shape(Dims d, Dims lead, std::initializer_list<int64_t> tail) {
  if (d.size() != lead.size() + tail.size()) return false;
  size_t i = 0;
  for (int64_t v : lead) {
    if (d[i++] != v) return false;
  }
  for (int64_t v : tail) {
    if (d[i++] != v) return false;
  }
  return true;
}

// d == dims.
inline bool has_shape(Dims d, std::initializer_list<int64_t> dims) {
  return has_shape(d, Dims(), dims);
}

// Row counts the kernels index with int32 (the kernel maps are int32).
inline bool fits_int32(int64_t rows) { return rows >= 0 && rows < INT32_MAX; }

// ---------------------------------------------------------------- the conv ops' shapes
// Both implementations of an op (conv_cuda.cu, conv_cpu.cc) take the same buffers.
struct ConvShape {
  int64_t n, m, s, cin, cout;  // inputs, outputs, slots, channels in and out
};

// The kernels hold N, S, Cin and Cout in int (and the weight gradient's row indices in
// int32): a size beyond int32 is refused with the shapes, even where a zero-size axis keeps
// the buffers empty (it would be truncated, not checked, otherwise).
inline bool conv_sizes_fit(const ConvShape& sh) {
  return fits_int32(sh.n) && fits_int32(sh.s) && fits_int32(sh.cin) && fits_int32(sh.cout);
}

// The gather-matmul's x, w, nbr, y (dimensions): fills `sh`, false on a mismatch.
constexpr char kGatherMatmulShapes[] =
    "x (N, Cin), w (S, Cin, Cout), nbr (M, S), y (M, Cout), N, S, Cin, Cout < 2^31 - 1";
inline bool gather_matmul_shape(Dims x, Dims w, Dims nbr, Dims y, ConvShape& sh) {
  sh = ConvShape{dim(x, 0), dim(nbr, 0), dim(w, 0), dim(x, 1), dim(w, 2)};
  return has_shape(x, {sh.n, sh.cin}) && has_shape(w, {sh.s, sh.cin, sh.cout}) &&
         has_shape(nbr, {sh.m, sh.s}) && has_shape(y, {sh.m, sh.cout}) && conv_sizes_fit(sh);
}

// The weight gradient's x, ct, nbr, dw (dimensions): fills `sh`, false on a mismatch.
constexpr char kWeightGradShapes[] =
    "x (N, Cin), ct (M, Cout), nbr (M, S), dw (S, Cin, Cout), every size < 2^31 - 1";
inline bool weight_grad_shape(Dims x, Dims ct, Dims nbr, Dims dw, ConvShape& sh) {
  sh = ConvShape{dim(x, 0), dim(ct, 0), dim(nbr, 1), dim(x, 1), dim(ct, 1)};
  return has_shape(x, {sh.n, sh.cin}) && has_shape(ct, {sh.m, sh.cout}) &&
         has_shape(nbr, {sh.m, sh.s}) && has_shape(dw, {sh.s, sh.cin, sh.cout}) &&
         conv_sizes_fit(sh) && fits_int32(sh.m);
}

}  // namespace jsc
