"""A level of a sparse network: voxels, their features, and the kernel maps that reuse them.

:class:`SparseTensor` bundles what every layer of one resolution needs (positions,
validity, cloud ids, voxel size) with the kernel maps built for it, so that a network
reads one line per layer, as spconv's ``SparseConvTensor`` + ``indice_key`` do. It is
bookkeeping only: every map comes from :func:`build_kernel_map` and every conv is
:func:`sparse_conv` / :func:`sparse_conv_transpose` (the Linen layers
``SubMConv`` / ``DownConv`` / ``UpConv`` call them).

Maps are built when you ask for them, not behind your back: :meth:`with_kernel_map`
returns a tensor that carries its submanifold map, :meth:`down` a coarse tensor that
carries the down-sampling map and its transpose (the up-sampling map, without a second
search). Build a hierarchy once per cloud (inside or outside ``jit``) and pass it to
the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from . import checks
from .kernel_map import KernelMap, build_kernel_map
from .voxelize import downsample, voxelize


def _subm_key(kernel_size) -> str:
  return "subm{}x{}x{}".format(*checks.normalize_kernel_size(kernel_size))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["feats", "positions", "valid", "batch", "voxel_size", "maps"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SparseTensor:
  """Voxels with features at one resolution, plus their cached kernel maps (a pytree).

  Attributes:
    feats: ``(capacity, C)`` features (padding rows are ignored).
    positions: ``(capacity, 3)`` voxel positions ``[x, y, z]``.
    valid: bool ``(capacity,)``, which rows are voxels.
    batch: int32 ``(capacity,)`` cloud index of each voxel (packed batches), or None.
    voxel_size: float32 scalar, this level's lattice spacing.
    maps: ``{name: KernelMap}``: ``"subm3x3x3"`` (from :meth:`with_kernel_map`),
      ``"down"`` (finer level -> this one) and ``"up"`` (this one -> the finer level),
      from :meth:`down`.

  Example usage::

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
    >>> t = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25).with_kernel_map(3)
    >>> c = t.down()
    >>> int(t.count), int(c.count), sorted(c.maps), float(c.voxel_size)
    (3, 2, ['down', 'up'], 0.5)
  """
  feats: jax.Array
  positions: jax.Array
  valid: jax.Array
  batch: jax.Array | None
  voxel_size: jax.Array
  maps: Mapping[str, KernelMap]

  @classmethod
  def from_points(cls, points, feats, voxel_size, *, valid=None, batch=None, capacity=None):
    """Voxelises raw points (:func:`voxelize`: features averaged per voxel)."""
    out = voxelize(points, feats, voxel_size, valid=valid, batch=batch, capacity=capacity)
    n = out.positions.shape[0]
    return cls(feats=out.feats, positions=out.positions, valid=jnp.arange(n) < out.count,
               batch=None if batch is None else out.batch,
               voxel_size=jnp.asarray(voxel_size, jnp.float32), maps={})

  @classmethod
  def from_voxels(cls, positions, feats, voxel_size, *, valid=None, batch=None):
    """Wraps voxels that are already unique (e.g. the output of :func:`unique_voxels`)."""
    positions = checks.check_positions("positions", positions)
    feats = checks.check_float_array("feats", feats, 2)
    if feats.shape[0] != positions.shape[0]:
      raise ValueError(f"feats has {feats.shape[0]} rows but positions has {positions.shape[0]} "
                       f"(shapes {feats.shape} and {positions.shape})")
    checks.check_voxel_size(voxel_size)
    mask = checks.as_mask("valid", valid, positions.shape[0])
    return cls(feats=feats, positions=positions, valid=mask,
               batch=None if batch is None else checks.check_batch("batch", batch,
                                                                   positions.shape[0]),
               voxel_size=jnp.asarray(voxel_size, jnp.float32), maps={})

  @property
  def count(self) -> jax.Array:
    """The number of voxels (valid rows)."""
    return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)

  def replace(self, **changes) -> "SparseTensor":
    """A copy with some fields replaced, e.g. ``t.replace(feats=y)``."""
    return dataclasses.replace(self, **changes)

  def _map_args(self, other: "SparseTensor"):
    return dict(in_valid=self.valid, out_valid=other.valid,
                in_batch=self.batch, out_batch=other.batch)

  def kernel_map(self, kernel_size=3) -> KernelMap:
    """The submanifold map (outputs = inputs) for ``kernel_size``: the cached one when
    :meth:`with_kernel_map` built it, else a new search."""
    cached = self.maps.get(_subm_key(kernel_size))
    if cached is not None:
      return cached
    return build_kernel_map(self.positions, self.positions, self.voxel_size, kernel_size,
                            **self._map_args(self))

  def with_kernel_map(self, kernel_size=3) -> "SparseTensor":
    """This tensor, carrying its submanifold map for ``kernel_size`` (built now)."""
    km = self.kernel_map(kernel_size)
    return self.replace(maps={**self.maps, _subm_key(kernel_size): km})

  def down(self, factor: int = 2, kernel_size=2) -> "SparseTensor":
    """The coarse level: one voxel per occupied ``factor``-block (:func:`downsample`),
    voxel size ``factor * voxel_size``, no features yet (``C = 0``), and the maps
    ``"down"`` (this level -> coarse, for :func:`sparse_conv` with ``kernel_size`` at
    this level's voxel size) and ``"up"`` (its transpose, for
    :func:`sparse_conv_transpose` back to this level)."""
    out = downsample(self.positions, self.voxel_size, factor, valid=self.valid,
                     batch=self.batch)
    n = out.positions.shape[0]
    coarse = SparseTensor(
        feats=jnp.zeros((n, 0), self.feats.dtype), positions=out.positions,
        valid=jnp.arange(n) < out.count,
        batch=None if self.batch is None else out.batch,
        voxel_size=self.voxel_size * factor, maps={})
    down = build_kernel_map(self.positions, coarse.positions, self.voxel_size, kernel_size,
                            **self._map_args(coarse))
    return coarse.replace(maps={"down": down, "up": down.transposed()})


def level_conv(kind: str, src: SparseTensor, dst: SparseTensor, kernel_size=3):
  """What a level layer (``SubMConv``, ``DownConv``, ``UpConv``, Linen or NNX) feeds to the
  conv: ``(feats, in_pos, out_pos, voxel_size, kernel_map)``, with its result going to
  ``dst``. ``kind``: ``"subm"`` (``dst`` is ``src``), ``"down"`` (fine ``src`` -> coarse
  ``dst`` through ``dst.maps["down"]``) or ``"up"`` (coarse ``src`` -> fine ``dst``
  through ``src.maps["up"]``, at the fine voxel size)."""
  if kind == "subm":
    km = src.kernel_map(kernel_size)
    return src.feats, src.positions, src.positions, src.voxel_size, km
  if kind == "down":
    return src.feats, src.positions, dst.positions, src.voxel_size, dst.maps["down"]
  if kind == "up":
    return src.feats, src.positions, dst.positions, dst.voxel_size, src.maps["up"]
  raise ValueError(f"kind must be 'subm', 'down' or 'up', got {kind!r}")
