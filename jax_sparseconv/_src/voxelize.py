"""Voxel utilities: points to voxel centres, merging duplicated voxels, coarse grids.

Static shapes: results have a fixed number of rows, the *capacity* (the input's row
count unless ``capacity=`` is given); the first ``count`` rows are the voxels (in
Morton order) and the rest are padding. Padded rows have NaN positions (and zero
features), so a padded result passed on without its count cannot be mistaken for
points: pass ``count`` as ``valid=`` / ``in_valid=`` / ``out_valid=``.

Value errors follow the rule of ``errors.py`` (raise outside ``jit``; inside, a
raising host callback in error mode ``"raise"``, and NaN positions and features in
every mode, so a kernel map built from them carries the error in its flags).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import checks, errors, lattice
from .errors import ErrorCode


class Voxels(NamedTuple):
  """Result of :func:`unique_voxels` / :func:`voxelize` for one cloud (or padded set)."""
  positions: jax.Array  #: ``(capacity, 3)`` voxel positions; padding NaN.
  feats: jax.Array      #: ``(capacity, C)`` mean features; padding 0.
  count: jax.Array      #: int32 scalar, the number of voxels (valid rows).


class PackedVoxels(NamedTuple):
  """Result of :func:`unique_voxels` / :func:`voxelize` with ``batch``."""
  positions: jax.Array  #: ``(capacity, 3)``; padding NaN.
  feats: jax.Array      #: ``(capacity, C)``; padding 0.
  batch: jax.Array      #: int32 ``(capacity,)`` cloud index of each voxel; padding 0.
  count: jax.Array      #: int32 scalar, the number of voxels over all clouds.


class Coarse(NamedTuple):
  """Result of :func:`downsample`."""
  positions: jax.Array  #: ``(capacity, 3)`` coarse positions; padding NaN.
  count: jax.Array      #: int32 scalar.


class PackedCoarse(NamedTuple):
  """Result of :func:`downsample` with ``batch``."""
  positions: jax.Array
  batch: jax.Array
  count: jax.Array


def unique_voxels(positions, feats, voxel_size, *, valid=None, batch=None, capacity=None):
  """Merges points that fall on the same lattice voxel, averaging their features.

  Open3D counts every copy of a duplicated input voxel; a kernel map holds one input
  per voxel, so duplicates must be merged first (this is what voxelisation does).

  Args:
    positions: ``(n, 3)`` float positions on a lattice of spacing ``voxel_size``.
    feats: ``(n, C)`` features, averaged over the points of each voxel.
    voxel_size: positive scalar.
    valid: count or bool mask of the valid rows when ``positions`` is padded (required
      then: padding rows of this library's results are NaN and raise without it).
    batch: optional int ``(n,)`` cloud index (voxels of different clouds stay apart).
    capacity: static number of result rows (default ``n``). More voxels than that is
      an error (``CAPACITY_OVERFLOW``); the extra voxels are dropped.

  Returns:
    :class:`Voxels` ``(positions, feats, count)``, or with ``batch``
    :class:`PackedVoxels` ``(positions, feats, batch, count)``; arrays have
    ``capacity`` rows, the first ``count`` valid. Works under ``jit``.

  >>> import jax.numpy as jnp
  >>> p = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
  >>> up, uf, k = unique_voxels(p, jnp.array([[1.0], [5.0], [3.0]]), 1.0)
  >>> int(k), uf[:2].ravel().tolist()
  (2, [2.0, 5.0])
  """
  result, flags = unique_voxels_flagged(positions, feats, voxel_size, valid=valid, batch=batch,
                                       capacity=capacity)
  errors.report(flags, "unique_voxels")
  return result


def unique_voxels_flagged(positions, feats, voxel_size, *, valid=None, batch=None,
                          capacity=None):
  """:func:`unique_voxels` and its error flags, without applying the error rule (for
  callers that carry the flags on, e.g. ``SparseTensor.from_points``)."""
  positions = checks.check_positions("positions", positions)
  feats = checks.check_float_array("feats", feats, 2)
  n = positions.shape[0]
  if feats.shape[0] != n:
    raise ValueError(f"feats has {feats.shape[0]} rows but positions has {n} "
                     f"(shapes {feats.shape} and {positions.shape})")
  checks.check_voxel_size(voxel_size)
  mask = checks.valid_mask(valid, (n,), "valid")
  b = None if batch is None else checks.check_batch("batch", batch, n)
  cap = n if capacity is None else checks.check_capacity(capacity)
  out = _unique(positions, feats, voxel_size, mask, b, cap=cap, all_valid=valid is None)
  *result, flags = out
  return (Voxels(*result) if b is None else PackedVoxels(*result)), flags


@functools.partial(jax.jit, static_argnames=("cap", "all_valid"))
def _unique(positions, feats, voxel_size, mask, batch, *, cap, all_valid):
  n = positions.shape[0]
  vs = jnp.asarray(voxel_size, positions.dtype)
  ref = lattice.reference_point(positions, mask, positions, mask, a_all_valid=all_valid)
  q, flags = lattice.quantize(positions, vs, mask, ref)
  (c,), _, flags_range = lattice.to_grid([q], [mask])
  flags |= flags_range | lattice.voxel_size_flags(vs)
  if batch is not None:
    flags |= lattice.batch_flags(batch, mask)
  *sorted_keys, perm = lattice.sort_keys(lattice.keys(c, batch, mask))
  smask = jnp.take(mask, perm)
  new = ~lattice.same_as_previous(sorted_keys) & smask  # first row of each voxel
  count = jnp.sum(new).astype(jnp.int32)
  flags |= errors.bit(count > cap, ErrorCode.CAPACITY_OVERFLOW)
  seg = jnp.where(smask, jnp.cumsum(new) - 1, cap)  # padding to a dropped segment
  seg = jnp.where(seg < cap, seg, cap)
  ones = jnp.ones((n,), feats.dtype)
  num = jax.ops.segment_sum(ones, seg, num_segments=cap + 1)[:cap]
  fsum = jax.ops.segment_sum(jnp.take(feats, perm, axis=0), seg, num_segments=cap + 1)[:cap]
  out_f = fsum / jnp.maximum(num, 1)[:, None]
  out_p = jnp.full((cap, 3), jnp.nan, positions.dtype).at[seg].set(
      jnp.take(positions, perm, axis=0), mode="drop")
  out_p, out_f = errors.poison(out_p, flags), errors.poison(out_f, flags)
  count = jnp.minimum(count, cap)
  if batch is None:
    return out_p, out_f, count, flags
  out_b = jnp.zeros((cap,), jnp.int32).at[seg].set(jnp.take(batch, perm), mode="drop")
  return out_p, out_f, out_b, count, flags


def voxelize(points, feats, voxel_size, *, valid=None, batch=None, capacity=None):
  """Snaps arbitrary points to voxel centres ``(floor(p / vs) + 0.5) * vs`` and merges them.

  Returns what :func:`unique_voxels` returns. Works under ``jit``.

  >>> import jax.numpy as jnp
  >>> p, f, k = voxelize(jnp.array([[0.1, 0.2, 0.3], [0.4, 0.1, 0.9], [1.2, 0.0, 0.0]]),
  ...                    jnp.ones((3, 1)), 1.0)
  >>> int(k), p[:2].tolist()
  (2, [[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
  """
  result, flags = voxelize_flagged(points, feats, voxel_size, valid=valid, batch=batch,
                                   capacity=capacity)
  errors.report(flags, "voxelize")
  return result


def voxelize_flagged(points, feats, voxel_size, *, valid=None, batch=None, capacity=None):
  """:func:`voxelize` and its error flags, without applying the error rule."""
  points = checks.check_positions("points", points)
  checks.check_voxel_size(voxel_size)
  vs = jnp.asarray(voxel_size, points.dtype)
  centres = (jnp.floor(points / vs) + 0.5) * vs
  return unique_voxels_flagged(centres, feats, voxel_size, valid=valid, batch=batch,
                               capacity=capacity)


@functools.partial(jax.jit, static_argnames=("factor", "all_valid"))
def _coarse(positions, vs, mask, *, factor, all_valid):
  """Coarse positions, poisoned where the fine points are not on one lattice (NaN padding
  passed without ``valid`` is caught here)."""
  ref = lattice.reference_point(positions, mask, positions, mask, a_all_valid=all_valid)
  _, flags = lattice.quantize(positions, vs, mask, ref)
  flags |= lattice.voxel_size_flags(vs)
  # The lattice is o + i * vs (o its phase, e.g. 0.5 * vs for voxel centres); each block
  # of `factor` voxels keeps its first one, so coarse points stay on the fine lattice and
  # coarse levels nest (parents floor(i / factor) at every level, as Open3D-ML's).
  phase = ref - vs * jnp.floor(ref / vs)
  index = jnp.round((positions - phase) / vs)
  coarse = phase + jnp.floor(index / factor) * factor * vs
  return errors.poison(coarse, flags), flags


def downsample(positions, voxel_size, factor: int = 2, *, valid=None, batch=None,
               capacity=None):
  """Output positions for a strided layer: one per occupied ``factor``-block of voxels.

  For voxel-centre positions ``(i + 0.5) * vs`` (what :func:`voxelize` gives), each
  block ``i // factor`` is represented by its first voxel ``(factor * (i // factor) +
  0.5) * vs``; on any lattice ``o + i * vs``, by ``o + factor * (i // factor) * vs``, so
  repeated down-sampling nests (each level's parents are ``i // factor`` of the last). With ``factor=2`` these are exactly the outputs of a ``K=2`` conv at
  ``voxel_size`` (Open3D's default offset covers ``{p, p + vs}`` per axis), and the
  inputs of the ``K=2`` transposed conv that up-samples back. The coarse points lie on
  a lattice of spacing ``factor * voxel_size``, usable as the next level's voxel size.
  The positions must lie on the lattice of spacing ``voxel_size``; pass ``valid`` for
  padded sets (see :func:`unique_voxels`).

  Returns:
    :class:`Coarse` ``(positions, count)`` or, with ``batch``, :class:`PackedCoarse`
    ``(positions, batch, count)``, with ``capacity`` rows (default: the input's).

  >>> import jax.numpy as jnp
  >>> p = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  >>> c, k = downsample(p, 1.0)
  >>> int(k), c[:2].tolist()
  (2, [[0.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  """
  positions = checks.check_positions("positions", positions)
  checks.check_voxel_size(voxel_size)
  factor = checks.check_factor(factor)
  n = positions.shape[0]
  mask = checks.valid_mask(valid, (n,), "valid")
  vs = jnp.asarray(voxel_size, positions.dtype)
  coarse, flags = _coarse(positions, vs, mask, factor=factor, all_valid=valid is None)
  errors.report(flags, "downsample")
  out = unique_voxels(coarse, jnp.zeros((n, 0), positions.dtype), voxel_size, valid=mask,
                      batch=batch, capacity=capacity)
  if batch is None:
    return Coarse(out.positions, out.count)
  return PackedCoarse(out.positions, out.batch, out.count)
