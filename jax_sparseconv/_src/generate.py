"""Output sets that a conv generates, with the map from each input to its outputs.

A regular (``"conv"``), strided (``"floor"``) or generative transposed (``"transpose"``)
conv of ``geometry.py`` makes its own output set from its inputs' integer coordinates.
Every input proposes the outputs it reaches, at most one per kernel slot (a static
number of *candidates* per input: for ``"conv"`` the offsets ``k`` that make
``(i + p - k*d)`` divisible by ``s``, at most ``ceil(K / s)`` per axis; for
``"transpose"`` every ``k``; for ``"floor"`` one). The candidates are merged with one
sort of their keys (``lattice.py``: Morton words, the cloud index leading for packed
batches), which gives the outputs in key order, and for ``"conv"`` and ``"transpose"``
the table ``inverse[i, slot]`` (which output input ``i`` reaches through ``slot``) as a
by-product: the kernel map without a search.

Static shapes: the outputs have a fixed capacity; more outputs than that is
``CAPACITY_OVERFLOW`` (the excess is dropped from the table, never double-counted).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from . import backend, errors, ffi, lattice, lookup
from .errors import ErrorCode
from .geometry import Geometry


def max_outputs(geometry: Geometry, num_in: int) -> int:
  """An upper bound on the number of outputs ``num_in`` inputs can generate (the
  candidate count), capped by the output grid's size when it is known (per cloud)."""
  return num_in * _per_input(geometry)


def _per_input(geometry: Geometry) -> int:
  if geometry.rule == "conv":
    return int(np.prod([t.shape[1] for t in geometry.candidates()]))
  if geometry.rule == "transpose":
    return geometry.num_slots
  return 1


def _candidates(coords, mask, geometry: Geometry):
  """``(cand (n, C, 3), ok (n, C))``: each input's candidate outputs."""
  s = np.asarray(geometry.stride, np.int32)
  p = np.asarray(geometry.padding, np.int32)
  d = np.asarray(geometry.dilation, np.int32)
  shape = geometry.out_shape()
  if geometry.rule == "floor":
    cand = jnp.floor_divide(coords, s)[:, None, :]
    ok = mask[:, None]
  elif geometry.rule == "transpose":
    deltas = geometry.deltas()  # (S, 3): o = i*s + (k*d - p)
    cand = coords[:, None, :] * s + deltas[None]
    ok = jnp.broadcast_to(mask[:, None], cand.shape[:2])  # candidate c is slot c
  else:  # "conv": o = (i + p - k*d) / s for the k of i's residue
    tables = geometry.candidates()
    per_axis = []
    for a in range(3):
      k = jnp.asarray(tables[a])[jnp.mod(coords[:, a], s[a])]  # (n, C_a), -1 = none
      per_axis.append((k, jnp.floor_divide(coords[:, a, None] + p[a] - k * d[a], s[a])))
    combos = list(itertools.product(*[range(t.shape[1]) for t in tables]))
    kk = [jnp.stack([per_axis[a][0][:, c[a]] for c in combos], 1) for a in range(3)]
    cand = jnp.stack([jnp.stack([per_axis[a][1][:, c[a]] for c in combos], 1)
                      for a in range(3)], -1)
    ok = mask[:, None] & (kk[0] >= 0) & (kk[1] >= 0) & (kk[2] >= 0)
  if shape is not None:  # the grid [0, out_shape) (spconv); without one, no clip
    ok = ok & jnp.all((cand >= 0) & (cand < np.asarray(shape, np.int32)), axis=-1)
  return cand, ok


@functools.partial(jax.jit, static_argnames=("geometry", "capacity"))
def generate(coords, mask, batch, *, geometry: Geometry, capacity: int):
  """The outputs a conv generates from inputs at integer ``coords``.

  Args:
    coords: int32 ``(n, 3)`` input coordinates ``(x, y, z)``.
    mask: bool ``(n,)`` validity. batch: int32 ``(n,)`` cloud indices or None.
    geometry: a ``"conv"``, ``"floor"`` or ``"transpose"`` :class:`Geometry`.
    capacity: static number of output rows.

  Returns:
    ``(out_coords, count, out_batch, inverse, neighbors, unique, flags)``: int32
    ``(capacity, 3)`` output coordinates (in key order; padding rows 0), the int32 number
    of outputs, their cloud indices (or None), int32 ``(n, S)`` ``inverse[i, slot]`` =
    the output that input ``i`` reaches through ``slot`` (``capacity`` where none; for
    ``"floor"`` ``(n, 1)``, each input's output), its inverse ``neighbors (capacity, S)``
    (the input output ``o`` reads through ``slot``, ``n`` where none) and whether that is
    exact (``unique``: no two inputs reach one output through one slot, i.e.
    :func:`lookup.invert` of ``inverse``), and the error flags (``OUT_OF_RANGE``,
    ``CAPACITY_OVERFLOW``).
  """
  zeros = jnp.zeros(coords.shape[:1], jnp.int32)
  b = zeros if batch is None else batch
  out, out_b, inverse, neighbors, unique, count, flags = backend.dispatch(
      functools.partial(_generate_jnp, geometry=geometry, capacity=capacity,
                        batched=batch is not None),
      None, coords, mask, b,
      cpu_fn=functools.partial(ffi.cpu_generate, rule=geometry.rule,
                               kernel_size=geometry.kernel_size, stride=geometry.stride,
                               padding=geometry.padding, dilation=geometry.dilation,
                               shape=geometry.out_shape(), capacity=capacity))
  return out, count, None if batch is None else out_b, inverse, neighbors, unique, flags


