"""The lookup: for every (output, slot) query, the input voxel there.

Inputs and outputs arrive as non-negative integer lattice coordinates (``lattice.py``)
and the kernel's slots as integer offsets. Two implementations give identical results:

* **native CPU** (``ffi/search_cpu.cc``, ``jsc_cpu_neighbors``): a hash table of 4x4x4
  blocks of voxels (occupancy bits and input indices), built once from the inputs;
  each output's queries touch the few blocks around it. Its cost depends on the
  number of points and queries only, not on the coordinates' extent. Packed batches
  and ``vmap``'s batch axes are handled by the kernel.
* **jnp** (other platforms, and the ``"jnp"`` backend): the inputs' Morton keys are
  sorted once; the top ``B`` bits of the used part of each code index two tables
  (where each bucket starts in the sorted keys, and a 32-bit occupancy mask per
  bucket). When buckets span at most 32 codes a query is answered in O(1) (bit test +
  popcount); wider spans binary-search their bucket. Packed batches binary-search the
  whole sorted array lexicographically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import backend, ffi, lattice
from .morton import MAX_COORD

#: Coordinates the native lookup accepts, per axis (``[0, 2**21)``).
_NATIVE_RANGE = 2 * MAX_COORD


def neighbors(c_in, in_mask, in_batch, c_out, out_mask, out_batch, deltas, span):
  """``(neighbors, duplicate)`` for non-negative coordinates.

  Args:
    c_in, c_out: int32 ``(n, 3)`` / ``(m, 3)`` lattice coordinates (valid rows in
      ``[0, MAX_COORD)``).
    in_mask, out_mask: bool validity.
    in_batch, out_batch: int32 cloud indices, or ``None`` (one cloud).
    deltas: static int ``(S, 3)`` slot offsets; output ``i`` queries ``c_out[i] + d``.
    span: int32 scalar, the largest valid coordinate (sizes the jnp bucket tables).

  Returns:
    int32 ``(m, S)`` input indices (``n`` where none) and a bool scalar, whether two
    valid inputs of one cloud share a voxel.
  """
  packed = in_batch is not None
  if not packed:
    in_batch = jnp.zeros(c_in.shape[:1], jnp.int32)
    out_batch = jnp.zeros(c_out.shape[:1], jnp.int32)
  jnp_fn = functools.partial(_neighbors_jnp, deltas=deltas, packed=packed)
  native = (functools.partial(_neighbors_native, deltas=deltas)
            if ("jsc_cpu_neighbors", "cpu") in ffi.targets else None)
  return backend.dispatch(jnp_fn, None, c_in, in_mask, in_batch, c_out, out_mask, out_batch,
                          span, cpu_fn=native)


def _neighbors_native(c_in, in_mask, in_batch, c_out, out_mask, out_batch, span, *, deltas):
  del span
  clip = functools.partial(jnp.clip, min=0, max=_NATIVE_RANGE - 1)
  return ffi.cpu_neighbors(clip(c_in), in_batch, in_mask, clip(c_out), out_batch, out_mask,
                           deltas)


def _neighbors_jnp(c_in, in_mask, in_batch, c_out, out_mask, out_batch, span, *, deltas,
                   packed):
  n = c_in.shape[0]
  *sorted_keys, perm = lattice.sort_keys(
      lattice.keys(c_in, in_batch if packed else None, in_mask))
  duplicate = lattice.has_duplicates(sorted_keys)
  # One sentinel row at the end (pad, not a concatenated constant: a constant has no
  # batch sharding under vmap over an Explicit mesh axis).
  sorted_keys = [jnp.pad(k, (0, 1), constant_values=lattice.SENTINEL_KEY) for k in sorted_keys]
  perm = jnp.pad(perm, (0, 1), constant_values=n)

  cq = c_out[:, None, :] + jnp.asarray(deltas)[None, :, :]
  q_ok = out_mask[:, None] & jnp.all((cq >= 0) & (cq < MAX_COORD), axis=-1)
  qb = jnp.broadcast_to(out_batch[:, None], cq.shape[:2]) if packed else None
  q_keys = lattice.keys(cq, qb)
  if packed:  # a plain binary search over the whole sorted array
    full = jnp.full(q_keys[0].shape, n + 1, jnp.int32)
    pos = _lower_bound(sorted_keys, q_keys, jnp.zeros_like(full), full)
    found = functools.reduce(jnp.logical_and,
                             [_take(k, pos) == q for k, q in zip(sorted_keys, q_keys)])
  else:
    margin = int(abs(deltas).max()) if deltas.size else 0
    pos, found = _find(sorted_keys, q_keys, span + margin + 1)
  return jnp.where(q_ok & found, _take(perm, pos), n).astype(jnp.int32), duplicate


def _take(a, idx):
  """``a[idx]`` for in-bounds indices (several times faster on CPU than ``a[idx]``)."""
  return jnp.take(a, idx, axis=0, mode="clip")


def _lex_less(a_words, b_words):
  less = jnp.zeros(jnp.broadcast_shapes(a_words[0].shape, b_words[0].shape), bool)
  for a, b in reversed(list(zip(a_words, b_words))):
    less = (a < b) | ((a == b) & less)
  return less


def _lower_bound(sorted_words, query_words, lo, hi):
  """Vectorised lexicographic ``searchsorted(side='left')`` of each query within
  ``sorted_words[lo:hi]``; iterates until every query has converged."""
  n = sorted_words[0].shape[0]

  def step(state):
    lo, hi = state
    mid = jnp.minimum((lo + hi) // 2, n - 1)
    less = _lex_less([_take(w, mid) for w in sorted_words], query_words)
    active = lo < hi
    return jnp.where(active & less, mid + 1, lo), jnp.where(active & ~less, mid, hi)

  lo, _ = jax.lax.while_loop(lambda st: jnp.any(st[0] < st[1]), step, (lo, hi))
  return lo


def bucket_bits(n: int) -> int:
  """Bits ``B`` of the Morton-code prefix indexing the jnp search's tables (static).

  About 16 buckets per point up to 2**17 points, growing faster beyond (a surface of
  N voxels spans ~sqrt(N) voxels per axis, so its code space grows as N**1.5), capped
  at 2**25. The two tables (bucket starts and occupancy masks) take ``8 * 2**B``
  bytes: 16 MiB at 100k points, 256 MiB from 1M on. The O(1) bitmap lookup covers
  spans up to ``2**((B + 5) / 3)`` voxels per axis (~400 at 100k points, 1024 from
  1M on); larger spans use a binary search within each bucket.
  """
  b = int(n).bit_length()
  return int(min(25, max(8, b + 4 + max(0, b - 17))))


def _prefix(hi, lo, shift):
  """``((hi << 30) | lo) >> shift`` (shift >= 0), keeping 32 bits."""
  s = shift.astype(jnp.uint32)
  low_part = (hi << jnp.clip(30 - shift, 0, 31).astype(jnp.uint32)) | (lo >> jnp.minimum(s, 31))
  high_part = hi >> jnp.clip(shift - 30, 0, 31).astype(jnp.uint32)
  return jnp.where(shift <= 30, low_part, high_part)


def _find(sorted_words, query_words, max_coord):
  """Index of each query key in the sorted ``(hi, lo)`` keys, and whether it is there.

  Coordinates are below ``max_coord``, so codes have ``3 * bit_length(max_coord)``
  bits; their top ``B`` bits index the bucket tables (a histogram and its cumulative
  sum). Sentinel keys (padding) sort after every bucket.
  """
  hi, lo = sorted_words
  bits = bucket_bits(hi.shape[0])
  nbits = 32 - jax.lax.clz(jnp.maximum(max_coord, 1).astype(jnp.uint32)).astype(jnp.int32)
  shift = jnp.maximum(3 * nbits - bits, 0)
  sentinel = hi == lattice.SENTINEL_KEY
  in_prefix = jnp.where(sentinel, 1 << bits, _prefix(hi, lo, shift).astype(jnp.int32))
  counts = jnp.zeros((1 << bits) + 1, jnp.int32).at[in_prefix].add(1)
  start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts)]).astype(jnp.int32)
  qp = jnp.clip(_prefix(*query_words, shift).astype(jnp.int32), 0, (1 << bits) - 1)

  def bitmap(_):
    low = jnp.uint32(31) & ((jnp.uint32(1) << shift.astype(jnp.uint32)) - 1)
    in_bit = jnp.where(sentinel, 0, jnp.uint32(1) << (lo & low))
    masks = jnp.zeros((1 << bits) + 1, jnp.uint32).at[in_prefix].add(in_bit)  # bits unique
    m = _take(masks, qp)
    r = query_words[1] & low
    below = m & ((jnp.uint32(1) << r) - 1)
    pos = _take(start, qp) + jax.lax.population_count(below).astype(jnp.int32)
    return pos, ((m >> r) & 1) == 1

  def search(_):
    pos = _lower_bound(sorted_words, query_words, _take(start, qp), _take(start, qp + 1))
    return pos, (_take(hi, pos) == query_words[0]) & (_take(lo, pos) == query_words[1])

  return jax.lax.cond(shift <= 5, bitmap, search, None)
