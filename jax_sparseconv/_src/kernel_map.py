"""Neighbour search: from point positions to a kernel map, with a sort and binary search.

Design (static shapes, in the style of jax-md's neighbour lists):

* Positions are quantised to integer voxel coordinates relative to one reference
  point, ``q = round((p - p_ref) / voxel_size)``. Any lattice works (voxel centres
  ``(i + 0.5) * vs``, corners ``i * vs``, or the sub-lattice left by a strided
  layer) as long as inputs and outputs lie on the same one.
* The geometry of the kernel (which integer voxel offsets are neighbours and which
  kernel cell each one uses) follows Open3D's rules exactly and is computed once, in
  NumPy, from the static ``kernel_size`` and ``offset``: a list of *slots*, each a
  voxel offset ``(dx, dy, dz)`` and a flat kernel cell. With the default offsets
  there is one slot per cell; unusual offsets can map several slots to one cell.
* Input coordinates become two-word Morton keys (plus a batch word in packed-batch
  mode), are sorted once with ``lax.sort``, and every (output, slot) query is found
  with a vectorised lexicographic binary search.
* Problems that depend on values (NaN positions, points off the lattice,
  coordinates beyond ``2**20`` voxels per axis, duplicated input voxels, a bad
  traced voxel size) are collected as bit flags. Outside ``jit`` the builder raises
  a ``ValueError``; inside ``jit`` the flags travel in the map and the conv
  functions return NaN outputs, so nothing is silently wrong.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, kernels
from .morton import MAX_COORD, morton_encode

#: Largest allowed ``|p/voxel_size - round(p/voxel_size)|`` (relative to the reference point).
LATTICE_TOLERANCE = 0.1

# Error bits of ``KernelMap.flags``.
NONFINITE_POSITION = 1
OFF_LATTICE = 2
OUT_OF_RANGE = 4
DUPLICATE_INPUT = 8
BAD_VOXEL_SIZE = 16
BAD_BATCH = 32

_MESSAGES = {
    NONFINITE_POSITION: "a valid input or output position is NaN or infinite",
    OFF_LATTICE: ("positions do not lie on one regular lattice of spacing voxel_size "
                  f"(a coordinate is more than {LATTICE_TOLERANCE} voxel from it); inputs and "
                  "outputs must share one lattice"),
    OUT_OF_RANGE: f"the points span {MAX_COORD} voxels or more on an axis (the supported range)",
    DUPLICATE_INPUT: ("duplicated input voxels: Open3D counts each copy, a kernel map holds one "
                      "point per voxel; merge them first with jax_sparseconv.unique_voxels"),
    BAD_VOXEL_SIZE: "voxel_size is not positive and finite",
    BAD_BATCH: "a batch index is negative",
}

_SENTINEL_KEY = np.uint32(0xFFFFFFFF)


def describe_flags(flags: int) -> list[str]:
  """The error messages for an int of OR-ed flag bits."""
  return [msg for bit, msg in _MESSAGES.items() if int(flags) & bit]


@functools.lru_cache(maxsize=None)
def slot_geometry(kernel_size: tuple[int, int, int], offset: tuple[float, float, float]):
  """Open3D's neighbour window and kernel-cell rule, per axis, as a list of slots.

  For an input at integer voxel offset ``d`` from the output (per axis, ``K`` that
  axis's kernel size, ``o`` its offset): it is a neighbour iff
  ``|d + o| <= 0.51 * K``, and it uses cell
  ``clamp(round_half_away(d + o + K // 2 - 0.5 * [K even]), 0, K - 1)``.

  Returns:
    ``(deltas, cells)``: ``deltas`` an int32 array ``(S, 3)`` of ``(dx, dy, dz)`` and
    ``cells`` a tuple of S flat indices into the kernel's ``(Kz, Ky, Kx)`` cells.
  """
  kz, ky, kx = kernel_size
  per_axis = []  # x, y, z
  for k, o in zip((kx, ky, kz), offset):
    r = 0.51 * k
    lo, hi = int(np.floor(-r - o)) - 1, int(np.ceil(r - o)) + 1
    ds = [d for d in range(lo, hi + 1) if abs(d + o) <= r * (1 + 1e-7)]
    us = [d + o + k // 2 - (0.5 if k % 2 == 0 else 0.0) for d in ds]
    cs = [min(max(int(np.sign(u) * np.floor(abs(u) + 0.5)), 0), k - 1) for u in us]
    per_axis.append(list(zip(ds, cs)))
  deltas, cells = [], []
  for dz, cz in per_axis[2]:
    for dy, cy in per_axis[1]:
      for dx, cx in per_axis[0]:
        deltas.append((dx, dy, dz))
        cells.append((cz * ky + cy) * kx + cx)
  return np.asarray(deltas, np.int32).reshape(-1, 3), tuple(cells)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["neighbors", "inverse", "out_unique", "out_mask", "flags"],
    meta_fields=["kernel_size", "offset", "slot_cells", "num_in", "transpose"])
@dataclasses.dataclass(frozen=True)
class KernelMap:
  """Which input feeds each output through which kernel cell (a pytree).

  Attributes:
    neighbors: int32 ``(num_out, num_slots)``. ``neighbors[m, s]`` is the index of
      the input point at slot ``s`` of output ``m``, or ``num_in`` (the sentinel)
      when there is none. Padded outputs have sentinel rows.
    inverse: int32 ``(num_in, num_slots)``, the transposed map: ``inverse[n, s]`` is
      the output that reads input ``n`` at slot ``s``, or ``num_out``. The backward
      pass gathers through it instead of scattering.
    out_unique: bool scalar, True when ``inverse`` is exact (no two outputs read one
      input through one slot, i.e. output positions are unique); otherwise the
      backward pass falls back to a scatter-add.
    out_mask: bool ``(num_out,)``, False for padded outputs (their results are 0).
    flags: int32 scalar of error bits (0 when all is well); see :attr:`errors`.
    kernel_size: static ``(Kz, Ky, Kx)``.
    offset: static offset ``(x, y, z)`` in voxels.
    slot_cells: static tuple, the flat kernel cell of each slot.
    num_in: static number of input rows (including padding): the sentinel value.
    transpose: static; True for a map built for :func:`sparse_conv_transpose`.
  """
  neighbors: jax.Array
  inverse: jax.Array
  out_unique: jax.Array
  out_mask: jax.Array
  flags: jax.Array
  kernel_size: tuple[int, int, int]
  offset: tuple[float, float, float]
  slot_cells: tuple[int, ...]
  num_in: int
  transpose: bool

  @property
  def num_out(self) -> int:
    return self.neighbors.shape[-2]

  @property
  def num_slots(self) -> int:
    return len(self.slot_cells)

  @property
  def errors(self) -> list[str]:
    """Readable messages for the set error flags (needs a concrete map, not inside jit)."""
    return describe_flags(int(np.max(np.asarray(self.flags))))

  def check(self) -> "KernelMap":
    """Raises ``ValueError`` when an error flag is set; returns the map otherwise."""
    errors = self.errors
    if errors:
      raise ValueError("invalid kernel map: " + "; ".join(errors))
    return self

  def neighbor_counts(self) -> jax.Array:
    """Per output, how many inputs were found (Open3D's ``neighbors_row_splits`` diff)."""
    return jnp.sum(self.neighbors < self.num_in, axis=-1, dtype=jnp.int32)

  def input_counts(self) -> jax.Array:
    """Per input, how many outputs it feeds (the transposed conv's neighbour count)."""
    nbr = self.neighbors.reshape(-1)
    return jnp.zeros((self.num_in + 1,), jnp.int32).at[nbr].add(1)[:self.num_in]


def quantize(pos, voxel_size, mask, ref):
  """Integer lattice coordinates of ``pos`` relative to ``ref``, and value-error flags.

  Returns ``(q, flags)``: ``q`` int32 ``(n, 3)`` (undefined where flagged) and an
  int32 scalar of OR-ed flag bits over the points where ``mask`` is True.
  """
  pos = jnp.where(mask[:, None], pos, ref)
  g = (pos - ref) / voxel_size
  finite = jnp.all(jnp.isfinite(g), axis=-1)
  g = jnp.where(finite[:, None], g, 0)
  qf = jnp.round(g)
  off = jnp.any(jnp.abs(g - qf) > LATTICE_TOLERANCE, axis=-1)
  far = jnp.any(jnp.abs(qf) >= MAX_COORD, axis=-1)
  q = jnp.clip(qf, -MAX_COORD, MAX_COORD).astype(jnp.int32)
  nonfinite = ~jnp.all(jnp.isfinite(pos), axis=-1)

  def bit(cond, value):
    return jnp.where(jnp.any(cond & mask), value, 0)

  flags = bit(nonfinite, NONFINITE_POSITION) | bit(off, OFF_LATTICE) | bit(far, OUT_OF_RANGE)
  return q, flags.astype(jnp.int32)


def reference_point(pos_a, mask_a, pos_b, mask_b, a_all_valid=False):
  """The first valid point of ``pos_a``, else of ``pos_b``, else the origin.

  ``a_all_valid`` (static) skips the search when every row of ``pos_a`` is valid.
  """
  if a_all_valid and pos_a.shape[0]:
    return pos_a[0]
  first_a = pos_a[jnp.argmax(mask_a)] if pos_a.shape[0] else jnp.zeros(3, pos_a.dtype)
  first_b = pos_b[jnp.argmax(mask_b)] if pos_b.shape[0] else jnp.zeros(3, pos_b.dtype)
  return jnp.where(jnp.any(mask_a), first_a, jnp.where(jnp.any(mask_b), first_b, 0))


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


def _bucket_bits(n: int) -> int:
  """Bits ``B`` of the Morton-code prefix indexing the search's tables (static).

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

  The top ``B`` bits of the used part of the Morton code (coordinates are below
  ``max_coord``, so codes have ``3 * bit_length(max_coord)`` bits) index a table of
  where each prefix's bucket starts in the sorted keys (a histogram and a cumulative
  sum). When a bucket spans at most 32 codes (spans up to ~2**((B + 5) / 3) voxels),
  an occupancy bitmask per bucket answers each query in O(1): present iff its bit is
  set, index = bucket start + popcount of the lower bits. Otherwise each query
  binary-searches its own bucket. Sentinel keys (padding) sort after every bucket.
  """
  hi, lo = sorted_words
  bits = _bucket_bits(hi.shape[0])
  nbits = 32 - jax.lax.clz(jnp.maximum(max_coord, 1).astype(jnp.uint32)).astype(jnp.int32)
  shift = jnp.maximum(3 * nbits - bits, 0)
  sentinel = hi == _SENTINEL_KEY
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


def _keys(coords, batch):
  hi, lo = morton_encode(coords)
  return [hi, lo] if batch is None else [batch.astype(jnp.uint32), hi, lo]


@functools.partial(jax.jit, static_argnames=("ks", "off", "transpose", "in_all_valid"))
def _search(in_pos, out_pos, voxel_size, in_mask, out_mask, in_batch, out_batch, *, ks, off,
            transpose, in_all_valid):
  """The search proper (one compiled program): ``(neighbors, inverse, unique, flags)``."""
  deltas, _ = slot_geometry(ks, off)
  n = in_pos.shape[0]
  vs = jnp.asarray(voxel_size, in_pos.dtype)

  margin = int(np.abs(deltas).max()) if deltas.size else 0

  ref = reference_point(in_pos, in_mask, out_pos, out_mask, a_all_valid=in_all_valid)
  q_in, flags_in = quantize(in_pos, vs, in_mask, ref)
  q_out, flags_out = quantize(out_pos, vs, out_mask, ref)
  flags = flags_in | flags_out | jnp.where(jnp.isfinite(vs) & (vs > 0), 0, BAD_VOXEL_SIZE)

  # Shift to non-negative coordinates with room for the kernel's reach.
  big = jnp.int32(MAX_COORD)
  base = jnp.minimum(jnp.min(jnp.where(in_mask[:, None], q_in, big), axis=0, initial=big),
                     jnp.min(jnp.where(out_mask[:, None], q_out, big), axis=0, initial=big))
  base = jnp.where(base == big, 0, base) - margin
  c_in, c_out = q_in - base, q_out - base
  span = jnp.maximum(jnp.max(jnp.where(in_mask[:, None], c_in, 0), initial=0),
                     jnp.max(jnp.where(out_mask[:, None], c_out, 0), initial=0))
  flags = flags | jnp.where(span + margin >= MAX_COORD, OUT_OF_RANGE, 0)

  if in_batch is not None:
    bad = jnp.any((in_batch < 0) & in_mask) | jnp.any((out_batch < 0) & out_mask)
    flags = flags | jnp.where(bad, BAD_BATCH, 0)

  # Sort the input keys once; invalid inputs get the sentinel key (sorts last, never matches).
  in_keys = [jnp.where(in_mask, w, _SENTINEL_KEY)
             for w in _keys(jnp.clip(c_in, 0, MAX_COORD - 1), in_batch)]
  *sorted_keys, perm = _sort_keys(in_keys)
  if n > 1:
    same = functools.reduce(jnp.logical_and, [k[1:] == k[:-1] for k in sorted_keys])
    dup = jnp.any(same & (sorted_keys[0][1:] != _SENTINEL_KEY))
    flags = flags | jnp.where(dup, DUPLICATE_INPUT, 0)
  sorted_keys = [jnp.concatenate([k, jnp.array([_SENTINEL_KEY])]) for k in sorted_keys]
  perm = jnp.concatenate([perm, jnp.array([n], jnp.int32)])

  # One query per (output, slot).
  d = jnp.asarray(-deltas if transpose else deltas)
  cq = c_out[:, None, :] + d[None, :, :]
  q_ok = out_mask[:, None] & jnp.all((cq >= 0) & (cq < MAX_COORD), axis=-1)
  qb = None if out_batch is None else jnp.broadcast_to(out_batch[:, None], cq.shape[:2])
  q_keys = _keys(jnp.clip(cq, 0, MAX_COORD - 1), qb)
  if out_batch is None:
    pos, found = _find(sorted_keys, q_keys, span + margin + 1)
  else:  # packed batches: a plain binary search over the whole sorted array
    full = jnp.full(q_keys[0].shape, n + 1, jnp.int32)
    pos = _lower_bound(sorted_keys, q_keys, jnp.zeros_like(full), full)
    found = functools.reduce(jnp.logical_and,
                            [_take(k, pos) == q for k, q in zip(sorted_keys, q_keys)])
  hit = q_ok & found
  neighbors = jnp.where(hit, _take(perm, pos), n).astype(jnp.int32)
  inverse, unique = _invert(neighbors, n)
  return neighbors, inverse, unique, flags.astype(jnp.int32)


def _sort_keys(keys):
  """``(*sorted keys, perm)``: the native CPU radix sort for two-word keys on the CPU,
  else ``lax.sort`` (equal keys, i.e. padding sentinels and duplicated inputs, may come
  out in another order; neither is ever matched by a query)."""
  def by_lax(*keys):
    iota = jnp.arange(keys[0].shape[0], dtype=jnp.int32)
    return tuple(jax.lax.sort((*keys, iota), num_keys=len(keys)))

  return kernels.dispatch(by_lax, None, *keys,
                          cpu_fn=kernels.cpu_sort_keys if len(keys) == 2 else None)


def _invert(neighbors, n):
  """The inverse map ``(n, S)`` and whether it is exact: the native CPU kernel on the
  CPU (a single pass, collisions counted), else a scatter checked by a round trip."""
  return kernels.dispatch(functools.partial(_invert_jnp, n=n), None, neighbors,
                          cpu_fn=lambda nb: kernels.cpu_invert(nb, n))


def _invert_jnp(neighbors, n):
  m, s = neighbors.shape
  rows = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[:, None], (m, s))
  slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (m, s))
  inverse = jnp.full((n + 1, s), m, jnp.int32).at[neighbors, slots].set(rows)
  unique = jnp.all((neighbors == n) | (inverse[neighbors, slots] == rows))
  return inverse[:n], unique


def build_kernel_map(in_pos, out_pos, voxel_size, kernel_size, *, offset=None,
                     transpose=False, in_valid=None, out_valid=None,
                     in_batch=None, out_batch=None) -> KernelMap:
  """Finds, for every output point and kernel slot, the input point there.

  The result can be passed as ``kernel_map=`` to :func:`sparse_conv` (or, built with
  ``transpose=True``, to :func:`sparse_conv_transpose`) so that several layers with
  the same points and kernel size share one search (Open3D's
  ``fixed_radius_search_hash_table`` role).

  Args:
    in_pos: float ``(num_in, 3)`` input positions ``[x, y, z]``.
    out_pos: float ``(num_out, 3)`` output positions, on the same lattice.
    voxel_size: positive scalar, the lattice spacing.
    kernel_size: int or ``(Kz, Ky, Kx)`` (the kernel array's axis order). Static.
    offset: static ``[x, y, z]`` kernel offset in voxels; ``None`` gives Open3D's
      default (0 for odd, -0.5 for even kernel sizes, per axis).
    transpose: build the map for :func:`sparse_conv_transpose` (outputs gather from
      inputs at the mirrored offsets) instead of :func:`sparse_conv`.
    in_valid, out_valid: optional validity of padded point sets, each an integer
      count (the first rows are valid) or a bool mask. Invalid inputs are never
      neighbours; invalid outputs get all-sentinel rows and zero outputs. May be
      traced.
    in_batch, out_batch: optional int ``(num_in,)`` / ``(num_out,)`` cloud indices
      for packed batches; neighbours never cross clouds. Give both or neither.

  Returns:
    A :class:`KernelMap`. Outside ``jit``, a ``ValueError`` is raised when positions
    are non-finite, off the lattice, span ``2**20`` voxels or more on an axis, or
    when valid inputs share a voxel; inside ``jit`` those set ``flags`` instead and
    the conv functions return NaN.

  >>> import jax.numpy as jnp
  >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
  >>> km = build_kernel_map(pos, pos, 1.0, 3)
  >>> km.neighbors.shape, km.neighbor_counts().tolist()
  ((2, 27), [2, 2])
  """
  in_pos = checks.check_positions("in_pos", in_pos)
  out_pos = checks.check_positions("out_pos", out_pos)
  checks.check_voxel_size(voxel_size)
  ks = checks.normalize_kernel_size(kernel_size)
  off = checks.normalize_offset(offset, ks)
  if (in_batch is None) != (out_batch is None):
    raise ValueError("give both in_batch and out_batch, or neither")
  n, m = in_pos.shape[0], out_pos.shape[0]
  in_mask = checks.as_mask("in_valid", in_valid, n)
  out_mask = checks.as_mask("out_valid", out_valid, m)
  if in_batch is not None:
    in_batch = checks.check_batch("in_batch", in_batch, n)
    out_batch = checks.check_batch("out_batch", out_batch, m)
  dtype = jnp.result_type(in_pos.dtype, out_pos.dtype)
  _, cells = slot_geometry(ks, off)
  neighbors, inverse, unique, flags = _search(in_pos.astype(dtype), out_pos.astype(dtype), voxel_size, in_mask,
                             out_mask, in_batch, out_batch, ks=ks, off=off,
                             transpose=bool(transpose), in_all_valid=in_valid is None)
  km = KernelMap(neighbors=neighbors, inverse=inverse, out_unique=unique, out_mask=out_mask,
                 flags=flags,
                 kernel_size=ks, offset=off, slot_cells=cells, num_in=n, transpose=bool(transpose))
  if checks.is_concrete(km.flags):
    km.check()
  return km
