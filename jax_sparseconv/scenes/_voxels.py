"""Voxel helpers shared by the scene generators: packed integer keys, the first voxels
by priority (how a cloud is cut to an exact size), voxel centres, cloud statistics.

NumPy only. Voxel indices ``i = floor(p / vs)`` are packed into one int64 key of 21
bits per axis (``|i| < 2**20``, the library's range), so sorting keys sorts voxels in
lexicographic ``(x, y, z)`` index order.
"""

from __future__ import annotations

import numpy as np

_BIAS = 1 << 20  # voxel indices are packed into 21 bits per axis (as the library's range)


def _codes(idx):
  """Packs voxel indices into sortable keys.

  Args:
    idx: int64 ``(P, 3)`` voxel indices, ``|i| < 2**20``.

  Returns:
    int64 ``(P,)`` keys, ordered as the indices are lexicographically.
  """
  b = idx + _BIAS
  return (b[:, 0] << 42) | (b[:, 1] << 21) | b[:, 2]


def _decode(codes):
  """Inverse of :func:`_codes`: int64 ``(P,)`` keys to int64 ``(P, 3)`` indices."""
  mask = (1 << 21) - 1
  return np.stack([codes >> 42, (codes >> 21) & mask, codes & mask], 1) - _BIAS


def _first_voxels(points, priority, num_voxels, voxel_size):
  """The ``num_voxels`` voxels of ``points`` whose points come first by ``priority``.

  A voxel's priority is the smallest of its points'; voxels are kept in that order, so
  the points with ``priority <= cut`` give exactly the kept voxels.

  Args:
    points: float ``(P, 3)`` positions.
    priority: ``(P,)`` priorities (smaller first), distinct between voxels.
    num_voxels: how many voxels to keep (all of them when there are fewer).
    voxel_size: the voxel edge.

  Returns:
    ``(codes, cut)``: the kept voxels' int64 keys ``(K,)`` (sorted) and the cut-off
    priority (``inf`` when every voxel is kept).
  """
  codes = _codes(np.floor(points / voxel_size).astype(np.int64))
  order = np.lexsort((priority, codes))  # by voxel, then priority
  codes, priority = codes[order], priority[order]
  first = np.ones(len(codes), bool)
  first[1:] = codes[1:] != codes[:-1]
  codes, priority = codes[first], priority[first]
  if len(codes) > num_voxels:
    keep = np.argsort(priority, kind="stable")[:num_voxels]
    cut = priority[keep[-1]]
    codes = np.sort(codes[keep])
  else:
    cut = np.inf
  return codes, cut


def _centres(codes, voxel_size):
  """float32 ``(K, 3)`` voxel centres ``(i + 0.5) * vs`` of int64 keys ``(K,)``."""
  return ((_decode(codes) + 0.5) * voxel_size).astype(np.float32)


def cloud_stats(voxels, voxel_size):
  """Size, extent and mean number of occupied ``K=3`` neighbours of a voxel cloud.

  Args:
    voxels: ``(N, 3)`` unique voxel centres ``(i + 0.5) * voxel_size``.
    voxel_size: the voxel edge.

  Returns:
    ``dict(n=N, extent=(ex, ey, ez), neighbours=mean)``: the extent in voxels per axis;
    the neighbours counted among the 27 cells around each voxel, itself included
    (so the pairs per output of a submanifold ``K=3`` map).
  """
  idx = np.round(np.asarray(voxels, np.float64) / voxel_size - 0.5).astype(np.int64)
  if len(idx) == 0:
    return dict(n=0, extent=(0, 0, 0), neighbours=0.0)
  lo = idx.min(0) - 1
  codes = np.sort(_codes(idx - lo))
  total = 0
  for d in np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3):
    q = _codes(idx - lo + d)
    found = codes[np.minimum(np.searchsorted(codes, q), len(codes) - 1)]
    total += int(np.count_nonzero(found == q))
  extent = tuple(int(e) for e in idx.max(0) - idx.min(0) + 1)
  return dict(n=len(idx), extent=extent, neighbours=total / len(idx))
