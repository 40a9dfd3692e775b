"""Morton (Z-order) keys for integer voxel coordinates, without 64-bit integers.

A coordinate triple ``(x, y, z)`` with each component in ``[0, 2**20)`` has a 60-bit
Morton code (bit ``3*i + a`` holds bit ``i`` of axis ``a``, x = axis 0). With x64
disabled there is no 64-bit integer, so the code is kept as two uint32 words:
``hi`` interleaves the upper 10 bits of every axis and ``lo`` the lower 10 bits.
Comparing ``(hi, lo)`` lexicographically is exactly comparing the 60-bit codes, so
sorting by the pair gives Z-order. Coordinates never wrap: callers check the range
(see ``MAX_COORD``) before encoding.
"""

from __future__ import annotations

import jax.numpy as jnp

#: Bits per axis in one Morton word.
WORD_BITS = 10
#: Exclusive upper bound of a coordinate on one axis (2**20 voxels).
MAX_COORD = 1 << (2 * WORD_BITS)

_LOW = (1 << WORD_BITS) - 1


def _spread3(v):
  """Inserts two zero bits between the low 10 bits of uint32 ``v``."""
  v = v & jnp.uint32(_LOW)
  v = (v | (v << 16)) & jnp.uint32(0x030000FF)
  v = (v | (v << 8)) & jnp.uint32(0x0300F00F)
  v = (v | (v << 4)) & jnp.uint32(0x030C30C3)
  v = (v | (v << 2)) & jnp.uint32(0x09249249)
  return v


def _compact3(v):
  """Inverse of :func:`_spread3`."""
  v = v & jnp.uint32(0x09249249)
  v = (v ^ (v >> 2)) & jnp.uint32(0x030C30C3)
  v = (v ^ (v >> 4)) & jnp.uint32(0x0300F00F)
  v = (v ^ (v >> 8)) & jnp.uint32(0xFF0000FF)
  v = (v ^ (v >> 16)) & jnp.uint32(_LOW)
  return v


def morton_encode(coords):
  """Encodes integer voxel coordinates as a two-word Morton key.

  Args:
    coords: integer array of shape ``(..., 3)`` holding ``(x, y, z)``, each in
      ``[0, 2**20)``. Values outside that range are not checked here.

  Returns:
    ``(hi, lo)``: two uint32 arrays of shape ``(...)``. Sorting by ``(hi, lo)``
    lexicographically sorts the points in Z-order.

  >>> import jax.numpy as jnp
  >>> hi, lo = morton_encode(jnp.array([[1, 0, 0], [0, 1, 0], [1024, 0, 0]]))
  >>> hi.tolist(), lo.tolist()
  ([0, 0, 1], [1, 2, 0])
  """
  c = jnp.asarray(coords).astype(jnp.uint32)
  hi = jnp.uint32(0)
  lo = jnp.uint32(0)
  for axis in range(3):
    a = c[..., axis]
    hi = hi | (_spread3(a >> WORD_BITS) << axis)
    lo = lo | (_spread3(a) << axis)
  return hi, lo


def morton_decode(hi, lo):
  """Inverse of :func:`morton_encode`: returns int32 coordinates of shape ``(..., 3)``.

  >>> import jax.numpy as jnp
  >>> morton_decode(*morton_encode(jnp.array([[5, 1000, 99999]]))).tolist()
  [[5, 1000, 99999]]
  """
  hi = jnp.asarray(hi, jnp.uint32)
  lo = jnp.asarray(lo, jnp.uint32)
  axes = [(_compact3(hi >> a) << WORD_BITS) | _compact3(lo >> a) for a in range(3)]
  return jnp.stack(axes, axis=-1).astype(jnp.int32)
