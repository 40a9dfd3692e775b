"""A level of a sparse network: voxels on integer coordinates, their features, and the kernel
maps that reuse them.

:class:`SparseTensor` is spconv's ``SparseConvTensor`` (indices, spatial shape, batch size,
``indice_key`` maps) and MinkowskiEngine's ``SparseTensor`` (coordinates, tensor stride)
in one pytree: integer voxel coordinates ``(x, y, z)``, features, validity (padding),
cloud ids (packed batches), the level's voxel size and origin (so that
``positions = origin + coords * voxel_size``), the grid extent and batch size when known
(for ``dense()`` and spconv's output clip), and the kernel maps built for it. It is
bookkeeping only: every map comes from the lookup or the output-set generation
(``kernel_map.py``, ``generate.py``) and every conv is :func:`sparse_conv`.

Maps are built where they are first asked for and then reused: :meth:`with_kernel_map`
returns the tensor carrying its submanifold map; :meth:`conv` returns the level a
strided, regular or transposed conv generates, carrying the map under a key (spconv's
``indice_key``), and :meth:`inverse` goes back to the level that map started from
(spconv's ``SparseInverseConv3d``: the transposed map, no second search). A layer that
finds no map under its key builds one, inside the model (spconv's behaviour); build a
hierarchy once per cloud outside the model (with :meth:`with_kernel_map`, :meth:`conv`,
:meth:`down`) when several models or steps share it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, errors, generate, lattice
from .errors import ErrorCode
from .geometry import Geometry, centring, per_axis
from .kernel_map import KernelMap, lattice_map, table_map
from .voxelize import voxelize_flagged

AXIS_ORDERS = ("xyz", "zyx")


def _to_xyz(values, axis_order: str):
  """A per-axis tuple in index order ``(d0, d1, d2)`` as ``(x, y, z)``."""
  return tuple(values) if axis_order == "xyz" else tuple(values)[::-1]


def round_capacity(n: int) -> int:
  """Rounds up to ``k * 2**e`` with ``8 <= k < 16`` (at most 12.5% padding, few distinct
  shapes, so few recompilations)."""
  n = max(int(n), 1)
  if n <= 16:
    return n
  e = n.bit_length() - 4
  return -(-n >> e) << e if n % (1 << e) else n


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kernel_map", "source"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LevelLink:
  """A conv's map kept by the level it made: the map (from ``source`` to that level) and
  the level it started from (``source``, without features, with its own maps), so that an
  inverse conv can go back."""
  kernel_map: KernelMap
  source: "SparseTensor"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["feats", "coords", "valid", "batch", "voxel_size", "origin", "flags", "maps"],
    meta_fields=["extent", "batch_size", "axis_order"])
@dataclasses.dataclass(frozen=True)
class SparseTensor:
  """Voxels with features at one resolution, plus their cached kernel maps (a pytree).

  Attributes:
    feats: ``(capacity, C)`` features (padding rows are ignored).
    coords: int32 ``(capacity, 3)`` integer voxel coordinates ``(x, y, z)`` in this
      level's units (spconv's indices: absolute, not shifted).
    valid: bool ``(capacity,)``, which rows are voxels.
    batch: int32 ``(capacity,)`` cloud index of each voxel (packed batches), or None.
    voxel_size: float32 ``(3,)`` this level's spacing per axis ``(x, y, z)``.
    origin: float32 ``(3,)`` the position of coordinate ``(0, 0, 0)``; positions are
      ``origin + coords * voxel_size``.
    flags: int32 :class:`ErrorCode` bits of the construction (NaN or off-lattice
      positions, coordinates out of range); every map built from this level carries them.
    maps: ``{key: KernelMap | LevelLink}``: submanifold maps (``"subm3x3x3"`` or an
      ``indice_key``), the links of the convs that made this level, and ``"down"`` /
      ``"up"`` from :meth:`down`.
    extent: static ``(x, y, z)`` grid extent (spconv's ``spatial_shape``), or None.
    batch_size: static number of clouds, or None (unknown).
    axis_order: static ``"xyz"`` or ``"zyx"``: the column order of :meth:`indices`,
      :attr:`spatial_shape` and the spconv-shaped layers' per-axis arguments (OpenPCDet:
      ``"zyx"``, Pointcept: ``"xyz"``).

  Example usage::

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
    >>> t = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25).with_kernel_map(3)
    >>> c = t.down()
    >>> int(t.count), int(c.count), sorted(c.maps), c.voxel_size.tolist()
    (3, 2, ['down', 'up'], [0.5, 0.5, 0.5])
  """
  feats: jax.Array
  coords: jax.Array
  valid: jax.Array
  batch: jax.Array | None
  voxel_size: jax.Array
  origin: jax.Array
  flags: jax.Array
  maps: Mapping[str, KernelMap | LevelLink]
  extent: tuple[int, int, int] | None = None
  batch_size: int | None = None
  axis_order: str = "xyz"

  # ---------------------------------------------------------------- constructors

  @classmethod
  def from_points(cls, points, feats, voxel_size, *, valid=None, batch=None, capacity=None):
    """Voxelises raw points (:func:`voxelize`: features averaged per voxel; voxel ``i``
    holds the points with ``floor(p / voxel_size) == i``)."""
    out, flags = voxelize_flagged(points, feats, voxel_size, valid=valid, batch=batch,
                                  capacity=capacity)
    errors.report(flags, "SparseTensor.from_points")
    n = out.positions.shape[0]
    vs = jnp.broadcast_to(jnp.asarray(voxel_size, jnp.float32), (3,))
    mask = jnp.arange(n) < out.count
    # voxelize poisons every position with NaN when it found an error (errors.py): the
    # flags say why; the coordinates of poisoned rows are 0.
    finite = jnp.all(jnp.isfinite(out.positions), axis=-1)
    coords = jnp.floor(jnp.where(finite[:, None], out.positions, 0) / vs).astype(jnp.int32)
    return cls(feats=out.feats, coords=jnp.where(mask[:, None], coords, 0), valid=mask,
               batch=None if batch is None else out.batch, voxel_size=vs, origin=0.5 * vs,
               flags=flags, maps={})

  @classmethod
  def from_voxels(cls, positions, feats, voxel_size, *, valid=None, batch=None):
    """Wraps voxels that are already unique, given by their positions on a lattice of
    spacing ``voxel_size`` (voxel centres, corners, or any other phase: e.g. the output
    of :func:`unique_voxels`). Coordinates count from the lattice point nearest below
    the origin (``floor(p / voxel_size)`` for voxel centres)."""
    positions = checks.check_positions("positions", positions)
    feats = checks.check_float_array("feats", feats, 2)
    if feats.shape[0] != positions.shape[0]:
      raise ValueError(f"feats has {feats.shape[0]} rows but positions has {positions.shape[0]} "
                       f"(shapes {feats.shape} and {positions.shape})")
    checks.check_voxel_size(voxel_size)
    n = positions.shape[0]
    mask = checks.valid_mask(valid, (n,), "valid")
    b = None if batch is None else checks.check_batch("batch", batch, n)
    coords, origin, flags = _quantize(positions, jnp.asarray(voxel_size, positions.dtype), mask,
                                      all_valid=valid is None)
    if b is not None:
      flags |= lattice.batch_flags(b, mask)
    errors.report(flags, "SparseTensor.from_voxels")
    return cls(feats=feats, coords=coords, valid=mask, batch=b,
               voxel_size=jnp.broadcast_to(jnp.asarray(voxel_size, jnp.float32), (3,)),
               origin=origin, flags=flags, maps={})

  @classmethod
  def from_indices(cls, indices, feats, spatial_shape, batch_size=None, *, axis_order="zyx",
                   voxel_size=1.0, origin=None, valid=None):
    """A level from spconv-style integer indices (``SparseConvTensor(features, indices,
    spatial_shape, batch_size)``).

    Args:
      indices: int ``(n, 4)`` ``[b, d0, d1, d2]``; the columns ``d0..d2`` are the axes
        ``axis_order`` names (OpenPCDet's ``voxel_coords`` are ``[b, z, y, x]``:
        ``"zyx"``, the default; Pointcept's are ``[b, x, y, z]``: ``"xyz"``).
      feats: ``(n, C)`` features.
      spatial_shape: the grid extent ``[S0, S1, S2]`` in the same column order (static).
      batch_size: static number of clouds (needed by :meth:`dense`); None: unknown.
      axis_order: ``"zyx"`` or ``"xyz"``.
      voxel_size: the spacing in metres, a scalar or ``[x, y, z]`` (OpenPCDet's
        ``VOXEL_SIZE`` order), for :attr:`positions`.
      origin: ``[x, y, z]`` position of index ``(0, 0, 0)``'s centre (e.g. OpenPCDet's
        ``POINT_CLOUD_RANGE[:3] + voxel_size / 2``); default ``voxel_size / 2``.
      valid: optional count or bool mask of the valid rows (padding).

    An index outside ``[0, spatial_shape)`` is ``OUT_OF_RANGE``, a cloud index outside
    ``[0, batch_size)`` is ``BAD_BATCH`` (the error rule of ``errors.py``).

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> idx = jnp.array([[0, 0, 1, 2], [1, 3, 0, 0]])   # [b, z, y, x]
    >>> t = sc.SparseTensor.from_indices(idx, jnp.ones((2, 4)), [4, 5, 6], 2)
    >>> t.coords.tolist(), t.spatial_shape, t.indices().tolist()
    ([[2, 1, 0], [0, 0, 3]], (4, 5, 6), [[0, 0, 1, 2], [1, 3, 0, 0]])
    """
    if axis_order not in AXIS_ORDERS:
      raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    indices = jnp.asarray(indices)
    if (indices.ndim != 2 or indices.shape[1] != 4
        or not jnp.issubdtype(indices.dtype, jnp.integer)):
      raise ValueError(f"indices must be an integer array of shape (n, 4) [b, d0, d1, d2], "
                       f"got dtype {indices.dtype} shape {indices.shape}")
    feats = checks.check_float_array("feats", feats, 2)
    n = indices.shape[0]
    if feats.shape[0] != n:
      raise ValueError(f"feats has {feats.shape[0]} rows but indices has {n}")
    extent = _to_xyz(per_axis("spatial_shape", spatial_shape, 1), axis_order)
    if batch_size is not None:
      batch_size = checks.check_capacity(batch_size)
    mask = checks.valid_mask(valid, (n,), "valid")
    idx = indices.astype(jnp.int32)
    cols = [3, 2, 1] if axis_order == "zyx" else [1, 2, 3]
    coords = idx[:, cols]
    batch = idx[:, 0]
    outside = jnp.any((coords < 0) | (coords >= np.asarray(extent, np.int32)), axis=-1)
    flags = errors.bit(mask & outside, ErrorCode.OUT_OF_RANGE) | lattice.batch_flags(batch, mask)
    if batch_size is not None:
      flags |= errors.bit(mask & (batch >= batch_size), ErrorCode.BAD_BATCH)
    errors.report(flags, "SparseTensor.from_indices")
    vs = jnp.broadcast_to(jnp.asarray(voxel_size, jnp.float32), (3,))
    org = 0.5 * vs if origin is None else jnp.broadcast_to(jnp.asarray(origin, jnp.float32),
                                                           (3,))
    return cls(feats=feats, coords=jnp.where(mask[:, None], coords, 0), valid=mask, batch=batch,
               voxel_size=vs, origin=org, flags=flags, maps={}, extent=extent,
               batch_size=batch_size, axis_order=axis_order)

  @classmethod
  def from_dense(cls, dense, mask=None, *, channels_first=True, axis_order="zyx",
                 capacity=None, voxel_size=1.0, origin=None):
    """A level from a dense grid ``(B, C, D0, D1, D2)`` (``channels_first``, spconv's
    ``dense()`` layout) or ``(B, D0, D1, D2, C)``: the voxels where ``mask`` (bool
    ``(B, D0, D1, D2)``) holds, by default where any channel is non-zero.

    ``capacity`` (static) sets the number of rows: the exact count when the grid is
    concrete and ``capacity`` is None; under ``jit`` it is required. More voxels than
    the capacity is ``CAPACITY_OVERFLOW``.
    """
    dense = checks.check_float_array("dense", dense, 5)
    x = dense if not channels_first else jnp.moveaxis(dense, 1, -1)  # (B, D0, D1, D2, C)
    if mask is None:
      mask = jnp.any(x != 0, axis=-1)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:4] or mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be bool of shape {x.shape[:4]}, got {mask.dtype} {mask.shape}")
    if capacity is None:
      if not checks.is_concrete(mask):
        raise ValueError("from_dense needs a static capacity under jit (the number of voxels "
                         "sets the result's shape)")
      capacity = int(np.sum(np.asarray(mask)))
    capacity = checks.check_capacity(capacity)
    count = jnp.sum(mask, dtype=jnp.int32)
    where = jnp.nonzero(mask.reshape(-1), size=capacity, fill_value=mask.size)[0]
    b, d0, d1, d2 = jnp.unravel_index(jnp.minimum(where, mask.size - 1), mask.shape)
    indices = jnp.stack([b, d0, d1, d2], -1).astype(jnp.int32)
    valid = jnp.arange(capacity) < count
    feats = jnp.where(valid[:, None], x.reshape(-1, x.shape[-1])[jnp.minimum(where,
                                                                            mask.size - 1)], 0)
    t = cls.from_indices(jnp.where(valid[:, None], indices, 0), feats, x.shape[1:4],
                         x.shape[0], axis_order=axis_order, voxel_size=voxel_size,
                         origin=origin, valid=valid)
    flags = t.flags | errors.bit(count > capacity, ErrorCode.CAPACITY_OVERFLOW)
    errors.report(flags, "SparseTensor.from_dense")
    return t.replace(flags=flags)

  # ---------------------------------------------------------------- views

  @property
  def count(self) -> jax.Array:
    """The number of voxels (valid rows)."""
    return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)

  @property
  def positions(self) -> jax.Array:
    """float32 ``(capacity, 3)`` voxel positions ``[x, y, z]``: ``origin + coords *
    voxel_size``; padding rows NaN."""
    pos = self.origin + self.coords.astype(jnp.float32) * self.voxel_size
    return jnp.where(self.valid[..., None], pos, jnp.nan)

  @property
  def spatial_shape(self) -> tuple[int, int, int] | None:
    """The grid extent in :attr:`axis_order` (spconv's ``spatial_shape``), or None."""
    return None if self.extent is None else _to_xyz(self.extent, self.axis_order)

  def replace(self, **changes) -> "SparseTensor":
    """A copy with some fields replaced, e.g. ``t.replace(feats=y)``."""
    return dataclasses.replace(self, **changes)

  def indices(self) -> jax.Array:
    """int32 ``(capacity, 4)`` spconv-style indices ``[b, d0, d1, d2]`` in
    :attr:`axis_order` (``b`` = 0 without a batch); padding rows -1."""
    cols = self.coords if self.axis_order == "xyz" else self.coords[..., ::-1]
    b = jnp.zeros_like(self.coords[..., 0]) if self.batch is None else self.batch
    idx = jnp.concatenate([b[..., None], cols], axis=-1).astype(jnp.int32)
    return jnp.where(self.valid[..., None], idx, -1)

  def dense(self, channels_first: bool = True, spatial_shape=None) -> jax.Array:
    """The dense grid (spconv's ``.dense()``): ``(B, C, D0, D1, D2)`` with the axes in
    :attr:`axis_order` (``channels_first``), or ``(B, D0, D1, D2, C)``; empty voxels are
    0. Needs a ``spatial_shape`` (the tensor's, or given here in index order, static)
    and ``batch_size`` (static); coordinates outside the grid are ``OUT_OF_RANGE``
    (dropped, under the error rule)."""
    if spatial_shape is not None:
      shape = tuple(int(s) for s in spatial_shape)
      return self.replace(extent=shape if self.axis_order == "xyz" else shape[::-1]).dense(
          channels_first)
    if self.extent is None:
      raise ValueError("dense() needs the grid extent: build the level with from_indices(..., "
                       "spatial_shape) or give it one with replace(extent=(X, Y, Z))")
    b = 1 if self.batch is None else self.batch_size
    if b is None:
      raise ValueError("dense() of a packed batch needs batch_size (from_indices(..., "
                       "batch_size) or replace(batch_size=B))")
    shape = self.spatial_shape
    idx = self.indices()
    inside = self.valid & jnp.all((idx[:, 1:] >= 0) & (idx[:, 1:] < np.asarray(shape)), axis=-1)
    inside &= (idx[:, 0] >= 0) & (idx[:, 0] < b)
    flags = self.flags | errors.bit(self.valid & ~inside, ErrorCode.OUT_OF_RANGE)
    errors.report(flags, "SparseTensor.dense")
    grid = jnp.zeros((b, *shape, self.feats.shape[-1]), self.feats.dtype)
    safe = jnp.where(inside[:, None], idx, jnp.asarray([b, *shape], jnp.int32))
    grid = grid.at[safe[:, 0], safe[:, 1], safe[:, 2], safe[:, 3]].set(self.feats, mode="drop")
    grid = errors.poison(grid, flags)
    return jnp.moveaxis(grid, -1, 1) if channels_first else grid

  def height_compression(self) -> jax.Array:
    """OpenPCDet's ``HeightCompression``: the dense grid ``(B, C, D, H, W)`` (index order
    ``zyx``: D = z) as the bird's-eye view ``(B, C * D, H, W)``, channel ``c * D + d``."""
    if self.axis_order != "zyx":
      raise ValueError("height_compression() folds the first index axis (z in OpenPCDet's "
                       "[b, z, y, x] order); this level's axis_order is 'xyz'")
    grid = self.dense(channels_first=True)
    b, c, d, h, w = grid.shape
    return grid.reshape(b, c * d, h, w)

  # ---------------------------------------------------------------- maps

  def _geometry(self, rule, kernel_size, stride=1, padding=0, dilation=1):
    """A :class:`Geometry` from per-axis arguments in kernel-array order ``(z, y, x)``."""
    rev = lambda name, v, lo: per_axis(name, v, lo)[::-1]  # noqa: E731
    return Geometry(rule, rev("kernel_size", kernel_size, 1), rev("stride", stride, 1),
                    rev("padding", padding, 0), rev("dilation", dilation, 1), self.extent)

  def _iso_voxel_size(self):
    v = self.voxel_size
    return jnp.where(jnp.all(v == v[0]), v[0], jnp.nan)

  def kernel_map(self, kernel_size=3, *, dilation=1, convention="minkowski",
                 key=None) -> KernelMap:
    """The submanifold map (outputs = inputs) for ``kernel_size`` ``(Kz, Ky, Kx)``: the one
    cached under ``key`` (default :func:`subm_key`) when there is one, else a new search.

    ``convention`` centres even kernels (``geometry.centring``): ``"minkowski"``
    (MinkowskiEngine, TorchSparse and Open3D's default offset: ``K=2`` covers ``{0, +1}``)
    or ``"spconv"`` (``{-1, 0}``); odd kernels are centred either way."""
    key = subm_key(kernel_size, dilation, convention) if key is None else key
    cached = self.maps.get(key)
    if cached is not None:
      if not isinstance(cached, KernelMap) or cached.kernel_size != checks.normalize_kernel_size(
          kernel_size) or cached.num_in != cached.num_out:
        raise ValueError(f"the map under key {key!r} is not a submanifold map for kernel size "
                         f"{kernel_size}")
      return cached
    geo = self._geometry("subm", kernel_size, dilation=dilation)
    geo = dataclasses.replace(geo, padding=centring(geo.kernel_size, geo.dilation, convention))
    offset = None
    if geo.dilation == (1, 1, 1) and geo.padding == centring(geo.kernel_size, (1, 1, 1)):
      offset = checks.default_offset(geo.kernel_shape)  # the same map as Open3D's
    return lattice_map(self.coords, self.valid, self.batch, self.coords, self.valid, self.batch,
                       geo, flags=self.flags, voxel_size=self._iso_voxel_size(), offset=offset,
                       where="SparseTensor.kernel_map")

  def with_kernel_map(self, kernel_size=3, *, dilation=1, convention="minkowski",
                      key=None) -> "SparseTensor":
    """This tensor, carrying its submanifold map (:meth:`kernel_map`) under ``key``."""
    key = subm_key(kernel_size, dilation, convention) if key is None else key
    km = self.kernel_map(kernel_size, dilation=dilation, convention=convention, key=key)
    return self.replace(maps={**self.maps, key: km})

  def conv(self, kernel_size, stride=1, padding=0, dilation=1, *, rule="conv", key=None,
           capacity=None) -> "SparseTensor":
    """The level a conv generates (``geometry.py``), without features (``C = 0``), carrying
    the map from this level under ``key`` (a :class:`LevelLink`; default
    :func:`conv_key`).

    Args:
      kernel_size, stride, padding, dilation: int or per axis in kernel-array order
        ``(z, y, x)`` (static).
      rule: ``"conv"`` (spconv's ``SparseConv3d``: every output with an input in its
        window, clipped to the grid when the extent is known), ``"floor"``
        (MinkowskiEngine/TorchSparse strided conv: outputs ``floor(i / stride)``) or
        ``"transpose"`` (the generative transposed conv: ``i * stride - p + k * d``).
      key: the map's key (spconv's ``indice_key``), for :meth:`inverse`.
      capacity: static number of output rows. Default: the exact count (rounded up by
        at most 12.5%) when the coordinates are concrete; under ``jit`` the bound of
        ``generate.max_outputs`` (every candidate distinct: give a capacity). More
        outputs than that is ``CAPACITY_OVERFLOW``.

    The new level's voxel size is ``voxel_size * stride`` (``/ stride`` for
    ``"transpose"``), its origin this level's (output ``o`` sits at input coordinate
    ``o * stride``), its extent the conv's output shape.
    """
    if rule not in ("conv", "floor", "transpose"):
      raise ValueError(f"rule must be 'conv', 'floor' or 'transpose', got {rule!r}")
    geo = self._geometry(rule, kernel_size, stride, padding, dilation)
    if rule == "floor":
      if geo.padding != (0, 0, 0):
        raise ValueError("the 'floor' rule centres its window (MinkowskiEngine); padding must be 0")
      geo = dataclasses.replace(geo, padding=centring(geo.kernel_size, geo.dilation))
    key = conv_key(geo) if key is None else key
    n = self.coords.shape[0]
    bound = generate.max_outputs(geo, n)
    cap = bound if capacity is None else checks.check_capacity(capacity)
    out, count, out_b, table, nbr, unique, flags = generate.generate(
        self.coords, self.valid, self.batch, geometry=geo, capacity=cap)
    if capacity is None and all(checks.is_concrete(a) for a in (count, flags)):
      if not int(flags):  # shrink to the exact count
        cap = min(cap, round_capacity(int(count)))
        out, table, nbr = out[:cap], jnp.where(table >= cap, cap, table), nbr[:cap]
        out_b = None if out_b is None else out_b[:cap]
    flags = flags | self.flags
    out_valid = jnp.arange(cap) < count
    where = "SparseTensor.conv"
    if rule == "floor":
      km = lattice_map(self.coords, self.valid, self.batch,
                       out * np.asarray(geo.stride, np.int32), out_valid, out_b, geo,
                       flags=flags, voxel_size=self._iso_voxel_size(), where=where)
    else:
      km = table_map(table, nbr, unique, self.valid, out_valid, geo, flags=flags,
                     voxel_size=self._iso_voxel_size(), where=where)
    scale = jnp.asarray(geo.stride, jnp.float32)
    vs = self.voxel_size / scale if rule == "transpose" else self.voxel_size * scale
    source = self.replace(feats=jnp.zeros((n, 0), self.feats.dtype))
    return SparseTensor(
        feats=jnp.zeros((cap, 0), self.feats.dtype), coords=out, valid=out_valid,
        batch=out_b, voxel_size=vs, origin=self.origin, flags=km.flags,
        maps={key: LevelLink(km, source)}, extent=geo.out_shape(),
        batch_size=self.batch_size, axis_order=self.axis_order)

  def link(self, key) -> LevelLink:
    """The :class:`LevelLink` under ``key`` (the conv that made this level)."""
    found = self.maps.get(key)
    if not isinstance(found, LevelLink):
      have = sorted(k for k, v in self.maps.items() if isinstance(v, LevelLink))
      raise KeyError(f"no conv map under key {key!r} on this level (conv keys here: {have}); "
                     "an inverse conv needs the key of the conv that made this level")
    return found

  def inverse(self, key) -> "SparseTensor":
    """The level the conv under ``key`` started from (spconv's ``SparseInverseConv3d``
    target: its voxels, in their order, with their maps), without features."""
    return self.link(key).source

  def down(self, factor: int = 2, kernel_size=2, *, capacity=None) -> "SparseTensor":
    """The coarse level of Open3D-ML and MinkowskiEngine: one voxel per occupied
    ``factor``-block (coordinates ``floor(i / factor)``), with ``capacity`` rows (static;
    default this level's: always enough; fewer is ``CAPACITY_OVERFLOW`` when exceeded),
    voxel size ``factor * voxel_size``, no features yet (``C = 0``), and the maps ``"down"`` (this level ->
    coarse, the ``kernel_size`` window ``{factor * j, ...}`` for :func:`sparse_conv`)
    and ``"up"`` (its transpose, for :func:`sparse_conv_transpose` back to this level)."""
    factor = checks.check_factor(factor)
    ks = checks.normalize_kernel_size(kernel_size)
    cap = self.coords.shape[0] if capacity is None else checks.check_capacity(capacity)
    coarse = self.conv(ks, factor, rule="floor", key="down", capacity=cap)
    down = coarse.maps["down"].kernel_map
    # Open3D's window for this kernel size at the coarse positions (the old contract).
    down = dataclasses.replace(down, offset=checks.default_offset(ks))
    return coarse.replace(maps={"down": down, "up": down.transposed()})


def subm_key(kernel_size, dilation=1, convention="minkowski") -> str:
  """The default key of a submanifold map, e.g. ``"subm3x3x3"``."""
  ks = checks.normalize_kernel_size(kernel_size)
  key = "subm{}x{}x{}".format(*ks)
  d = per_axis("dilation", dilation, 1)
  if d != (1, 1, 1):
    key += "d{}x{}x{}".format(*d)
  if convention == "spconv" and any(k % 2 == 0 for k in ks):
    key += "s"
  return key


def conv_key(geometry: Geometry) -> str:
  """The default key of a generated level's map."""
  g = geometry
  return (f"{g.rule}k{g.kernel_shape}s{g.stride[::-1]}p{g.padding[::-1]}"
          f"d{g.dilation[::-1]}").replace(" ", "")


@functools.partial(jax.jit, static_argnames=("all_valid",))
def _quantize(positions, vs, mask, *, all_valid):
  """Integer coordinates of lattice positions, the lattice's origin and the error flags."""
  ref = lattice.reference_point(positions, mask, positions, mask, a_all_valid=all_valid)
  q, flags = lattice.quantize(positions, vs, mask, ref)
  flags |= lattice.voxel_size_flags(vs)
  base = jnp.round(ref / vs - 0.499)  # the lattice point at or just below the first voxel
  big = jnp.asarray(2**30, vs.dtype)
  coords = (q + jnp.clip(base, -big, big).astype(jnp.int32))
  flags |= errors.bit(mask & jnp.any(jnp.abs(base) >= 2**30, axis=-1), ErrorCode.OUT_OF_RANGE)
  origin = (ref - base * vs).astype(jnp.float32)
  return jnp.where(mask[:, None], coords, 0), jnp.broadcast_to(origin, (3,)), flags
