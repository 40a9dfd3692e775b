"""Sparse pooling: strided max/avg pooling over voxel windows, and global pooling per cloud.

Windows follow spconv's ``SparseMaxPool3d`` / ``SparseAvgPool3d`` (padding 0) on the voxel
lattice: voxel ``i = floor(p / voxel_size)`` (per axis) belongs to the outputs ``o`` with
``o * stride <= i < o * stride + kernel_size``; an output exists when its window holds at
least one valid voxel. Output ``o`` sits at ``(o * stride + 0.5) * voxel_size`` (the first
voxel of its window; for ``kernel_size == stride == 2`` these are the positions of
:func:`jax_sparseconv.downsample`), on a lattice of spacing ``stride * voxel_size``.

Built from the public API only: the output set comes from
:func:`jax_sparseconv.unique_voxels`, the windows from :func:`jax_sparseconv.build_kernel_map`
with the offset ``-(kernel_size - 1) / 2`` (the window ``{p, ..., p + (K-1) voxel_size}``).
Static shapes as everywhere: outputs have a fixed capacity and a valid count.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc

from . import checks, errors
from .errors import ErrorCode

__all__ = ["sparse_max_pool", "sparse_avg_pool", "global_max_pool", "global_avg_pool"]


def _int_arg(name, value):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def _pool(mode, feats, positions, voxel_size, kernel_size, stride, valid, batch, out_capacity):
  kernel_size = _int_arg("kernel_size", kernel_size)
  stride = kernel_size if stride is None else _int_arg("stride", stride)
  positions = checks.check_positions("positions", positions)
  feats = checks.check_float_array("feats", feats)
  n = positions.shape[0]
  if feats.ndim != 2 or feats.shape[0] != n:
    raise ValueError(f"feats must have shape ({n}, C), got {feats.shape}")
  checks.check_voxel_size(voxel_size)
  mask = checks.valid_mask(valid, (n,))
  if batch is not None:
    batch = checks.check_batch("batch", batch, n)
  vs = jnp.asarray(voxel_size, positions.dtype)
  # Candidate outputs of each input, per axis: o in [ceil((i - K + 1) / s), floor(i / s)].
  per_axis = -(-kernel_size // stride)
  idx = jnp.floor(positions / vs)
  first = jnp.floor((idx - kernel_size + 1 + stride - 1) / stride)
  offsets = np.array(list(itertools.product(range(per_axis), repeat=3)), np.float32)  # (P, 3)
  cand = first[:, None, :] + offsets[None]                                       # (n, P, 3)
  inside = jnp.all(cand * stride <= idx[:, None, :], axis=-1) & mask[:, None]
  m = n * len(offsets)
  cand_pos = ((cand * stride + 0.5) * vs).reshape(m, 3)
  cand_ok = inside.reshape(m)
  cand_b = None if batch is None else jnp.repeat(batch, len(offsets))
  capacity = (n if per_axis == 1 else m) if out_capacity is None else int(out_capacity)
  uv = sc.unique_voxels(cand_pos, jnp.zeros((m, 0), positions.dtype), voxel_size,
                        valid=cand_ok, batch=cand_b, capacity=capacity)
  out_pos, count = uv.positions, uv.count
  out_b = None if batch is None else uv.batch
  out_valid = jnp.arange(capacity) < count
  km = sc.build_kernel_map(positions, out_pos, voxel_size, kernel_size,
                           offset=(-(kernel_size - 1) / 2,) * 3, in_valid=mask,
                           out_valid=out_valid, in_batch=batch, out_batch=out_b)
  nbr = km.neighbors                                   # (capacity, K^3), sentinel n
  found = nbr < n
  if mode == "max":
    rows = jnp.concatenate([feats, jnp.full((1, feats.shape[1]), -jnp.inf, feats.dtype)])
    out = jnp.max(jnp.take(rows, nbr, axis=0), axis=1)
  else:
    rows = jnp.concatenate([feats, jnp.zeros((1, feats.shape[1]), feats.dtype)])
    cnt = jnp.sum(found, axis=1, keepdims=True).astype(feats.dtype)
    out = jnp.sum(jnp.take(rows, nbr, axis=0), axis=1) / jnp.maximum(cnt, 1)
  any_found = jnp.any(found, axis=1, keepdims=True)
  out = jnp.where(out_valid[:, None] & any_found, out, jnp.zeros((), feats.dtype))
  # Under jit an error (e.g. too small a capacity) cannot raise: poison the results.
  out, out_pos = errors.poison(out, km.flags), errors.poison(out_pos, km.flags)
  if batch is None:
    return out, out_pos, count
  return out, out_pos, out_b, count


def sparse_max_pool(feats, positions, voxel_size, kernel_size: int = 2, stride: int | None = None,
                    *, valid=None, batch=None, out_capacity: int | None = None):
  """Sparse max pooling over ``kernel_size``-cube windows with a ``stride``.

  spconv's ``SparseMaxPool3d(kernel_size, stride)`` (padding 0) on the voxel lattice;
  Open3D's ``VoxelPooling(feature_fn='max')`` is the ``kernel_size == stride`` case. Each
  output takes the channel-wise maximum of the valid voxels in its window.

  Args:
    feats: ``(n, C)`` features.
    positions: ``(n, 3)`` voxel positions ``[x, y, z]`` (centres ``(i + 0.5) * voxel_size``;
      the voxel of ``p`` is ``floor(p / voxel_size)``), unique per cloud.
    voxel_size: the input lattice spacing.
    kernel_size: window edge in voxels (static).
    stride: window step in voxels (static); default ``kernel_size``.
    valid: optional count or bool ``(n,)`` mask of valid rows.
    batch: optional int ``(n,)`` cloud index (packed batch): windows never mix clouds.
    out_capacity: static number of output rows; default ``n`` when
      ``kernel_size <= stride``, else ``n * ceil(kernel_size / stride)**3`` (always enough).

  Returns:
    ``(out_feats, out_positions, count)``, or with ``batch`` ``(out_feats, out_positions,
    out_batch, count)``: ``out_capacity`` rows, the first ``count`` valid (padding: zero
    features, NaN positions, as :func:`jax_sparseconv.unique_voxels`). Output positions are
    ``(o * stride + 0.5) * voxel_size``, a lattice of spacing ``stride * voxel_size``. Too
    small an ``out_capacity`` follows the library's error rule (an error outside ``jit``,
    NaN inside).

  >>> import jax.numpy as jnp
  >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  >>> f, p, k = sparse_max_pool(jnp.array([[1.0], [3.0], [2.0]]), pos, 1.0, 2)
  >>> int(k), f[:2, 0].tolist(), p[:2, 0].tolist()
  (2, [3.0, 2.0], [0.5, 2.5])
  """
  return _pool("max", feats, positions, voxel_size, kernel_size, stride, valid, batch,
               out_capacity)


def sparse_avg_pool(feats, positions, voxel_size, kernel_size: int = 2, stride: int | None = None,
                    *, valid=None, batch=None, out_capacity: int | None = None):
  """Sparse average pooling: the mean over the valid voxels of each window (spconv's
  ``SparseAvgPool3d`` divides by the number of active inputs; Open3D's
  ``VoxelPooling(feature_fn='average')`` is ``kernel_size == stride``). Arguments and
  results as :func:`sparse_max_pool`.

  >>> import jax.numpy as jnp
  >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  >>> f, p, k = sparse_avg_pool(jnp.array([[1.0], [3.0], [2.0]]), pos, 1.0, 2)
  >>> f[:2, 0].tolist()
  [2.0, 2.0]
  """
  return _pool("avg", feats, positions, voxel_size, kernel_size, stride, valid, batch,
               out_capacity)


def _global(mode, feats, valid, batch, num_clouds):
  feats = checks.check_float_array("feats", feats)
  if feats.ndim not in (2, 3):
    raise ValueError(f"feats must have shape (n, C) or (B, n, C), got {feats.shape}")
  mask = checks.valid_mask(valid, feats.shape[:-1])
  if batch is not None:
    if feats.ndim != 2:
      raise ValueError(f"batch goes with packed (n, C) features, got feats {feats.shape}")
    if (num_clouds is None or isinstance(num_clouds, bool)
        or not isinstance(num_clouds, (int, np.integer)) or num_clouds < 1):
      raise ValueError(f"num_clouds (static, >= 1) is required with batch, got {num_clouds!r}")
    batch = checks.check_batch("batch", batch, feats.shape[0])
    # A valid row of no cloud would silently drop out of every result: the error rule.
    flags = errors.bit(mask & ((batch < 0) | (batch >= num_clouds)), ErrorCode.BAD_BATCH)
    errors.report(flags, f"global_{mode}_pool")
    seg = jnp.where(mask, batch, num_clouds)
    if mode == "max":
      out = jax.ops.segment_max(feats, seg, num_segments=num_clouds)
      count = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=num_clouds)
      out = jnp.where(count[:, None] > 0, out, jnp.zeros((), feats.dtype))
    else:
      sums = jax.ops.segment_sum(jnp.where(mask[:, None], feats, 0), seg,
                                 num_segments=num_clouds)
      count = jax.ops.segment_sum(mask.astype(feats.dtype), seg, num_segments=num_clouds)
      out = sums / jnp.maximum(count, 1)[:, None]
    return errors.poison(out, flags)
  m = mask[..., None]
  count = jnp.sum(mask, axis=-1)[..., None]
  if mode == "max":
    out = jnp.max(jnp.where(m, feats, -jnp.inf), axis=-2, initial=-jnp.inf)
    return jnp.where(count > 0, out, jnp.zeros((), feats.dtype))
  return jnp.sum(jnp.where(m, feats, 0), axis=-2) / jnp.maximum(count, 1).astype(feats.dtype)


def global_max_pool(feats, *, valid=None, batch=None, num_clouds: int | None = None):
  """Channel-wise maximum over each cloud's valid rows (an empty cloud gives 0).

  Args:
    feats: ``(n, C)`` (one cloud, or a packed batch with ``batch``) or ``(B, n, C)``
      (padded clouds).
    valid: optional count(s) or bool mask of valid rows: ``()`` / ``(n,)`` for ``(n, C)``,
      ``(B,)`` / ``(B, n)`` for ``(B, n, C)``.
    batch: optional int ``(n,)`` cloud index of each row (packed batch).
    num_clouds: static number of clouds, required with ``batch``.

  Returns:
    ``(C,)`` for one cloud, ``(num_clouds, C)`` for a packed batch, ``(B, C)`` for padded
    clouds.

  >>> import jax.numpy as jnp
  >>> f = jnp.array([[1.0], [5.0], [3.0]])
  >>> global_max_pool(f, batch=jnp.array([0, 1, 0]), num_clouds=2).ravel().tolist()
  [3.0, 5.0]
  """
  return _global("max", feats, valid, batch, num_clouds)


def global_avg_pool(feats, *, valid=None, batch=None, num_clouds: int | None = None):
  """Channel-wise mean over each cloud's valid rows (an empty cloud gives 0); arguments as
  :func:`global_max_pool`.

  >>> import jax.numpy as jnp
  >>> f = jnp.array([[[1.0], [5.0], [9.0]], [[2.0], [4.0], [0.0]]])
  >>> global_avg_pool(f, valid=jnp.array([3, 2])).ravel().tolist()
  [5.0, 3.0]
  """
  return _global("avg", feats, valid, batch, num_clouds)

