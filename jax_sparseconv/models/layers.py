"""Building blocks of Open3D-ML's ``SparseConvUnet`` on the library's levels and layers.

Everything geometric is the core's: voxels and mean features come from the voxel utility
(``voxelize.py``), coarse levels from :meth:`SparseTensor.down` (the ``"floor"`` rule:
parent ``floor(i / 2)``, Open3D-ML's ``calculate_grid``), kernel maps from the lookup
(:meth:`SparseTensor.kernel_map`, :func:`jax_sparseconv.build_kernel_map`); every conv is a
:mod:`jax_sparseconv.linen` layer through a given map, and value errors follow the one
error rule (``errors.py``). What is left here is Open3D-ML's own conventions:

* :func:`input_layer` / :func:`output_layer`: Open3D-ML's ``InputLayer`` (points ->
  unique voxels with the mean of their points' features, in Open3D-ML's row order, and
  the point -> voxel map) and ``OutputLayer`` (voxel -> point gather).
* :class:`Open3DVoxels`: a level's voxels as Open3D-ML's layers see them (its positions
  ``i + 0.5`` at level 0 and ``j + 0.25`` below); :meth:`Open3DVoxels.tensor` is the
  level as a :class:`~jax_sparseconv.SparseTensor`.
* :func:`calculate_grid`, :func:`level_kernel_maps`: a level's coarse level and its maps
  (thin calls of the core).
* Flax modules: :class:`SparseBatchNorm` (statistics over the valid rows only, torch's
  train-mode semantics; shared by every model of this package), the bias-free convs of
  Open3D-ML through a given map (:class:`SubmanifoldSparseConv`, :class:`Convolution`,
  :class:`DeConvolution`: :class:`jax_sparseconv.linen.SparseConv` called with
  ``kernel_map=``), :class:`NetworkInNetwork` and :class:`ResidualBlock`.

Integer voxel coordinates are ``[x, y, z]`` int32 (voxel size 1). Several clouds are one
packed set (:meth:`Open3DVoxels.concatenate`: the cloud index enters every sort and
search). Capacities are static Python ints; everything works under ``jit``/``vmap``/``grad``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import linen as sl
from jax_sparseconv._src import checks, errors
from jax_sparseconv._src.errors import ErrorCode
from jax_sparseconv._src.voxelize import unique_voxels_flagged

__all__ = [
    "Open3DVoxels", "Open3DMaps", "input_layer", "output_layer", "calculate_grid",
    "level_kernel_maps", "SparseBatchNorm", "NetworkInNetwork", "ResidualBlock",
    "SubmanifoldSparseConv", "Convolution", "DeConvolution",
]

#: Open3D-ML's grids are at most 4096 voxels wide (its ``preprocess`` keeps ``[0, 4096)``);
#: :func:`input_layer` reports coordinates spanning this many voxels or more as
#: ``OUT_OF_RANGE`` (far below the core's own limit of ``2**20``).
MAX_SPAN = 1 << 16


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["coords", "batch", "valid"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Open3DVoxels:
  """A level's voxels as Open3D-ML's layers see them (a pytree; no geometry is computed
  on it: that is the :class:`~jax_sparseconv.SparseTensor` of :meth:`tensor`).

  Attributes:
    coords: int32 ``(capacity, 3)`` integer voxel coordinates ``[x, y, z]``; padding 0.
    batch: int32 ``(capacity,)`` cloud index of each voxel (0 for a single cloud).
    valid: bool ``(capacity,)``, True for the voxels.
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
    """float32 ``(capacity, 3)`` positions ``coords + fraction`` (Open3D-ML keeps level 0
    at ``i + 0.5`` and every coarser level at ``j + 0.25``)."""
    return self.coords.astype(jnp.float32) + jnp.float32(fraction)

  @classmethod
  def of(cls, t: sc.SparseTensor) -> "Open3DVoxels":
    """The voxels of a level."""
    b = jnp.zeros(t.valid.shape, jnp.int32) if t.batch is None else t.batch
    return cls(coords=t.coords, batch=b, valid=t.valid)

  def tensor(self, feats=None, *, batched: bool = True) -> sc.SparseTensor:
    """The level as a :class:`~jax_sparseconv.SparseTensor` (voxel size 1, voxel ``i`` at
    ``i + 0.5``), with ``feats`` (default: no channels); ``batched=False`` drops the cloud
    index (one cloud)."""
    n = self.coords.shape[0]
    feats = jnp.zeros((n, 0), jnp.float32) if feats is None else feats
    one = jnp.ones((3,), jnp.float32)
    return sc.SparseTensor(feats=feats, coords=self.coords, valid=self.valid,
                           batch=self.batch if batched else None, voxel_size=one,
                           origin=0.5 * one, flags=jnp.int32(0), maps={})

  @staticmethod
  def concatenate(clouds) -> "Open3DVoxels":
    """Several clouds' voxels as one packed set, cloud ``b`` getting batch index ``b``
    (its rows at the static offset ``b * capacity`` when capacities agree)."""
    return Open3DVoxels(
        coords=jnp.concatenate([c.coords for c in clouds]),
        batch=jnp.concatenate([jnp.full(c.batch.shape, b, jnp.int32)
                               for b, c in enumerate(clouds)]),
        valid=jnp.concatenate([c.valid for c in clouds]))


