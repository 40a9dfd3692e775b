"""Points on a lattice: quantisation, keys, sorting and duplicate detection.

Shared by the kernel map and the voxel utilities. Positions are quantised to integer
voxel coordinates relative to one reference point, ``q = round((p - p_ref) / vs)``, so
any lattice works (voxel centres ``(i + 0.5) * vs``, corners ``i * vs``, the
sub-lattices left by strided layers) as long as all point sets lie on the same one.
The coordinates are then shifted to be non-negative (:func:`to_grid`) and become
Morton keys (:func:`keys`: two uint32 words, plus a cloud word for packed batches),
which sort in Z-order (:func:`sort_keys`).

Value problems (NaN, off-lattice, out-of-range) come back as :class:`ErrorCode` bits;
see ``errors.py`` for what happens to them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import backend, ffi
from .errors import LATTICE_TOLERANCE, ErrorCode, bit
from .morton import MAX_COORD, morton_encode

#: Key word of padded (invalid) points: sorts after every real key, never matched.
SENTINEL_KEY = np.uint32(0xFFFFFFFF)


def reference_point(pos_a, mask_a, pos_b, mask_b, a_all_valid=False):
  """The first valid point of ``pos_a``, else of ``pos_b``, else the origin.

  ``a_all_valid`` (static) skips the search when every row of ``pos_a`` is valid.
  """
  if a_all_valid and pos_a.shape[0]:
    return pos_a[0]
  first_a = pos_a[jnp.argmax(mask_a)] if pos_a.shape[0] else jnp.zeros(3, pos_a.dtype)
  first_b = pos_b[jnp.argmax(mask_b)] if pos_b.shape[0] else jnp.zeros(3, pos_b.dtype)
  return jnp.where(jnp.any(mask_a), first_a, jnp.where(jnp.any(mask_b), first_b, 0))


def voxel_size_flags(voxel_size):
  """``BAD_VOXEL_SIZE`` unless ``voxel_size`` is positive and finite (int32 scalar)."""
  return bit(~(jnp.isfinite(voxel_size) & (voxel_size > 0)), ErrorCode.BAD_VOXEL_SIZE)


def quantize(pos, voxel_size, mask, ref):
  """Integer lattice coordinates of ``pos`` relative to ``ref``, and value-error flags.

  Returns ``(q, flags)``: ``q`` int32 ``(n, 3)`` (undefined where flagged) and an
  int32 scalar of OR-ed :class:`ErrorCode` bits over the points where ``mask`` holds.
  """
  pos = jnp.where(mask[:, None], pos, ref)
  g = (pos - ref) / voxel_size
  finite = jnp.all(jnp.isfinite(g), axis=-1)
  g = jnp.where(finite[:, None], g, 0)
  qf = jnp.round(g)
  # Off the lattice: more than LATTICE_TOLERANCE voxel, plus what rounding of the stored
  # positions and of (pos - ref) / voxel_size can add (3 unit roundoffs of the operands'
  # magnitudes, in voxels: 0.375 voxel for float32 at 2**20 voxels from the origin).
  u = jnp.finfo(g.dtype).eps / 2
  slack = 3 * u * jnp.where(finite[:, None], jnp.abs(pos) + jnp.abs(ref), 0) / voxel_size
  off = jnp.any(jnp.abs(g - qf) > jnp.minimum(LATTICE_TOLERANCE + slack, 0.45), axis=-1)
  far = jnp.any(jnp.abs(qf) >= MAX_COORD, axis=-1)
  q = jnp.clip(qf, -MAX_COORD, MAX_COORD).astype(jnp.int32)
  nonfinite = ~jnp.all(jnp.isfinite(pos), axis=-1)
  flags = (bit(nonfinite & mask, ErrorCode.NONFINITE_POSITION)
           | bit(off & mask, ErrorCode.OFF_LATTICE) | bit(far & mask, ErrorCode.OUT_OF_RANGE))
  return q, flags


def to_grid(coords, masks, margin: int = 0):
  """Shifts several coordinate sets together so that the smallest valid coordinate of
  each axis is ``margin`` (room for a kernel's reach below).

  Returns ``(shifted, span, flags)``: the shifted int32 sets, the largest valid shifted
  coordinate, and ``OUT_OF_RANGE`` when ``span + margin`` reaches ``MAX_COORD``.
  """
  big = jnp.int32(MAX_COORD)
  base = functools.reduce(jnp.minimum, [
      jnp.min(jnp.where(m[:, None], c, big), axis=0, initial=big) for c, m in zip(coords, masks)])
  base = jnp.where(base == big, 0, base) - margin
  shifted = [c - base for c in coords]
  span = functools.reduce(jnp.maximum, [
      jnp.max(jnp.where(m[:, None], c, 0), initial=0) for c, m in zip(shifted, masks)])
  return shifted, span, bit(span + margin >= MAX_COORD, ErrorCode.OUT_OF_RANGE)


def batch_flags(batch, mask):
  """``BAD_BATCH`` when a valid point has a negative cloud index."""
  return bit((batch < 0) & mask, ErrorCode.BAD_BATCH)


def keys(coords, batch=None, mask=None):
  """Sort keys of non-negative coordinates: ``[hi, lo]`` Morton words, with the cloud
  index as a leading word when ``batch`` is given; rows where ``mask`` is False get
  :data:`SENTINEL_KEY` in every word."""
  hi, lo = morton_encode(jnp.clip(coords, 0, MAX_COORD - 1))
  words = [hi, lo] if batch is None else [batch.astype(jnp.uint32), hi, lo]
  if mask is not None:
    words = [jnp.where(mask, w, SENTINEL_KEY) for w in words]
  return words


def sort_keys(words):
  """``(*sorted words, perm)``: the native CPU radix sort (two or three words) on the
  CPU, else ``lax.sort``. Equal keys (padding sentinels, duplicated points) may come out in
  another order on the two paths."""
  def by_lax(*words):
    iota = jnp.arange(words[0].shape[0], dtype=jnp.int32)
    return tuple(jax.lax.sort((*words, iota), num_keys=len(words)))

  return backend.dispatch(by_lax, None, *words,
                          cpu_fn=ffi.cpu_sort_keys)


def same_as_previous(sorted_words):
  """bool ``(n,)``: row ``i > 0`` has the same key as row ``i - 1`` (row 0: False)."""
  n = sorted_words[0].shape[0]
  if n == 0:
    return jnp.zeros((0,), bool)
  same = functools.reduce(jnp.logical_and, [w[1:] == w[:-1] for w in sorted_words])
  return jnp.pad(same, (1, 0), constant_values=False)


def has_duplicates(sorted_words):
  """Whether two valid (non-sentinel) keys are equal, in sorted keys."""
  return jnp.any(same_as_previous(sorted_words) & (sorted_words[0] != SENTINEL_KEY))
