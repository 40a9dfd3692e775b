"""The geometry of a conv on integer lattice coordinates: which voxels it reads, which it
writes, and which kernel slot connects them (static, NumPy only).

The model zoos (spconv, MinkowskiEngine, TorchSparse) describe a conv per axis by a
kernel size ``K``, stride ``s``, padding ``p`` and dilation ``d``, on integer voxel
coordinates. Every rule below reads, for output ``o`` and kernel offset ``k`` (per
axis), one input coordinate, or writes one output coordinate per input and offset:

* ``"subm"`` (submanifold: spconv's ``SubMConv3d``, MinkowskiEngine's and TorchSparse's
  stride-1 convs): outputs are the inputs; output ``o`` reads ``o - p + k*d`` with the
  centring padding ``p = c*d`` (``c = K // 2`` in spconv, ``(K - 1) // 2`` in
  MinkowskiEngine, TorchSparse and Open3D: they differ for even ``K`` only).
* ``"conv"`` (spconv's ``SparseConv3d``, a regular conv that generates its outputs):
  output ``o`` reads ``o*s - p + k*d``; the outputs are every ``o`` with an input there
  for some ``k`` and ``0 <= o < (S + 2p - d(K-1) - 1) // s + 1`` (``S`` the spatial shape;
  without one, no clip at either end: coordinates may be negative).
* ``"floor"`` (MinkowskiEngine's and TorchSparse's strided conv): the outputs are the
  inputs' coordinates floored to the stride, ``o = floor(i / s)``; output ``o`` reads
  ``o*s - p + k*d`` with the centring ``p = ((K - 1) // 2) * d``; with a spatial shape,
  the outputs are clipped as in ``"conv"``.
* ``"transpose"`` (spconv's ``SparseConvTranspose3d``, MinkowskiEngine's generative
  transposed conv, TorchSparse's ``generative=True``): input ``i`` writes
  ``o = i*s - p + k*d`` for every ``k``; the outputs are all of these, with a spatial
  shape those in ``[0, (S - 1)*s - 2p + K)`` (spconv's output shape).
  Slot ``k`` connects ``i`` and ``o`` in that direction (no flip).

The inverse conv (spconv's ``SparseInverseConv3d``) is the transpose of a ``"conv"`` (or
``"floor"``) map onto that conv's input set, with the same slot ``k``.

Slots are numbered like the kernel array ``(Kz, Ky, Kx, Cin, Cout)``:
``slot = (kz * Ky + ky) * Kx + kx``. Coordinates here are ``(x, y, z)``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import numbers

import numpy as np

RULES = ("subm", "conv", "floor", "transpose")


def per_axis(name: str, value, minimum: int = 0) -> tuple[int, int, int]:
  """An int or 3 ints as a tuple of 3 Python ints ``>= minimum`` (order kept)."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
  if isinstance(value, numbers.Integral):
    value = (int(value),) * 3
  else:
    try:
      value = tuple(value)
    except TypeError:
      raise ValueError(f"{name} must be an int or 3 ints, got {value!r}") from None
    if len(value) != 3 or not all(isinstance(v, numbers.Integral)
                                  and not isinstance(v, (bool, np.bool_)) for v in value):
      raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    value = tuple(int(v) for v in value)
  if min(value) < minimum:
    raise ValueError(f"{name} entries must be >= {minimum}, got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A conv's static geometry; every field is ``(x, y, z)``.

  Attributes:
    rule: one of :data:`RULES`.
    kernel_size, stride, padding, dilation: per axis.
    spatial_shape: the input grid's extent per axis, or None (no upper clip).
  """
  rule: str
  kernel_size: tuple[int, int, int]
  stride: tuple[int, int, int] = (1, 1, 1)
  padding: tuple[int, int, int] = (0, 0, 0)
  dilation: tuple[int, int, int] = (1, 1, 1)
  spatial_shape: tuple[int, int, int] | None = None

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
    if self.rule == "subm" and self.stride != (1, 1, 1):
      raise ValueError(f"a submanifold conv has stride 1, got {self.stride}")

  @property
  def kernel_shape(self) -> tuple[int, int, int]:
    """``(Kz, Ky, Kx)``: the kernel array's leading axes."""
    return self.kernel_size[::-1]

  @property
  def num_slots(self) -> int:
    return int(np.prod(self.kernel_size))

  def out_shape(self) -> tuple[int, int, int] | None:
    """The output grid's extent per axis (None without a spatial shape)."""
    if self.spatial_shape is None:
      return None
    if self.rule == "subm":
      return self.spatial_shape
    if self.rule == "transpose":
      return tuple((n - 1) * s - 2 * p + k for n, s, p, k in zip(
          self.spatial_shape, self.stride, self.padding, self.kernel_size))
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, s, p, d, k in zip(
        self.spatial_shape, self.stride, self.padding, self.dilation, self.kernel_size))

  def deltas(self) -> np.ndarray:
    """int32 ``(S, 3)``: per slot, ``k*d - p`` per axis (the offset from an output's
    anchor ``o*s`` to the input it reads; for ``"transpose"``, from an input's anchor
    ``i*s`` to the output it writes)."""
    return _deltas(self.kernel_size, self.padding, self.dilation)

  def candidates(self) -> list[np.ndarray]:
    """For ``"conv"``: per axis, an int32 table ``(s, C)`` of the offsets ``k`` through
    which an input of residue ``r = i mod s`` reaches an output (``(i + p - k*d)``
    divisible by ``s``), padded with -1; ``C`` is the most for any residue."""
    tables = []
    for k, s, p, d in zip(self.kernel_size, self.stride, self.padding, self.dilation):
      rows = [[j for j in range(k) if (r + p - j * d) % s == 0] for r in range(s)]
      width = max(1, max(len(r) for r in rows))
      tables.append(np.array([r + [-1] * (width - len(r)) for r in rows], np.int32))
    return tables


@functools.lru_cache(maxsize=None)
def _deltas(kernel_size, padding, dilation) -> np.ndarray:
  kx, ky, kz = kernel_size
  rows = [(cx * dilation[0] - padding[0], cy * dilation[1] - padding[1],
           cz * dilation[2] - padding[2])
          for cz, cy, cx in itertools.product(range(kz), range(ky), range(kx))]
  return np.asarray(rows, np.int32).reshape(-1, 3)


def centring(kernel_size, dilation, convention: str = "minkowski") -> tuple[int, int, int]:
  """The padding that centres a submanifold window: ``(K // 2) * d`` per axis for
  ``"spconv"``, ``((K - 1) // 2) * d`` for ``"minkowski"`` (MinkowskiEngine, TorchSparse,
  Open3D's default offset). They differ for even ``K``."""
  if convention == "spconv":
    return tuple((k // 2) * d for k, d in zip(kernel_size, dilation))
  if convention == "minkowski":
    return tuple(((k - 1) // 2) * d for k, d in zip(kernel_size, dilation))
  raise ValueError(f"convention must be 'spconv' or 'minkowski', got {convention!r}")