class Open3DMaps(NamedTuple):
  """The kernel maps of one level, built once and shared by all its layers: ``subm``
  (``K=3``, the level to itself), ``down`` (``K=2``, to the next coarser level, or None)
  and ``up`` (``down.transposed()``, back: no second search)."""
  subm: sc.KernelMap
  down: sc.KernelMap | None = None
  up: sc.KernelMap | None = None


def _as_batch(batch, n):
  if batch is None:
    return jnp.zeros((n,), jnp.int32)
  return checks.check_batch("batch", batch, n)


def input_layer(points, feats, *, valid=None, batch=None, capacity: int | None = None):
  """Open3D-ML's ``InputLayer``: points -> unique voxels with mean features.

  A point at ``p`` (voxel units) falls in voxel ``floor(p)``; each voxel's feature is the
  mean of its points' features (the core's :func:`~jax_sparseconv.voxelize`). The voxels
  come in Open3D-ML's order: ascending ``x + X * (y + Y * z)`` within each cloud, i.e.
  sorted by ``(batch, z, y, x)``. Each point's voxel is found by a ``K=1`` kernel-map
  lookup.

  Args:
    points: float ``(n, 3)`` positions ``[x, y, z]`` in voxel units.
    feats: float ``(n, C)`` point features.
    valid: optional int count or bool ``(n,)`` mask; invalid rows are ignored (their
      values may be anything, NaN included).
    batch: optional int ``(n,)`` cloud index per point (packed batch).
    capacity: static number of voxel rows; default ``n`` (always enough).

  Returns:
    ``(voxels, voxel_feats, index_map, flags)``: :class:`Open3DVoxels` of ``capacity``
    rows, float ``(capacity, C)`` mean features (0 on padding), int32 ``(n,)`` voxel row
    of each point (``capacity`` for invalid points), and the int32 :class:`ErrorCode`
    bits (``CAPACITY_OVERFLOW``, ``NONFINITE_POSITION``, ``OUT_OF_RANGE`` for spans of
    :data:`MAX_SPAN` voxels or more), *not* reported: like the core's ``generate`` this
    is a building block whose caller applies the error rule (``errors.report``), as
    :class:`~jax_sparseconv.models.SparseConvUnet` does. Results with flags set are
    incomplete.

  >>> import jax.numpy as jnp
  >>> pts = jnp.array([[1.5, 0.5, 0.5], [0.5, 0.5, 0.5], [1.2, 0.9, 0.1]])
  >>> vox, f, idx, err = input_layer(pts, jnp.array([[1.0], [2.0], [3.0]]))
  >>> int(vox.count), vox.coords[:2].tolist(), f[:2, 0].tolist(), idx.tolist(), int(err)
  (2, [[0, 0, 0], [1, 0, 0]], [2.0, 2.0], [1, 0, 1], 0)
  """
  points = checks.check_positions("points", points)
  feats = checks.check_float_array("feats", feats, 2)
  n = points.shape[0]
  if feats.shape[0] != n:
    raise ValueError(f"feats must have shape ({n}, C), got {feats.shape}")
  cap = n if capacity is None else checks.check_capacity(capacity)
  return _input_layer(points, feats, checks.valid_mask(valid, (n,)), _as_batch(batch, n),
                      capacity=cap)


