"""Sparse pooling: max/avg/sum pooling over the windows of spconv's conv rule, unpooling,
trilinear devoxelisation (voxels -> points), and global pooling per cloud.

Windows follow spconv's ``SparseMaxPool3d`` / ``SparseAvgPool3d``: the output level is the
one of the regular conv rule (``geometry.py``: output ``o`` with an input at
``o*s - p + k*d``, clipped to the grid when the level has one), made by
:meth:`SparseTensor.conv`, and each output reduces the voxels of its window through that
map. Max pooling keeps negative maxima (spconv's CPU build clamps them to 0: a bug not
copied here); average pooling divides by the number of voxels present (spconv's rule).
Static shapes as everywhere: outputs have a fixed capacity and a valid count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, errors
from .errors import ErrorCode
from .geometry import Geometry, per_axis
from .kernel_map import lattice_map
from .tensor import SparseTensor

__all__ = ["sparse_max_pool", "sparse_avg_pool", "sparse_sum_pool", "level_pool", "unpool",
           "devoxelize", "global_max_pool", "global_avg_pool"]

_MODES = ("max", "avg", "sum")


def _reduce(mode, feats, nbr):
  """Per output row of ``nbr`` (sentinel ``len(feats)``), the max / mean / sum of the
  inputs it reads (0 for an output that reads none)."""
  n = feats.shape[0]
  found = nbr < n
  fill = -jnp.inf if mode == "max" else 0
  rows = jnp.concatenate([feats, jnp.full((1, feats.shape[1]), fill, feats.dtype)])
  gathered = jnp.take(rows, nbr, axis=0, mode="clip")  # (m, S, C)
  if mode == "max":
    out = jnp.max(gathered, axis=1)
  else:
    out = jnp.sum(gathered, axis=1)
    if mode == "avg":
      out = out / jnp.maximum(jnp.sum(found, axis=1, keepdims=True), 1).astype(feats.dtype)
  return jnp.where(jnp.any(found, axis=1, keepdims=True), out, jnp.zeros((), feats.dtype))


def level_pool(mode: str, t: SparseTensor, kernel_size=2, stride=None, padding=0, dilation=1,
               *, key=None, capacity=None) -> SparseTensor:
  """Pooling on a level: the level of the regular conv rule (spconv's ``SparseMaxPool3d``
  / ``SparseAvgPool3d`` output set), each voxel the ``mode`` (``"max"``, ``"avg"``,
  ``"sum"``) of its window's voxels; the map is kept under ``key`` (so :func:`unpool` and
  an inverse conv can go back).

  Per-axis arguments are in the level's index order (:attr:`SparseTensor.axis_order`);
  ``stride`` defaults to ``kernel_size``; ``capacity`` as :meth:`SparseTensor.conv`.

  >>> import jax.numpy as jnp, jax_sparseconv as sc
  >>> from jax_sparseconv.pooling import level_pool
  >>> idx = jnp.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]])   # [b, z, y, x]
  >>> t = sc.SparseTensor.from_indices(idx, jnp.array([[1.0], [-3.0], [-2.0]]), [2, 2, 4], 1)
  >>> p = level_pool("max", t, 2)
  >>> int(p.count), p.feats[:2, 0].tolist(), p.indices()[:2].tolist()
  (2, [1.0, -2.0], [[0, 0, 0, 0], [0, 0, 0, 1]])
  """
  if mode not in _MODES:
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
  order = (lambda v: v) if t.axis_order == "zyx" else (lambda v: v[::-1])  # noqa: E731
  ks = order(per_axis("kernel_size", kernel_size, 1))
  st = ks if stride is None else order(per_axis("stride", stride, 1))
  out = t.conv(ks, st, order(per_axis("padding", padding, 0)),
               order(per_axis("dilation", dilation, 1)), rule="conv", key=key, capacity=capacity)
  (link,) = out.maps.values()
  km = link.kernel_map
  y = _reduce(mode, t.feats, km.neighbors)
  y = jnp.where(out.valid[:, None], y, jnp.zeros((), y.dtype))
  return out.replace(feats=errors.poison(y, km.flags))


def unpool(coarse: SparseTensor, key: str) -> SparseTensor:
  """Back to the level the pooling (or conv) under ``key`` started from: each voxel gets
  the sum of the coarse voxels whose window held it (the transpose of sum pooling; for
  ``kernel_size == stride`` the one coarse voxel above it: MinkowskiEngine's unpooling).
  Voxels no window held get 0."""
  link = coarse.link(key)
  up = link.kernel_map.transposed()
  y = _reduce("sum", coarse.feats, up.neighbors)
  return link.source.replace(feats=errors.poison(y, up.flags))


def devoxelize(t: SparseTensor, points, *, valid=None, batch=None):
  """Trilinear interpolation of a level's features at points (TorchSparse's
  ``spdevoxelize``, PVCNN's voxel -> point): each point reads the up to 8 voxels around
  it (their positions :attr:`SparseTensor.positions` the lattice corners), weights
  ``prod(1 - |p - v| / voxel_size)`` per axis, renormalised over the voxels present (a
  point with none gets 0). Differentiable in the features.

  Args:
    t: the level. points: float ``(P, 3)`` positions ``[x, y, z]`` (metres, as the
      level's positions). valid: count or mask of the valid points. batch: int ``(P,)``
      cloud ids (packed batches; required when the level has them).

  Returns:
    ``(P, C)`` features.
  """
  points = checks.check_positions("points", points)
  n_pts = points.shape[0]
  mask = checks.valid_mask(valid, (n_pts,), "valid")
  if (batch is None) != (t.batch is None):
    raise ValueError("give the points' batch exactly when the level is a packed batch")
  if batch is not None:
    batch = checks.check_batch("batch", batch, n_pts)
  g = (points - t.origin) / t.voxel_size
  finite = jnp.all(jnp.isfinite(g), axis=-1)
  flags = errors.bit(mask & ~finite, ErrorCode.NONFINITE_POSITION)
  base = jnp.floor(jnp.where(finite[:, None], g, 0))
  big = 2.0**30
  flags |= errors.bit(mask & jnp.any(jnp.abs(base) >= big, axis=-1), ErrorCode.OUT_OF_RANGE)
  anchors = jnp.clip(base, -big, big).astype(jnp.int32)
  geo = Geometry("subm", (2, 2, 2))  # corners {0, 1}^3 of the cell below each point
  km = lattice_map(t.coords, t.valid, t.batch, anchors, mask, batch, geo, flags=flags | t.flags,
                   where="devoxelize")
  frac = g - base  # (P, 3) in [0, 1)
  corners = geo.deltas()  # (8, 3) in slot order
  w = jnp.prod(jnp.where(corners[None] == 1, frac[:, None, :], 1 - frac[:, None, :]), axis=-1)
  w = jnp.where(km.neighbors < km.num_in, w, 0).astype(t.feats.dtype)
  w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), jnp.finfo(w.dtype).tiny)
  rows = jnp.concatenate([t.feats, jnp.zeros((1, t.feats.shape[1]), t.feats.dtype)])
  y = jnp.einsum("ps,psc->pc", w, jnp.take(rows, km.neighbors, axis=0, mode="clip"))
  return errors.poison(jnp.where(mask[:, None], y, 0), km.flags)


def _int_arg(name, value):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def _pool(mode, feats, positions, voxel_size, kernel_size, stride, valid, batch, out_capacity):
  positions = checks.check_positions("positions", positions)
  feats = checks.check_float_array("feats", feats)
  n = positions.shape[0]
  if feats.ndim != 2 or feats.shape[0] != n:
    raise ValueError(f"feats must have shape ({n}, C), got {feats.shape}")
  kernel_size = _int_arg("kernel_size", kernel_size)
  stride = kernel_size if stride is None else _int_arg("stride", stride)
  mask = checks.valid_mask(valid, (n,))
  t = SparseTensor.from_voxels(positions, feats, voxel_size, valid=mask, batch=batch)
  per = -(-kernel_size // stride)
  capacity = (n if per == 1 else n * per**3) if out_capacity is None else \
      checks.check_capacity(out_capacity)
  out = level_pool(mode, t, kernel_size, stride, capacity=capacity)
  pos = errors.poison(out.positions, out.flags)
  if batch is None:
    return out.feats, pos, out.count
  return out.feats, pos, out.batch, out.count


def sparse_max_pool(feats, positions, voxel_size, kernel_size: int = 2, stride: int | None = None,
                    *, valid=None, batch=None, out_capacity: int | None = None):
  """Sparse max pooling over ``kernel_size``-cube windows with a ``stride``, on positions.

  spconv's ``SparseMaxPool3d(kernel_size, stride)`` (padding 0) on the voxel lattice;
  Open3D's ``VoxelPooling(feature_fn='max')`` is the ``kernel_size == stride`` case. Each
  output takes the channel-wise maximum of the valid voxels in its window (on levels,
  with padding and dilation: :func:`level_pool`).

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


def sparse_sum_pool(feats, positions, voxel_size, kernel_size: int = 2,
                    stride: int | None = None, *, valid=None, batch=None,
                    out_capacity: int | None = None):
  """Sparse sum pooling (MinkowskiEngine's ``MinkowskiSumPooling``): the sum over the valid
  voxels of each window. Arguments and results as :func:`sparse_max_pool`."""
  return _pool("sum", feats, positions, voxel_size, kernel_size, stride, valid, batch,
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

