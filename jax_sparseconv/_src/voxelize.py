"""Making voxels unique: points to voxel centres, and merging duplicated voxels.

Static shapes: the outputs keep the input's capacity ``n``; the first
``num_unique`` rows are the unique voxels (in Morton order) and the rest are padding
(zero positions and features). Pass ``num_unique`` as ``in_valid``/``out_valid`` to
:func:`build_kernel_map`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import checks
from .kernel_map import MAX_COORD, _SENTINEL_KEY, _keys, describe_flags, quantize, reference_point


def unique_voxels(positions, feats, voxel_size, *, valid=None, batch=None):
  """Merges points that fall on the same lattice voxel, averaging their features.

  Open3D counts every copy of a duplicated input voxel; a kernel map holds one input
  per voxel, so duplicates must be merged first (this is what voxelisation does).

  Args:
    positions: ``(n, 3)`` float positions on a lattice of spacing ``voxel_size``.
    feats: ``(n, C)`` features, averaged over the points of each voxel.
    voxel_size: positive scalar.
    valid: optional count or bool mask of valid rows (padding is ignored).
    batch: optional int ``(n,)`` cloud index (voxels of different clouds stay apart).

  Returns:
    ``(positions, feats, num_unique)`` or, with ``batch``, ``(positions, feats,
    batch, num_unique)``; arrays have ``n`` rows, of which the first ``num_unique``
    are valid. Works under ``jit``.

  >>> import jax.numpy as jnp
  >>> p = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
  >>> up, uf, k = unique_voxels(p, jnp.array([[1.0], [5.0], [3.0]]), 1.0)
  >>> int(k), uf[:2].ravel().tolist()
  (2, [2.0, 5.0])
  """
  positions = checks.check_positions("positions", positions)
  feats = checks.check_float_array("feats", feats, 2)
  n = positions.shape[0]
  if feats.shape[0] != n:
    raise ValueError(f"feats has {feats.shape[0]} rows but positions has {n}")
  checks.check_voxel_size(voxel_size)
  mask = checks.as_mask("valid", valid, n)
  b = None if batch is None else checks.check_batch("batch", batch, n)
  vs = jnp.asarray(voxel_size, positions.dtype)
  ref = reference_point(positions, mask, positions, mask, a_all_valid=valid is None)
  q, flags = quantize(positions, vs, mask, ref)
  if checks.is_concrete(flags) and int(flags):
    raise ValueError("unique_voxels: " + "; ".join(describe_flags(int(flags))))
  base = jnp.min(jnp.where(mask[:, None], q, MAX_COORD), axis=0, initial=MAX_COORD)
  c = jnp.clip(q - base, 0, MAX_COORD - 1)
  keys = [jnp.where(mask, k, _SENTINEL_KEY) for k in _keys(c, b)]
  *skeys, perm = jax.lax.sort((*keys, jnp.arange(n, dtype=jnp.int32)), num_keys=len(keys))
  smask = mask[perm]
  if n:
    new = jnp.concatenate([jnp.ones((1,), bool), ~functools.reduce(
        jnp.logical_and, [k[1:] == k[:-1] for k in skeys])])
  else:
    new = jnp.zeros((0,), bool)
  seg = jnp.cumsum(new) - 1
  seg = jnp.where(smask, seg, n)  # padding goes to a dropped segment
  num_unique = jnp.sum(new & smask).astype(jnp.int32)
  count = jax.ops.segment_sum(jnp.ones((n,), feats.dtype), seg, num_segments=n + 1)[:n]
  fsum = jax.ops.segment_sum(feats[perm], seg, num_segments=n + 1)[:n]
  out_f = fsum / jnp.maximum(count, 1)[:, None]
  out_p = jnp.zeros_like(positions).at[seg].set(positions[perm], mode="drop")
  if b is None:
    return out_p, out_f, num_unique
  out_b = jnp.zeros((n,), jnp.int32).at[seg].set(b[perm], mode="drop")
  return out_p, out_f, out_b, num_unique


def voxelize(points, feats, voxel_size, *, valid=None, batch=None):
  """Snaps arbitrary points to voxel centres ``(floor(p / vs) + 0.5) * vs`` and merges them.

  Returns what :func:`unique_voxels` returns. Works under ``jit``.

  >>> import jax.numpy as jnp
  >>> p, f, k = voxelize(jnp.array([[0.1, 0.2, 0.3], [0.4, 0.1, 0.9], [1.2, 0.0, 0.0]]),
  ...                    jnp.ones((3, 1)), 1.0)
  >>> int(k), p[:2].tolist()
  (2, [[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
  """
  points = checks.check_positions("points", points)
  checks.check_voxel_size(voxel_size)
  vs = jnp.asarray(voxel_size, points.dtype)
  centres = (jnp.floor(points / vs) + 0.5) * vs
  return unique_voxels(centres, feats, voxel_size, valid=valid, batch=batch)


def downsample(positions, voxel_size, factor: int = 2, *, valid=None, batch=None):
  """Output positions for a strided layer: one per occupied ``factor``-block of voxels.

  For voxel-centre positions ``(i + 0.5) * vs`` (what :func:`voxelize` gives), each
  block ``i // factor`` is represented by its first voxel ``(factor * (i // factor) +
  0.5) * vs``. With ``factor=2`` these are exactly the outputs of a ``K=2`` conv at
  ``voxel_size`` (Open3D's default offset covers ``{p, p + vs}`` per axis), and the
  inputs of the ``K=2`` transposed conv that up-samples back. The coarse points lie on
  a lattice of spacing ``factor * voxel_size``, usable as the next level's voxel size.

  Returns:
    ``(positions, num_coarse)`` or, with ``batch``, ``(positions, batch, num_coarse)``,
    with the input's capacity (see :func:`unique_voxels`).

  >>> import jax.numpy as jnp
  >>> p = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  >>> c, k = downsample(p, 1.0)
  >>> int(k), c[:2].tolist()
  (2, [[0.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  """
  positions = checks.check_positions("positions", positions)
  checks.check_voxel_size(voxel_size)
  vs = jnp.asarray(voxel_size, positions.dtype)
  idx = jnp.floor(positions / vs)
  coarse = (jnp.floor(idx / factor) * factor + 0.5) * vs
  out = unique_voxels(coarse, jnp.zeros((positions.shape[0], 0), positions.dtype), voxel_size,
                      valid=valid, batch=batch)
  return (out[0], out[-1]) if batch is None else (out[0], out[2], out[3])
