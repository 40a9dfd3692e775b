"""The compiled kernels of ``ffi/``: loading, registration and ``ffi_call`` wrappers.

Two extension modules of this package carry the XLA FFI handlers:

* ``_cuda_kernels``: nvcc's build of the CUDA conv kernels, registered for
  ``platform="CUDA"``; present when nvcc was found at install time.
* ``_host_kernels``, registered for ``platform="cpu"``: the same CUDA source compiled by
  g++ through ``ffi/cuda_host_shim.h`` (every CUDA thread a fiber, blocks in turn; slow,
  so that the kernels' indexing runs through the test suite without a GPU), the native
  CPU conv kernels (float32 gather-matmul and weight gradient over the pairs that
  exist, AVX2, threads) and the native CPU search kernels (key sort, neighbour lookup,
  inverse map, generated output sets).

Each wrapper below is one ``jax.ffi.ffi_call``; which one runs is decided in
``backend.py``. Policies that the kernels need (the weight gradient's partition count)
are decided here and passed down as shapes; the one kernel with attributes is the
generated output set's (its rule, kernel, stride, padding, dilation and grid).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding

_SUPPORTED = tuple(jnp.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
#: Bound on the weight-gradient partial sums, in elements (deterministic reduction).
PARTIAL_ELEMS = 16 * 2**20


#: Builds that are installed but failed to import: ``{module name: the error}`` (a build
#: that is simply absent is not listed). ``backend.cuda_status`` reports them.
load_errors: dict[str, str] = {}


def _load(name: str, platform: str):
  """Imports one kernel build and registers its handlers; None when it is absent or broken.

  Absent (no such module: built without nvcc, say) is quiet here; a module that exists but
  fails to import (a missing shared library, an undefined symbol, an FFI API mismatch) is
  recorded in :data:`load_errors` and warned about, never swallowed."""
  qualified = f"jax_sparseconv.{name}"
  try:
    module = importlib.import_module(qualified)
  except ModuleNotFoundError as e:
    if e.name == qualified:  # not built
      return None
    load_errors[name] = f"{type(e).__name__}: {e}"
  except ImportError as e:
    load_errors[name] = f"{type(e).__name__}: {e}"
  if name in load_errors:
    warnings.warn(f"jax_sparseconv: the compiled module {name} is installed but cannot be "
                  f"imported ({load_errors[name]}); its kernels are unavailable",
                  RuntimeWarning, stacklevel=2)
    return None
  for target, capsule in module.handlers().items():
    jax.ffi.register_ffi_target(target, capsule, platform=platform)
    targets.add((target, platform))
  return module


#: ``(target name, platform)`` of every registered handler.
targets: set[tuple[str, str]] = set()


host = _load("_host_kernels", "cpu")
cuda = _load("_cuda_kernels", "CUDA")


def xla_ffi_api_minor() -> dict[str, int]:
  """FFI API minor version each build was compiled against (0.4 for jaxlib 0.11.2)."""
  return {name: int(mod.xla_ffi_api_minor)
          for name, mod in (("cuda", cuda), ("host", host)) if mod is not None}


def _call(target, results, *args, vmap_method="sequential", attrs=None):
  """``jax.ffi.ffi_call(target, results)(*args, **attrs)`` with ``results`` a list of
  ``(shape, dtype)``; under ``shard_map`` operands and results vary over the same mesh
  axes, and vmapped over a batch sharded over Explicit mesh axes the call runs per shard
  (``sharding.py``). Returns one array, or a tuple for several results."""
  args = sharding.match(*args)
  types = [sharding.result(args[0], shape, dtype) for shape, dtype in results]
  call = jax.ffi.ffi_call(target, types if len(types) > 1 else types[0],
                          vmap_method=vmap_method)
  if attrs:
    call = functools.partial(call, **attrs)
  if vmap_method == "broadcast_all":  # the search kernels: integer operands
    # vmapped over a batch axis sharded over Explicit mesh axes: per shard (sharding.py).
    call = sharding.vmap_per_shard(call)
  out = call(*args)
  return tuple(out) if len(types) > 1 else out


# ------------------------------------------------------------------ conv (CUDA source)


def _compute_dtype(*dtypes):
  dt = jnp.result_type(*dtypes)
  if dt not in _SUPPORTED:
    raise TypeError(f"the compiled kernels take float16, bfloat16, float32 or float64, got {dt}")
  return dt


def gather_matmul(x, w, nbr, out_dtype):
  """``y[m] = sum_s x[nbr[m, s]] @ w[s]`` by the ``jsc_gather_matmul`` kernel."""
  dt = _compute_dtype(x.dtype, w.dtype, out_dtype)
  # vmap never reaches this call: the primitive's batching rule folds the batch into
  # the rows first. "sequential" is the safe choice should that ever change.
  y = _call("jsc_gather_matmul", [((nbr.shape[0], w.shape[2]), dt)],
            x.astype(dt), w.astype(dt), nbr.astype(jnp.int32))
  return y.astype(out_dtype)


def num_partitions(m: int, s: int, cin: int, cout: int) -> int:
  """Row partitions of the weight gradient: enough blocks to fill a GPU (at most 528 blocks,
  the 4 resident blocks of each of an H100's 132 SMs: one wave),
  a bounded workspace; a function of the shapes only, so the reduction order is fixed.
  (``s * parts`` stays near 528, far below the grid limit that the CUDA handler checks.)"""
  tiles = max(1, -(-cin // 64) * -(-cout // 64))
  # Rounded down: S * tiles * parts <= 528 blocks is one wave on 132 SMs x 4 blocks
  # (rounding up gave e.g. 540 = 27 * 20 for 27 slots: a lone second wave of 12 blocks).
  want = max(1, min(-(-m // 2048), 528 // max(1, s * tiles)))
  cap = max(1, PARTIAL_ELEMS // max(1, s * cin * cout))
  return int(min(want, cap))


def weight_grad(x, ct, nbr, w_dtype):
  """``dw[s] = sum_m x[nbr[m, s]]^T ct[m]`` by the ``jsc_weight_grad`` kernel; the
  partition count is passed down as the workspace's leading dimension."""
  dt = _compute_dtype(x.dtype, ct.dtype, w_dtype)
  acc = jnp.float64 if dt == jnp.float64 else jnp.float32
  (m, s), cin, cout = nbr.shape, x.shape[1], ct.shape[1]
  parts = num_partitions(m, s, cin, cout)
  dw, _ = _call("jsc_weight_grad", [((s, cin, cout), dt), ((parts, s, cin, cout), acc)],
                x.astype(dt), ct.astype(dt), nbr.astype(jnp.int32))
  return dw.astype(w_dtype)


# ------------------------------------------------------------------ conv (native CPU)


def cpu_gather_matmul(x, w, nbr):
  """float32 ``y[m] = sum_s x[nbr[m, s]] @ w[s]`` by the native CPU kernel."""
  return _call("jsc_cpu_gather_matmul", [((nbr.shape[0], w.shape[2]), jnp.float32)],
               x, w, nbr.astype(jnp.int32))


def cpu_weight_grad(x, ct, nbr):
  """float32 ``dw[s] = sum_m x[nbr[m, s]]^T ct[m]`` by the native CPU kernel."""
  return _call("jsc_cpu_weight_grad", [((nbr.shape[1], x.shape[1], ct.shape[1]), jnp.float32)],
               x, ct, nbr.astype(jnp.int32))


def cpu_grouped_gather_matmul(x, w, nbr):
  """float32 grouped ``y[m] = sum_s x[nbr[m, s]] @ w[s]`` (``w`` ``(S, Cin // G, Cout)``)."""
  return _call("jsc_cpu_grouped_gather_matmul", [((nbr.shape[0], w.shape[2]), jnp.float32)],
               x, w, nbr.astype(jnp.int32))


def cpu_grouped_weight_grad(x, ct, nbr, groups):
  """float32 grouped weight gradient ``(S, Cin // G, Cout)``."""
  return _call("jsc_cpu_grouped_weight_grad",
               [((nbr.shape[1], x.shape[1] // groups, ct.shape[1]), jnp.float32)],
               x, ct, nbr.astype(jnp.int32))


# ------------------------------------------------------------------ search (native CPU)
# Leading batch axes are handled by the kernels (``vmap_method="broadcast_all"``).


def cpu_sort_keys(*words):
  """``(*words, perm)`` sorted by ``(*words, position)``: two or three uint32 key words,
  most significant first (native CPU radix sort)."""
  if len(words) not in (2, 3):
    raise ValueError(f"cpu_sort_keys takes 2 or 3 key words, got {len(words)}")
  shape = words[0].shape
  given = [w.astype(jnp.uint32) for w in words]
  top = given.pop(0) if len(given) == 3 else jnp.zeros(shape, jnp.uint32)
  out = _call("jsc_cpu_sort_keys", [(shape, jnp.uint32)] * 3 + [(shape, jnp.int32)], top,
              *given, vmap_method="broadcast_all")
  return tuple(out) if len(words) == 3 else tuple(out[1:])


_RULES = {"conv": 0, "transpose": 1, "floor": 2}


def cpu_generate(coords, mask, batch, *, rule, kernel_size, stride, padding, dilation, shape,
                 capacity: int):
  """``(out (capacity, 3), out_batch (capacity,), inverse (n, S), neighbors (capacity,
  S), unique, count, flags)``: the output set a conv generates from inputs at ``coords
  (n, 3)`` (valid ``mask``, clouds ``batch``) and its map both ways, as ``generate.py``'s
  jnp path gives them (native CPU, one pass; ``neighbors, unique`` are
  :func:`cpu_invert` of ``inverse``). ``rule``:
  "conv", "transpose" or "floor" (``S`` = 1); the other arguments are 3-tuples (``shape``
  the output grid, or None)."""
  n = coords.shape[-2]
  lead = coords.shape[:-2]
  s = 1 if rule == "floor" else int(np.prod(kernel_size))
  i32 = jnp.int32
  attrs = {"rule": np.int64(_RULES[rule]),
           **{name: np.asarray(v, np.int64).reshape(3) for name, v in (
               ("kernel", kernel_size), ("stride", stride), ("padding", padding),
               ("dilation", dilation), ("shape", (-1, -1, -1) if shape is None else shape))}}
  return tuple(_call("jsc_cpu_generate",
                     [((*lead, capacity, 3), i32), ((*lead, capacity), i32), ((*lead, n, s), i32),
                      ((*lead, capacity, s), i32), (lead, bool), (lead, i32), (lead, i32)],
                     coords.astype(i32), mask.astype(bool), batch.astype(i32),
                     vmap_method="broadcast_all", attrs=attrs))


def cpu_neighbors(in_coords, in_batch, in_mask, out_coords, out_batch, out_mask, deltas):
  """``(neighbors, duplicate)`` by the native CPU lookup (a block hash; its cost does not
  depend on the coordinates' extent): ``neighbors[i, s]`` is the valid input at
  ``out_coords[i] + deltas[s]`` in the same cloud, else ``n``; ``duplicate`` tells
  whether two valid inputs share a voxel. Coordinates are non-negative int32."""
  *batch, m, _ = out_coords.shape
  return _call("jsc_cpu_neighbors",
               [((*batch, m, deltas.shape[0]), jnp.int32), (tuple(batch), bool)],
               in_coords.astype(jnp.int32), in_batch.astype(jnp.int32), in_mask,
               out_coords.astype(jnp.int32), out_batch.astype(jnp.int32), out_mask,
               jnp.asarray(deltas, jnp.int32), vmap_method="broadcast_all")


def cpu_invert(nbr, n):
  """The inverse of a kernel map and whether it is exact, by the native CPU kernel."""
  *batch, _, s = nbr.shape
  return _call("jsc_cpu_invert", [((*batch, n, s), jnp.int32), (tuple(batch), bool)],
               nbr.astype(jnp.int32), vmap_method="broadcast_all")


# ------------------------------------------------------------------ search (CUDA source)
# ffi/search_cuda.cu: nvcc's build on GPUs, the host shim's on the CPU (backend "host").


def table_size(n: int) -> int:
  """Entries of the CUDA search's hash table for ``n`` inputs: a power of two above ``2 n``
  (at most half full, so that linear probing stays short)."""
  return 1 << (int(n).bit_length() + 1)


def cuda_neighbors(in_coords, in_batch, in_mask, out_coords, out_batch, out_mask, deltas):
  """``(neighbors, duplicate)`` by the CUDA search (``jsc_neighbors``, a hash table of
  voxels): exactly :func:`cpu_neighbors`' table, with the smallest input index where two
  valid inputs share a voxel. The hash table is a workspace result (dropped)."""
  *batch, n, _ = in_coords.shape
  m = out_coords.shape[-2]
  nbr, dup, _ = _call("jsc_neighbors",
                      [((*batch, m, deltas.shape[0]), jnp.int32), (tuple(batch), bool),
                       ((*batch, table_size(n), 4), jnp.int32)],
                      in_coords.astype(jnp.int32), in_batch.astype(jnp.int32), in_mask,
                      out_coords.astype(jnp.int32), out_batch.astype(jnp.int32), out_mask,
                      jnp.asarray(deltas, jnp.int32), vmap_method="broadcast_all")
  return nbr, dup


def cuda_invert(nbr, n):
  """The inverse of a kernel map and whether it is exact, by the CUDA kernel
  (``jsc_invert``; the same table as :func:`cpu_invert`)."""
  *batch, _, s = nbr.shape
  return _call("jsc_invert", [((*batch, n, s), jnp.int32), (tuple(batch), bool)],
               nbr.astype(jnp.int32), vmap_method="broadcast_all")