@functools.partial(jax.jit, static_argnames=("capacity",))
def _input_layer(points, feats, mask, batch, *, capacity):
  with errors.error_mode("flag"):  # the flags are returned, the caller reports them
    centres = jnp.floor(jnp.where(mask[:, None], points, 0)) + 0.5
    centres = jnp.where(mask[:, None], centres, jnp.nan)
    (pos, vfeats, vbatch, count), flags = unique_voxels_flagged(
        centres, feats, 1.0, valid=mask, batch=batch, capacity=capacity)
    vvalid = jnp.arange(capacity) < count
    finite = jnp.all(jnp.isfinite(pos), axis=-1) & vvalid
    coords = jnp.where(finite[:, None], jnp.floor(jnp.where(finite[:, None], pos, 0)), 0)
    coords = coords.astype(jnp.int32)
    # Open3D-ML's row order: (batch, z, y, x), the padding last.
    order = jnp.lexsort((coords[:, 0], coords[:, 1], coords[:, 2], vbatch, ~vvalid))
    coords, vbatch, vfeats = coords[order], vbatch[order], vfeats[order]
    big = jnp.int32(2**30)
    lo = jnp.min(jnp.where(vvalid[:, None], coords, big), axis=0)
    hi = jnp.max(jnp.where(vvalid[:, None], coords, -big), axis=0)
    flags |= errors.bit(vvalid & jnp.any(hi - lo >= MAX_SPAN), ErrorCode.OUT_OF_RANGE)
    # each point's voxel: a K=1 lookup of the point's voxel centre among the voxels
    km = sc.build_kernel_map(coords.astype(jnp.float32) + 0.5, jnp.where(
        mask[:, None], centres, 0.5), 1.0, 1, in_valid=vvalid, out_valid=mask,
        in_batch=vbatch, out_batch=batch)
    index = jnp.where(mask, km.neighbors[:, 0], capacity)
    vox = Open3DVoxels(coords=coords, batch=jnp.where(vvalid, vbatch, 0), valid=vvalid)
  # the lookup's own flags only when the voxels were sound (else it repeats their error)
  return vox, jnp.where(vvalid[:, None], vfeats, 0), index, flags | jnp.where(
      flags != 0, 0, km.flags)


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


def calculate_grid(voxels: Open3DVoxels, capacity: int | None = None):
  """The stride-2 coarse grid of Open3D-ML's ``Convolution`` (``calculate_grid``): the
  level :meth:`SparseTensor.down` makes (the ``"floor"`` rule, kernel 2, stride 2: parent
  ``j = floor(i / 2)``, the child entering through kernel cell ``i - 2j``).

  Args:
    voxels: the fine :class:`Open3DVoxels`.
    capacity: static number of coarse rows; default the fine capacity.

  Returns:
    ``(coarse, parent, flags)``: the coarse :class:`Open3DVoxels` (in the core's key
    order), int32 ``(fine capacity,)`` the coarse row of each fine voxel (``capacity`` on
    padding), and the unreported :class:`ErrorCode` bits (``CAPACITY_OVERFLOW`` when
    ``capacity`` is too small; see :func:`input_layer`).

  >>> import jax.numpy as jnp
  >>> fine = Open3DVoxels(jnp.array([[0, 0, 0], [1, 1, 0], [2, 0, 0]]), jnp.zeros(3, jnp.int32),
  ...                     jnp.ones(3, bool))
  >>> coarse, parent, err = calculate_grid(fine)
  >>> int(coarse.count), sorted(coarse.coords[:2].tolist()), int(err)
  (2, [[0, 0, 0], [1, 0, 0]], 0)
  """
  cap = voxels.capacity if capacity is None else checks.check_capacity(capacity)
  return _calculate_grid(voxels, capacity=cap)


@functools.partial(jax.jit, static_argnames=("capacity",))
def _calculate_grid(voxels, *, capacity):
  with errors.error_mode("flag"):
    coarse = voxels.tensor().down(2, 2, capacity=capacity)
    km = coarse.maps["down"]
    parent = jnp.min(km.inverse, axis=-1)  # each fine voxel feeds exactly one parent
  return Open3DVoxels.of(coarse), parent, coarse.flags


