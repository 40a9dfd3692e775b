"""Kernel maps: which input feeds each output through which kernel cell.

* **Geometry** (:func:`slot_geometry`): Open3D's neighbour window and kernel-cell rule
  turned, once and in NumPy, into a static list of *slots*, each an integer voxel
  offset and a flat kernel cell. Default offsets give one slot per cell; unusual
  offsets can map several slots to one cell, exactly as Open3D counts them.
* **The pytree** (:class:`KernelMap`): the neighbour table, its inverse (for the
  backward pass), masks, error flags and the static facts a conv needs.
* **The build** (:func:`build_kernel_map`): argument checks, then one compiled program
  of named steps: quantise both point sets on one lattice (``lattice.py``), look up
  every (output, slot) query (``lookup.py``), invert the table; then the error rule
  (``errors.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, errors, lattice, lookup, memory, sharding
from .errors import ErrorCode


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
    data_fields=["neighbors", "inverse", "out_unique", "in_mask", "out_mask", "voxel_size",
                 "flags"],
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
    in_mask: bool ``(num_in,)``, False for padded inputs.
    out_mask: bool ``(num_out,)``, False for padded outputs (their results are 0).
    voxel_size: float32 scalar, the lattice spacing the map was built with (a conv
      given another ``voxel_size`` raises).
    flags: int32 scalar of :class:`ErrorCode` bits (0 when all is well).
    kernel_size: static ``(Kz, Ky, Kx)``.
    offset: static offset ``(x, y, z)`` in voxels.
    slot_cells: static tuple, the flat kernel cell of each slot.
    num_in: static number of input rows (including padding): the sentinel value.
    transpose: static; True for a map built for :func:`sparse_conv_transpose`.
  """
  neighbors: jax.Array
  inverse: jax.Array
  out_unique: jax.Array
  in_mask: jax.Array
  out_mask: jax.Array
  voxel_size: jax.Array
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
    return errors.describe(self.flags)

  def check(self) -> "KernelMap":
    """Raises :class:`InvalidInputError` (a ``ValueError``) when an error flag is set;
    returns the map otherwise."""
    errors.report(self.flags, "invalid kernel map")
    return self

  def neighbor_counts(self) -> jax.Array:
    """Per output, how many inputs were found (Open3D's ``neighbors_row_splits`` diff)."""
    return jnp.sum(self.neighbors < self.num_in, axis=-1, dtype=jnp.int32)

  def input_counts(self) -> jax.Array:
    """Per input, how many outputs it feeds (the transposed conv's neighbour count)."""
    nbr = self.neighbors.reshape(-1)
    return jnp.zeros((self.num_in + 1,), jnp.int32).at[nbr].add(1)[:self.num_in]

  def transposed(self) -> "KernelMap":
    """The map of the opposite direction over the same two point sets, without a search.

    For a down-sampling map (``sparse_conv`` from fine to coarse points) this is the
    up-sampling map (``sparse_conv_transpose`` from those coarse points back to the fine
    ones), and the other way round: the neighbour table and its inverse swap roles.
    It needs the outputs of this map to be unique (the inputs of the new one); where
    they are not, the new map's ``flags`` hold ``DUPLICATE_INPUT``.

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> fine = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
    >>> coarse, k = sc.downsample(fine, 1.0)
    >>> down = sc.build_kernel_map(fine, coarse, 1.0, 2, out_valid=k)
    >>> up = down.transposed()
    >>> up.transpose, up.neighbors.shape
    (True, (3, 8))
    """
    dup = errors.bit(~self.out_unique & jnp.any(self.out_mask), ErrorCode.DUPLICATE_INPUT)
    flags = self.flags | dup
    if checks.is_concrete(flags):
      errors.report(flags, "KernelMap.transposed")
    else:  # traced: the build already reported its own flags
      errors.report(dup, "KernelMap.transposed")
    return KernelMap(
        neighbors=self.inverse, inverse=self.neighbors, out_unique=jnp.asarray(True),
        in_mask=self.out_mask, out_mask=self.in_mask, voxel_size=self.voxel_size, flags=flags,
        kernel_size=self.kernel_size, offset=self.offset, slot_cells=self.slot_cells,
        num_in=self.num_out, transpose=not self.transpose)


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
    A :class:`KernelMap`. When positions are non-finite, off the lattice, span
    ``2**20`` voxels or more on an axis (with the kernel's reach), when valid inputs
    share a voxel, or when a batch index is negative, the error rule of
    ``errors.py`` applies: ``InvalidInputError`` outside ``jit``; inside ``jit`` the
    map's ``flags``, a raising host callback (error mode ``"raise"``) and NaN outputs
    of every conv that uses the map.

  >>> import jax.numpy as jnp
  >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
  >>> km = build_kernel_map(pos, pos, 1.0, 3)
  >>> km.neighbors.shape, km.neighbor_counts().tolist()
  ((2, 27), [2, 2])
  """
  in_pos = checks.check_positions("in_pos", in_pos)
  out_pos = checks.check_positions("out_pos", out_pos)
  checks.check_voxel_size(voxel_size)
  return float_map(in_pos, out_pos, voxel_size, kernel_size, offset=offset, transpose=transpose,
                   in_valid=in_valid, out_valid=out_valid, in_batch=in_batch,
                   out_batch=out_batch)


def float_map(in_pos, out_pos, voxel_size, kernel_size, *, offset=None, transpose=False,
              in_valid=None, out_valid=None, in_batch=None, out_batch=None) -> KernelMap:
  """:func:`build_kernel_map` for positions and a voxel size already checked (the convs
  check them once, then call this)."""
  ks = checks.normalize_kernel_size(kernel_size)
  off = checks.normalize_offset(offset, ks)
  if (in_batch is None) != (out_batch is None):
    raise ValueError("give both in_batch and out_batch, or neither")
  n, m = in_pos.shape[0], out_pos.shape[0]
  in_mask = checks.valid_mask(in_valid, (n,), "in_valid")
  out_mask = checks.valid_mask(out_valid, (m,), "out_valid")
  if in_batch is not None:
    in_batch = checks.check_batch("in_batch", in_batch, n)
    out_batch = checks.check_batch("out_batch", out_batch, m)
  dtype = jnp.result_type(in_pos.dtype, out_pos.dtype)
  _, cells = slot_geometry(ks, off)
  memory.check_kernel_map(n, m, len(cells))  # before anything is allocated
  # Sharding in types (sharding.py): operands sharded over Explicit mesh axes are replicated
  # for the search; vmapped over a sharded batch axis, the search runs per shard.
  operands = sharding.replicated(jax.lax.stop_gradient(in_pos.astype(dtype)),
                            jax.lax.stop_gradient(out_pos.astype(dtype)),
                            jax.lax.stop_gradient(jnp.asarray(voxel_size)), in_mask, out_mask,
                            in_batch, out_batch)
  neighbors, inverse, unique, flags = _search(ks, off, bool(transpose), in_valid is None)(
      *operands)
  errors.report(flags, "build_kernel_map")
  return KernelMap(neighbors=neighbors, inverse=inverse, out_unique=unique, in_mask=in_mask,
                   out_mask=out_mask, voxel_size=jnp.asarray(voxel_size, jnp.float32),
                   flags=flags, kernel_size=ks, offset=off, slot_cells=cells, num_in=n,
                   transpose=bool(transpose))


@functools.lru_cache(maxsize=None)
def _search(ks, off, transpose, in_all_valid):
  """:func:`_build` for these static arguments, run per shard when vmapped over a batch
  axis sharded over Explicit mesh axes (``sharding.vmap_per_shard``)."""
  return sharding.vmap_per_shard(functools.partial(_build, ks=ks, off=off, transpose=transpose,
                                              in_all_valid=in_all_valid))


@functools.partial(jax.jit, static_argnames=("ks", "off", "transpose", "in_all_valid"))
def _build(in_pos, out_pos, voxel_size, in_mask, out_mask, in_batch, out_batch, *, ks, off,
           transpose, in_all_valid):
  """The build proper (one compiled program): ``(neighbors, inverse, unique, flags)``."""
  deltas, _ = slot_geometry(ks, off)
  if transpose:  # outputs gather from the inputs at the mirrored offsets
    deltas = -deltas
  margin = int(np.abs(deltas).max()) if deltas.size else 0
  vs = jnp.asarray(voxel_size, in_pos.dtype)

  # 1. Both point sets on one lattice, shifted to non-negative coordinates.
  ref = lattice.reference_point(in_pos, in_mask, out_pos, out_mask, a_all_valid=in_all_valid)
  q_in, flags_in = lattice.quantize(in_pos, vs, in_mask, ref)
  q_out, flags_out = lattice.quantize(out_pos, vs, out_mask, ref)
  (c_in, c_out), _, flags_range = lattice.to_grid([q_in, q_out], [in_mask, out_mask], margin)
  flags = flags_in | flags_out | flags_range | lattice.voxel_size_flags(vs)
  if in_batch is not None:
    flags |= lattice.batch_flags(in_batch, in_mask) | lattice.batch_flags(out_batch, out_mask)

  # 2. Every (output, slot) query looked up among the inputs.
  neighbors, duplicate = lookup.neighbors(c_in, in_mask, in_batch, c_out, out_mask, out_batch,
                                          deltas)
  flags |= errors.bit(duplicate, ErrorCode.DUPLICATE_INPUT)

  # 3. The inverse table, for the backward pass.
  inverse, unique = lookup.invert(neighbors, in_pos.shape[0])
  return neighbors, inverse, unique, flags


# ------------------------------------------------------------------ integer coordinates


def lattice_map(in_coords, in_mask, in_batch, anchors, out_mask, out_batch, geometry, *,
                flags=None, voxel_size=None, offset=None, where="kernel map") -> KernelMap:
  """The map of a conv on integer lattice coordinates (``geometry.py``): output ``m`` reads,
  through slot ``s``, the input at ``anchors[m] + geometry.deltas()[s]`` (its anchor is
  ``o * stride`` in input units). A search, as :func:`build_kernel_map`, without the
  quantisation of float positions.

  Args:
    in_coords, anchors: int32 ``(n, 3)`` / ``(m, 3)`` ``(x, y, z)`` (any sign).
    in_mask, out_mask: bool validity; in_batch, out_batch: int32 cloud ids or None.
    geometry: the static :class:`~jax_sparseconv._src.geometry.Geometry`.
    flags: int32 error bits of the inputs (a level's), OR-ed into the map's.
    voxel_size: the input level's spacing, kept in the map (for ``MAP_MISMATCH``).
    offset: the Open3D offset this map equals, if any (for the convs' offset check).
    where: the name the error rule reports.
  """
  n, m = in_coords.shape[0], anchors.shape[0]
  memory.check_kernel_map(n, m, geometry.num_slots)
  deltas = tuple(map(tuple, geometry.deltas().tolist()))
  operands = sharding.replicated(in_coords, in_mask, in_batch, anchors, out_mask, out_batch)
  neighbors, inverse, unique, found = _lattice_search(deltas)(*operands)
  flags = found if flags is None else found | flags
  errors.report(flags, where)
  return _assemble(neighbors, inverse, unique, in_mask, out_mask, flags, geometry, voxel_size,
                   offset)


@functools.lru_cache(maxsize=None)
def _lattice_search(deltas):
  return sharding.vmap_per_shard(functools.partial(_lattice_build, deltas=deltas))


@functools.partial(jax.jit, static_argnames=("deltas",))
def _lattice_build(c_in, in_mask, in_batch, anchors, out_mask, out_batch, *, deltas):
  deltas = np.asarray(deltas, np.int32).reshape(-1, 3)
  margin = int(np.abs(deltas).max()) if deltas.size else 0
  (c_in, c_out), _, flags = lattice.to_grid([c_in, anchors], [in_mask, out_mask], margin)
  if in_batch is not None:
    flags |= lattice.batch_flags(in_batch, in_mask) | lattice.batch_flags(out_batch, out_mask)
  neighbors, duplicate = lookup.neighbors(c_in, in_mask, in_batch, c_out, out_mask, out_batch,
                                          deltas)
  flags |= errors.bit(duplicate, ErrorCode.DUPLICATE_INPUT)
  inverse, unique = lookup.invert(neighbors, c_in.shape[0])
  return neighbors, inverse, unique, flags


def table_map(inverse, neighbors, unique, in_mask, out_mask, geometry, *, flags,
              voxel_size=None, where="kernel map") -> KernelMap:
  """The map of a generated output set from ``generate.py``'s tables (no search):
  ``inverse[i, slot]`` (the output input ``i`` reaches through ``slot``, ``num_out`` where
  none), its inverse ``neighbors`` and whether that is exact (``unique``)."""
  # Two inputs reaching one output through one slot: they share a voxel.
  flags = flags | errors.bit(~unique, ErrorCode.DUPLICATE_INPUT)
  errors.report(flags, where)
  return _assemble(neighbors, inverse, unique, in_mask, out_mask, flags, geometry, voxel_size,
                   None)


def _assemble(neighbors, inverse, unique, in_mask, out_mask, flags, geometry, voxel_size,
              offset) -> KernelMap:
  vs = jnp.full((), jnp.nan, jnp.float32) if voxel_size is None else jnp.asarray(
      voxel_size, jnp.float32)
  return KernelMap(neighbors=neighbors, inverse=inverse, out_unique=unique, in_mask=in_mask,
                   out_mask=out_mask, voxel_size=vs, flags=flags,
                   kernel_size=geometry.kernel_shape, offset=offset,
                   slot_cells=tuple(range(geometry.num_slots)), num_in=in_mask.shape[0],
                   transpose=False)
