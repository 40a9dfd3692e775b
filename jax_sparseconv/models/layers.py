"""Building blocks of Open3D-ML's ``SparseConvUnet``, for static shapes.

Voxel sets are padded to a fixed capacity: a mask says which rows are voxels (the first
``count`` rows for one cloud), the rest are padding (zero coordinates and features).
Everything here works under ``jit``/``vmap``/``grad``; capacities are static Python ints.
The geometric functions (:func:`input_layer`, :func:`calculate_grid`,
:func:`level_kernel_maps`) are jitted: their programs are cached per shape and capacity,
and inlined under an outer ``jit``.

* :func:`input_layer` / :func:`output_layer`: Open3D-ML's ``InputLayer`` (points ->
  unique voxels with the mean of their points' features, and the point -> voxel
  index map) and ``OutputLayer`` (voxel -> point gather).
* :func:`calculate_grid`: the stride-2 coarse grid (parent ``floor(i / 2)``).
* :func:`level_kernel_maps`: a level's kernel maps, built once and reused by all its
  layers (submanifold ``K=3``, the ``K=2`` down map, and its transpose for the way up).
* Flax modules: :class:`SparseBatchNorm` (statistics over the valid rows only, torch's
  train-mode semantics), :class:`SubmanifoldSparseConv`, :class:`Convolution`,
  :class:`DeConvolution` (bias-free convs through a given map), :class:`NetworkInNetwork`
  (the bias-free linear of a residual block) and :class:`ResidualBlock`.

Integer voxel coordinates are ``[x, y, z]`` int32; voxel ``i`` of a level lies at
``i + 0.5`` in that level's units (voxel size 1). Several clouds are one packed set
(:meth:`LevelVoxels.concatenate`: batch indices enter every sort and search), so the
modules take features ``(n, C)`` with a map; ``(B, n, C)`` with maps batched the same
way (``vmap``) works too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv._src import checks

__all__ = [
    "LevelVoxels", "LevelMaps", "input_layer", "output_layer", "calculate_grid",
    "level_kernel_maps", "SparseBatchNorm", "NetworkInNetwork", "ResidualBlock",
    "SubmanifoldSparseConv", "Convolution", "DeConvolution",
]

_SENTINEL = np.uint32(0xFFFFFFFF)
#: Coordinates (relative to the set's minimum) and batch indices must be below this.
MAX_SPAN = 1 << 16


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["coords", "batch", "valid"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LevelVoxels:
  """A padded set of unique voxels of one level (a pytree).

  Attributes:
    coords: int32 ``(capacity, 3)`` integer voxel coordinates ``[x, y, z]``; padding rows 0.
      :func:`input_layer` and :func:`calculate_grid` sort them by ``(batch, z, y, x)``
      (Open3D-ML's voxel order) and put the valid rows first.
    batch: int32 ``(capacity,)`` cloud index of each voxel (0 for a single cloud).
    valid: bool ``(capacity,)``, True for the voxels (False for padding). Sets of several
      clouds concatenated (:meth:`concatenate`) have one valid prefix per cloud.
  """
  coords: jax.Array
  batch: jax.Array
  valid: jax.Array

  @property
  def capacity(self) -> int:
    return self.coords.shape[-2]

  @property
  def count(self) -> jax.Array:
    """int32: the number of voxels."""
    return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)

  def positions(self, fraction: float = 0.5) -> jax.Array:
    """float32 ``(capacity, 3)`` voxel positions ``coords + fraction`` (voxel centres).

    Open3D-ML stores level 0 at ``i + 0.5`` and every coarser level at ``j + 0.25``.
    """
    return self.coords.astype(jnp.float32) + jnp.float32(fraction)

  @staticmethod
  def concatenate(clouds) -> "LevelVoxels":
    """The voxels of several clouds as one packed set, cloud ``b`` getting batch index
    ``b`` (its rows at the static offset ``b * capacity`` when capacities agree)."""
    return LevelVoxels(
        coords=jnp.concatenate([c.coords for c in clouds]),
        batch=jnp.concatenate([jnp.full(c.batch.shape, b, jnp.int32)
                               for b, c in enumerate(clouds)]),
        valid=jnp.concatenate([c.valid for c in clouds]))


def _bit_length(x):
  """Bits needed for the non-negative int32 ``x`` (0 for 0), as uint32."""
  return (32 - jax.lax.clz(x.astype(jnp.uint32))).astype(jnp.uint32)


def _group(coords, batch, valid, capacity: int):
  """Sorts rows by ``(batch, z, y, x)`` and numbers the distinct ones.

  One sort: on a single 32-bit key when the coordinate spans and the batch indices fit in
  31 bits together (XLA sorts one key several times faster than two), else on two words.

  Returns ``(group, voxels, error)``: ``group`` int32 ``(n,)``, the row of each input row's
  voxel in ``voxels`` (``capacity`` for invalid rows and for voxels beyond the capacity);
  ``voxels`` a :class:`LevelVoxels` of ``capacity`` rows; ``error`` a bool scalar, True
  when there are more distinct voxels than ``capacity`` or the coordinates span
  ``MAX_SPAN`` or more (or a batch index is negative or ``>= MAX_SPAN``).
  """
  n = coords.shape[0]
  big = jnp.int32(2**30)
  lo_c = jnp.min(jnp.where(valid[:, None], coords, big), axis=0, initial=big)
  c = jnp.where(valid[:, None], coords - lo_c, 0)
  b = jnp.where(valid, batch, 0)
  in_range = jnp.all((c >= 0) & (c < MAX_SPAN), axis=-1) & (b >= 0) & (b < MAX_SPAN)
  span_error = jnp.any(valid & ~in_range)
  cu = jnp.clip(c, 0, MAX_SPAN - 1).astype(jnp.uint32)
  bu = jnp.clip(b, 0, MAX_SPAN - 1).astype(jnp.uint32)
  hi = jnp.where(valid, (bu << 16) | cu[:, 2], _SENTINEL)
  lo = jnp.where(valid, (cu[:, 1] << 16) | cu[:, 0], _SENTINEL)
  iota = jnp.arange(n, dtype=jnp.int32)
  # The compact key: (b, z, y, x) with just enough bits each.
  nx, ny, nz = (_bit_length(jnp.max(c[:, a], initial=0)) for a in range(3))
  nb = _bit_length(jnp.max(b, initial=0))
  fits = nb + nz + ny + nx <= 31
  key = (bu << (nz + ny + nx)) | (cu[:, 2] << (ny + nx)) | (cu[:, 1] << nx) | cu[:, 0]
  key = jnp.where(valid, key, _SENTINEL)
  perm = jax.lax.cond(
      fits,
      lambda: jax.lax.sort((key, iota), num_keys=1, is_stable=True)[-1],
      lambda: jax.lax.sort((hi, lo, iota), num_keys=2, is_stable=True)[-1])
  shi, slo = jnp.take(hi, perm), jnp.take(lo, perm)
  svalid = jnp.take(valid, perm)
  if n:
    new = jnp.concatenate([jnp.ones((1,), bool), (shi[1:] != shi[:-1]) | (slo[1:] != slo[:-1])])
  else:
    new = jnp.zeros((0,), bool)
  seg = jnp.cumsum(new, dtype=jnp.int32) - 1
  count = jnp.sum(new & svalid, dtype=jnp.int32)
  seg = jnp.where(svalid & (seg < capacity), seg, capacity)
  group = jnp.zeros((n,), jnp.int32).at[perm].set(seg, unique_indices=True)
  ucoords = jnp.zeros((capacity, 3), jnp.int32).at[seg].set(jnp.take(coords, perm, axis=0),
                                                            mode="drop")
  ubatch = jnp.zeros((capacity,), jnp.int32).at[seg].set(jnp.take(batch, perm), mode="drop")
  vox = LevelVoxels(coords=ucoords, batch=ubatch,
                    valid=jnp.arange(capacity, dtype=jnp.int32) < count)
  return group, vox, span_error | (count > capacity)


def _as_batch(batch, n):
  if batch is None:
    return jnp.zeros((n,), jnp.int32)
  batch = jnp.asarray(batch)
  if batch.shape != (n,) or not jnp.issubdtype(batch.dtype, jnp.integer):
    raise ValueError(f"batch must be an integer array of shape ({n},), got {batch.dtype} "
                     f"{batch.shape}")
  return batch.astype(jnp.int32)


def input_layer(points, feats, *, valid=None, batch=None, capacity: int | None = None):
  """Open3D-ML's ``InputLayer``: points -> unique voxels with mean features.

  A point at ``p`` (voxel units) falls in voxel ``floor(p)``. Voxels are found with one
  sort on the integer coordinates (keys ``(batch, z, y, x)``, so the voxel order is
  Open3D-ML's ascending ``x + X * (y + Y * z)`` within each cloud); each voxel's
  feature is the mean of its points' features (their sum divided by their count, in the
  features' dtype, as Open3D-ML computes it).

  Args:
    points: float ``(n, 3)`` positions ``[x, y, z]`` in voxel units (e.g. Open3D-ML's
      pre-processed points ``i + 0.5``).
    feats: float ``(n, C)`` point features.
    valid: optional int count (the first rows are valid) or bool ``(n,)`` mask; invalid
      rows are ignored (their values may be anything, NaN included).
    batch: optional int ``(n,)`` cloud index per point (packed batch): voxels never
      merge across clouds.
    capacity: static number of voxel rows; default ``n`` (always enough).

  Returns:
    ``(voxels, voxel_feats, index_map, error)``: a :class:`LevelVoxels` of ``capacity``
    rows, float ``(capacity, C)`` mean features (0 on padding), int32 ``(n,)`` voxel row
    of each point (``capacity`` for invalid points), and a bool scalar that is True when
    the voxels do not fit in ``capacity`` (or a point is not finite, or coordinates
    span ``2**16`` voxels or more); the results are then incomplete.

  >>> import jax.numpy as jnp
  >>> pts = jnp.array([[1.5, 0.5, 0.5], [0.5, 0.5, 0.5], [1.2, 0.9, 0.1]])
  >>> vox, f, idx, err = input_layer(pts, jnp.array([[1.0], [2.0], [3.0]]))
  >>> int(vox.count), vox.coords[:2].tolist(), f[:2, 0].tolist(), idx.tolist()
  (2, [[0, 0, 0], [1, 0, 0]], [2.0, 2.0], [1, 0, 1])
  """
  points = jnp.asarray(points)
  feats = jnp.asarray(feats)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"points must have shape (n, 3), got {points.shape}")
  n = points.shape[0]
  if feats.ndim != 2 or feats.shape[0] != n:
    raise ValueError(f"feats must have shape ({n}, C), got {feats.shape}")
  return _input_layer(points, feats, checks.valid_mask(valid, (n,)), _as_batch(batch, n),
                      capacity=n if capacity is None else int(capacity))


@functools.partial(jax.jit, static_argnames=("capacity",))
def _input_layer(points, feats, mask, batch, *, capacity):
  n = points.shape[0]
  finite = jnp.all(jnp.isfinite(points), axis=-1)
  lim = jnp.asarray(2.0**30, points.dtype)
  coords = jnp.floor(jnp.clip(jnp.where(finite[:, None], points, 0), -lim, lim)).astype(jnp.int32)
  group, vox, error = _group(coords, batch, mask, capacity)
  error = error | jnp.any(mask & ~finite)
  sums = jax.ops.segment_sum(jnp.where(mask[:, None], feats, 0), group,
                             num_segments=capacity + 1)[:capacity]
  counts = jax.ops.segment_sum(jnp.ones((n,), feats.dtype), group,
                               num_segments=capacity + 1)[:capacity]
  vfeats = sums / jnp.maximum(counts, 1)[:, None]
  return vox, vfeats, group, error


def output_layer(voxel_feats, index_map):
  """Open3D-ML's ``OutputLayer``: each point takes its voxel's row.

  Args:
    voxel_feats: ``(capacity, C)`` per-voxel values (e.g. logits).
    index_map: int ``(n,)`` from :func:`input_layer`; the sentinel ``capacity``
      (invalid points) gives a zero row.

  Returns:
    ``(n, C)``.

  >>> import jax.numpy as jnp
  >>> output_layer(jnp.array([[1.0], [2.0]]), jnp.array([1, 0, 2])).ravel().tolist()
  [2.0, 1.0, 0.0]
  """
  voxel_feats = jnp.asarray(voxel_feats)
  padded = jnp.concatenate([voxel_feats, jnp.zeros((1,) + voxel_feats.shape[1:],
                                                   voxel_feats.dtype)])
  return jnp.take(padded, jnp.asarray(index_map), axis=0, mode="clip")


@functools.partial(jax.jit, static_argnames=("capacity",))
def calculate_grid(voxels: LevelVoxels, capacity: int | None = None):
  """The stride-2 coarse grid of Open3D-ML's ``Convolution`` (``calculate_grid``).

  Voxel ``i`` has the parent ``j = floor(i / 2)`` (per axis, on the integer lattice;
  Open3D-ML then stores the parent at ``j + 0.25``, its output position ``2j + 0.5``
  halved). The child ``i`` enters the parent through kernel cell ``i - 2j`` of a ``K=2``
  conv: in the fine level's units the parent sits at ``2j + 0.5``, which is what
  ``jax_sparseconv.downsample(positions, 1.0)`` gives, and the default ``K=2`` offset
  covers ``{2j, 2j + 1}``.

  Args:
    voxels: the fine :class:`LevelVoxels`.
    capacity: static number of coarse rows; default the fine capacity.

  Returns:
    ``(coarse, parent, error)``: the coarse :class:`LevelVoxels` (sorted by
    ``(batch, z, y, x)``), int32 ``(fine capacity,)`` the coarse row of each fine voxel
    (``capacity`` on padding), and a bool scalar, True when ``capacity`` is too small.

  >>> import jax.numpy as jnp
  >>> fine = LevelVoxels(jnp.array([[0, 0, 0], [1, 1, 0], [2, 0, 0]]), jnp.zeros(3, jnp.int32),
  ...                    jnp.ones(3, bool))
  >>> coarse, parent, err = calculate_grid(fine)
  >>> int(coarse.count), coarse.coords[:2].tolist(), parent.tolist()
  (2, [[0, 0, 0], [1, 0, 0]], [0, 0, 1])
  """
  capacity = voxels.capacity if capacity is None else int(capacity)
  parents = jnp.floor_divide(voxels.coords, 2)
  parent, coarse, error = _group(parents, voxels.batch, voxels.valid, capacity)
  return coarse, parent, error


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["subm", "down", "up"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LevelMaps:
  """The kernel maps of one level, built once and shared by all its layers.

  Attributes:
    subm: ``K=3`` map from the level to itself (submanifold convs).
    down: ``K=2`` map from the level to the next coarser one (``Convolution``), or None
      for the coarsest level.
    up: ``K=2`` map with ``transpose=True`` from the coarser level back to this one
      (``DeConvolution``): ``down.transposed()``, no second search.
  """
  subm: sc.KernelMap
  down: sc.KernelMap | None = None
  up: sc.KernelMap | None = None


@functools.partial(jax.jit, static_argnames=("batched",))
def level_kernel_maps(fine: LevelVoxels, coarse: LevelVoxels | None = None, *,
                      batched: bool = False) -> LevelMaps:
  """The kernel maps of one level (Open3D-ML re-runs its search for every conv).

  All positions are in this level's voxel units (voxel size 1): voxel ``i`` at ``i + 0.5``,
  and, for the down map, its parent ``j`` at ``2j + 0.5`` (the output positions of
  Open3D-ML's ``Convolution`` before it halves them).

  Args:
    fine: this level's voxels.
    coarse: the next coarser level (from :func:`calculate_grid`), or None.
    batched: static; True for packed sets of several clouds (``batch`` enters the
      search, so no window spans two clouds).

  Returns:
    A :class:`LevelMaps`: ``subm`` (``K=3``: voxel ``i`` reads ``i + d`` through
    ``kernel[dz+1, dy+1, dx+1]``), ``down`` (``K=2``: the parent ``j`` reads the child
    ``2j + c`` through ``kernel[cz, cy, cx]``) and ``up`` (``K=2`` transposed: the child
    ``2j + c`` reads its parent through ``kernel[cz, cy, cx]``).
  """
  pos = fine.positions()
  b = fine.batch if batched else None
  subm = sc.build_kernel_map(pos, pos, 1.0, 3, in_valid=fine.valid, out_valid=fine.valid,
                             in_batch=b, out_batch=b)
  if coarse is None:
    return LevelMaps(subm=subm)
  cpos = 2 * coarse.coords.astype(jnp.float32) + 0.5  # parents at 2j + 0.5 in fine units
  cb = coarse.batch if batched else None
  down = sc.build_kernel_map(pos, cpos, 1.0, 2, in_valid=fine.valid, out_valid=coarse.valid,
                             in_batch=b, out_batch=cb)
  if hasattr(down, "transposed"):
    up = down.transposed()
  else:  # older jax_sparseconv: a second search
    up = sc.build_kernel_map(cpos, pos, 1.0, 2, transpose=True, in_valid=coarse.valid,
                             out_valid=fine.valid, in_batch=cb, out_batch=b)
  return LevelMaps(subm=subm, down=down, up=up)


def _per_cloud(fn, x, *rest):
  """``fn(x, *rest)`` for ``x`` of rank 2, ``vmap`` of it over a leading cloud axis."""
  if x.ndim == 2:
    return fn(x, *rest)
  if x.ndim == 3:
    return jax.vmap(fn)(x, *rest)
  raise ValueError(f"features must have shape (n, C) or (B, n, C), got {x.shape}")


class SparseBatchNorm(nn.Module):
  """BatchNorm over the valid rows of sparse features (Open3D-ML's ``BatchNormBlock``).

  Statistics run over the rows where ``valid`` is True, over all clouds of a
  ``(B, n, C)`` batch (Open3D-ML concatenates the clouds), and over the named
  ``vmap``/``pmap`` axis when ``axis_name`` is set. Padded rows never enter them and
  come out as 0. Train mode follows torch: normalise with the biased batch variance,
  update ``var`` with the unbiased one; ``momentum`` is Flax's (0.99 = torch's 0.01).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> bn = SparseBatchNorm()
    >>> x, valid = jnp.arange(8.0).reshape(4, 2), jnp.array([True, True, True, False])
    >>> v = bn.init(jax.random.key(0), x, valid)
    >>> jax.tree_util.tree_map(jnp.shape, v)
    {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
    >>> y, upd = bn.apply(v, x, valid, train=True, mutable=["batch_stats"])
    >>> mean = np.asarray(upd["batch_stats"]["mean"], float)
    >>> np.asarray(y[:, 0], float).round(4).tolist(), mean.round(4).tolist()
    ([-1.2247, 0.0, 1.2247, 0.0], [0.02, 0.03])

  Attributes:
    momentum: running-average decay (Flax convention), default 0.99.
    epsilon: added to the variance, default 1e-4 (Open3D-ML's).
    axis_name: optional ``vmap``/``pmap`` axis over which statistics are pooled.
    dtype, param_dtype: computation and parameter dtypes.
    scale_init, bias_init: default ones and zeros.
  """
  momentum: float = 0.99
  epsilon: float = 1e-4
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, valid=None, train: bool = False):
    """``x``: ``(n, C)`` or ``(B, n, C)``; ``valid``: bool mask of ``x.shape[:-1]``, int
    count(s) or None (all rows valid). Returns ``x``'s shape."""
    c = x.shape[-1]
    mask = checks.valid_mask(valid, x.shape[:-1])[..., None]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    x = x.astype(dtype)
    axes = tuple(range(x.ndim - 1))

    if train:
      def total(v):
        return v if self.axis_name is None else jax.lax.psum(v, self.axis_name)
      n = total(jnp.sum(mask, dtype=jnp.float32)).astype(dtype)
      n1 = jnp.maximum(n, 1)
      mean = total(jnp.sum(jnp.where(mask, x, 0), axis=axes)) / n1
      var = total(jnp.sum(jnp.where(mask, jnp.square(x - mean), 0), axis=axes)) / n1
      if not self.is_initializing():
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * jax.lax.stop_gradient(mean))
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * jax.lax.stop_gradient(unbiased))
    else:
      mean, var = ra_mean.value.astype(dtype), ra_var.value.astype(dtype)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(dtype)
    add = bias.astype(dtype) - mean * mul
    return jnp.where(mask, x * mul + add, 0)


class NetworkInNetwork(nn.Module):
  """Per-voxel bias-free linear map ``x @ kernel`` (Open3D-ML's ``NetworkInNetwork``);
  the identity, with no parameters, when the channel counts agree.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> nin = NetworkInNetwork(4)
    >>> v = nin.init(jax.random.key(0), jnp.ones((3, 8)))
    >>> jax.tree_util.tree_map(jnp.shape, v)
    {'params': {'kernel': (8, 4)}}

  Attributes:
    features: output channels. The torch ``linear.weight`` ``(out, in)`` is ``kernel.T``.
    kernel_init: default Flax's lecun normal.
  """
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    if x.shape[-1] == self.features:
      return x
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    return x @ kernel.astype(x.dtype)


def _uniform(scale):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class _MapConv(nn.Module):
  """A bias-free sparse conv through a precomputed kernel map (one ``kernel`` parameter,
  Open3D's ``(Kz, Ky, Kx, Cin, Cout)``)."""
  filters: int
  kernel_size: int = 3
  transpose: bool = False
  kernel_init: Callable = _uniform(0.05)

  @nn.compact
  def __call__(self, x, kernel_map):
    """``x``: ``(num_in, Cin)`` with a :class:`jax_sparseconv.KernelMap`, or
    ``(B, num_in, Cin)`` with a map batched over the same leading axis. Returns
    ``(num_out, filters)`` / ``(B, num_out, filters)``."""
    ks = (self.kernel_size,) * 3
    kernel = self.param("kernel", self.kernel_init, (*ks, x.shape[-1], self.filters))
    fn = sc.sparse_conv_transpose if self.transpose else sc.sparse_conv

    def conv(xi, km):
      # With a kernel map the positions only serve the shape checks.
      pin = jnp.zeros((km.num_in, 3), jnp.float32)
      pout = jnp.zeros((km.neighbors.shape[-2], 3), jnp.float32)
      return fn({"kernel": kernel.astype(xi.dtype)}, xi, pin, pout, 1.0, kernel_map=km)

    return _per_cloud(conv, x, kernel_map)


class SubmanifoldSparseConv(_MapConv):
  """Open3D-ML's ``SubmanifoldSparseConv``: a bias-free ``K=3`` conv from a level to
  itself (voxel ``i`` reads ``i + d`` through ``kernel[dz+1, dy+1, dx+1]``), through the
  level's ``subm`` map.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import jax_sparseconv as sc
    >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
    >>> km = sc.build_kernel_map(pos, pos, 1.0, 3)
    >>> conv = SubmanifoldSparseConv(4)
    >>> v = jax.eval_shape(conv.init, jax.random.key(0), jnp.ones((2, 3)), km)
    >>> jax.tree_util.tree_map(jnp.shape, v)
    {'params': {'kernel': (3, 3, 3, 3, 4)}}

  Attributes:
    filters: output channels.
    kernel_size: default 3 (the map must have been built for it).
    kernel_init: default uniform in [-0.05, 0.05] (Open3D's).
  """


class Convolution(_MapConv):
  """Open3D-ML's ``Convolution``: the bias-free stride-2 ``K=2`` conv to the coarse grid
  of :func:`calculate_grid` (parent ``j`` sums ``x[2j + c] @ kernel[cz, cy, cx]``), through
  a level's ``down`` map. Attributes as :class:`SubmanifoldSparseConv` (``kernel_size`` 2)."""
  kernel_size: int = 2


class DeConvolution(_MapConv):
  """Open3D-ML's ``DeConvolution``: the bias-free ``K=2`` transposed conv back to the
  fine grid (child ``2j + c`` gets ``x[j] @ kernel[cz, cy, cx]``, kernel
  ``(2, 2, 2, C_coarse, C_fine)``), through a level's ``up`` map (built with
  ``transpose=True``)."""
  kernel_size: int = 2
  transpose: bool = True


class ResidualBlock(nn.Module):
  """Open3D-ML's pre-activation ``ResidualBlock``::

      out = lin(x) + subm2(relu(bn2(subm1(relu(bn1(x))))))

  ``lin`` is :class:`NetworkInNetwork` (identity when the channels agree); ``subm1``,
  ``subm2`` are ``K=3`` submanifold convs through the level's map.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import jax_sparseconv as sc
    >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
    >>> km = sc.build_kernel_map(pos, pos, 1.0, 3)
    >>> block = ResidualBlock(4)
    >>> v = jax.eval_shape(block.init, jax.random.key(0), jnp.ones((2, 8)), jnp.ones(2, bool), km)
    >>> sorted(v["params"]), v["params"]["lin"]["kernel"].shape
    (['batch_norm1', 'batch_norm2', 'lin', 'sub_sparse_conv1', 'sub_sparse_conv2'], (8, 4))

  Attributes:
    features: output channels.
    momentum, epsilon, axis_name: of the two :class:`SparseBatchNorm`.
  """
  features: int
  momentum: float = 0.99
  epsilon: float = 1e-4
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, valid, kernel_map, train: bool = False):
    """``x`` ``(n, C)`` / ``(B, n, C)``, its validity mask and the level's ``K=3`` map."""
    bn = functools.partial(SparseBatchNorm, momentum=self.momentum, epsilon=self.epsilon,
                           axis_name=self.axis_name)
    skip = NetworkInNetwork(self.features, name="lin")(x)
    h = bn(name="batch_norm1")(x, valid, train)
    h = SubmanifoldSparseConv(self.features, name="sub_sparse_conv1")(nn.relu(h), kernel_map)
    h = bn(name="batch_norm2")(h, valid, train)
    h = SubmanifoldSparseConv(self.features, name="sub_sparse_conv2")(nn.relu(h), kernel_map)
    return skip + h