def level_kernel_maps(fine: Open3DVoxels, coarse: Open3DVoxels | None = None, *,
                      batched: bool = False) -> Open3DMaps:
  """The kernel maps of one level (Open3D-ML re-runs its search for every conv; here
  each level's maps are built once and shared by all its layers).

  Positions are in this level's voxel units: voxel ``i`` at ``i + 0.5`` and, for the down
  map, its parent ``j`` at ``2j + 0.5`` (Open3D-ML's output positions before it halves
  them).

  Args:
    fine: this level's voxels.
    coarse: the next coarser level (:func:`calculate_grid`), or None.
    batched: static; True for packed sets of several clouds (no window spans two).

  Returns:
    :class:`Open3DMaps`: ``subm`` (``K=3``: voxel ``i`` reads ``i + d`` through
    ``kernel[dz+1, dy+1, dx+1]``, :meth:`SparseTensor.kernel_map`), ``down`` (``K=2``: the
    parent ``j`` reads the child ``2j + c`` through ``kernel[cz, cy, cx]``) and ``up``
    (its transpose).
  """
  subm = fine.tensor(batched=batched).kernel_map(3)
  if coarse is None:
    return Open3DMaps(subm=subm)
  b = fine.batch if batched else None
  cb = coarse.batch if batched else None
  down = sc.build_kernel_map(fine.positions(), 2 * coarse.coords.astype(jnp.float32) + 0.5,
                             1.0, 2, in_valid=fine.valid, out_valid=coarse.valid, in_batch=b,
                             out_batch=cb)
  return Open3DMaps(subm=subm, down=down, up=down.transposed())


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
    scale_init: default ones.
    bias_init: default zeros.
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



class SubmanifoldSparseConv(sl.SparseConv):
  """Open3D-ML's ``SubmanifoldSparseConv``: the bias-free ``K=3`` conv of a level to
  itself through its ``subm`` map (voxel ``i`` reads ``i + d`` through
  ``kernel[dz+1, dy+1, dx+1]``): :class:`jax_sparseconv.linen.SparseConv` called with
  ``kernel_map=`` (same fields, ``use_bias`` False; Open3D's uniform initialiser).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import jax_sparseconv as sc
    >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
    >>> km = sc.build_kernel_map(pos, pos, 1.0, 3)
    >>> conv = SubmanifoldSparseConv(4)
    >>> v = jax.eval_shape(conv.init, jax.random.key(0), jnp.ones((2, 3)), km)
    >>> jax.tree_util.tree_map(jnp.shape, v)
    {'params': {'kernel': (3, 3, 3, 3, 4)}}
  """
  kernel_size: int = 3
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, kernel_map):
    """``x`` ``(num_in, Cin)`` through ``kernel_map``; returns ``(num_out, filters)``."""
    spec = self._spec()
    return spec.apply(self._params(spec, spec.channels(x)), x, kernel_map=kernel_map)


class Convolution(SubmanifoldSparseConv):
  """Open3D-ML's ``Convolution``: the bias-free stride-2 ``K=2`` conv to the coarse grid
  of :func:`calculate_grid` (parent ``j`` sums ``x[2j + c] @ kernel[cz, cy, cx]``), through
  a level's ``down`` map."""
  kernel_size: int = 2


class DeConvolution(SubmanifoldSparseConv):
  """Open3D-ML's ``DeConvolution``: the bias-free ``K=2`` transposed conv back to the fine
  grid (child ``2j + c`` gets ``x[j] @ kernel[cz, cy, cx]``, kernel
  ``(2, 2, 2, C_coarse, C_fine)``), through a level's ``up`` map
  (:class:`jax_sparseconv.linen.SparseConvTranspose`'s body)."""
  kernel_size: int = 2
  _op = "conv_transpose"


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
    """``x`` ``(n, C)``, its validity mask and the level's ``K=3`` map."""
    bn = functools.partial(SparseBatchNorm, momentum=self.momentum, epsilon=self.epsilon,
                           axis_name=self.axis_name)
    skip = NetworkInNetwork(self.features, name="lin")(x)
    h = bn(name="batch_norm1")(x, valid, train)
    h = SubmanifoldSparseConv(self.features, name="sub_sparse_conv1")(nn.relu(h), kernel_map)
    h = bn(name="batch_norm2")(h, valid, train)
    h = SubmanifoldSparseConv(self.features, name="sub_sparse_conv2")(nn.relu(h), kernel_map)
    return skip + h