def _generate_jnp(coords, mask, batch, *, geometry: Geometry, capacity: int, batched: bool):
  """:func:`generate` in jnp (the reference of the native CPU pass ``ffi.cpu_generate``):
  the candidates, their merge by one sort, the per-slot table."""
  n = coords.shape[0]
  cand, ok = _candidates(coords, mask, geometry)
  c = cand.shape[1]
  flat, flat_ok = cand.reshape(n * c, 3), ok.reshape(n * c)
  flat_b = jnp.repeat(batch, c) if batched else None
  out, out_b, owner, count, flags = _unique_outputs(flat, flat_ok, flat_b, capacity)
  owner = owner.reshape(n, c)
  inverse = owner if geometry.rule == "floor" else _by_slot(owner, coords, geometry, capacity)
  neighbors, unique = lookup.invert(inverse, capacity)
  return out, out_b, inverse, neighbors, unique, count, flags


def _unique_outputs(flat, flat_ok, flat_b, capacity: int):
  """The distinct candidates in key order, by one sort (the reference for the native CPU
  pass ``ffi.cpu_generate``): ``(out, out_b, owner, count, flags)``, out_b zeros
  when ``flat_b`` is None."""
  k = flat.shape[0]
  (grid,), _, flags = lattice.to_grid([flat], [flat_ok])
  *sorted_keys, perm = lattice.sort_keys(lattice.keys(grid, flat_b, flat_ok))
  sorted_ok = jnp.take(flat_ok, perm)
  new = ~lattice.same_as_previous(sorted_keys) & sorted_ok  # first candidate of each output
  count = jnp.sum(new, dtype=jnp.int32)
  flags |= errors.bit(count > capacity, ErrorCode.CAPACITY_OVERFLOW)
  seg = jnp.where(sorted_ok, jnp.cumsum(new, dtype=jnp.int32) - 1, capacity)
  seg = jnp.where(seg < capacity, seg, capacity)  # beyond the capacity: dropped
  first = jnp.where(new & (seg < capacity), seg, capacity)
  out = jnp.zeros((capacity, 3), jnp.int32).at[first].set(jnp.take(flat, perm, axis=0),
                                                           mode="drop")
  out_b = jnp.zeros((capacity,), jnp.int32)
  if flat_b is not None:
    out_b = out_b.at[first].set(jnp.take(flat_b, perm), mode="drop")
  owner = jnp.zeros((k,), jnp.int32).at[perm].set(seg, unique_indices=True)
  return out, out_b, owner, jnp.minimum(count, capacity), flags


def _by_slot(owner, coords, geometry: Geometry, capacity: int):
  """``inverse (n, S)`` from ``owner (n, C)`` (the output of each candidate, ``capacity``
  where none), by a gather: which candidate feeds slot ``k`` is static per residue."""
  n = owner.shape[0]
  if geometry.rule == "transpose":  # candidate c is slot c
    return owner
  tables = geometry.candidates()
  pos = []  # per axis (n, K_a): the candidate column of offset k_a, -1 = none
  for a, table in enumerate(tables):
    col = np.full((table.shape[0], geometry.kernel_size[a]), -1, np.int32)
    for r, ks in enumerate(table):
      for ci, k in enumerate(ks):
        if k >= 0:
          col[r, k] = ci
    pos.append(jnp.asarray(col)[jnp.mod(coords[:, a], geometry.stride[a])])
  widths = [t.shape[1] for t in tables]
  # Slots in kernel order (axis 0 fastest): (n, K2, K1, K0); candidates axis 2 fastest.
  c0, c1, c2 = pos[0][:, None, None, :], pos[1][:, None, :, None], pos[2][:, :, None, None]
  slots = geometry.num_slots
  valid = ((c0 >= 0) & (c1 >= 0) & (c2 >= 0)).reshape(n, slots)
  cidx = ((c0 * widths[1] + c1) * widths[2] + c2).reshape(n, slots)
  got = jnp.take_along_axis(owner, jnp.where(valid, cidx, 0), axis=1)
  return jnp.where(valid, got, capacity)
