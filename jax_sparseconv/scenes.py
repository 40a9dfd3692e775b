"""Synthetic surface scenes (no downloads): points on planes, spheres and box shells.

Surface voxel clouds are what LiDAR and indoor scans look like to a sparse conv:
about 12-17 occupied neighbours of 27 per voxel at ``K=3``.
"""

from __future__ import annotations

import numpy as np

_AREA = 1.0 + 2 * 4 * np.pi * 0.2**2 + 6 * 0.3**2  # floor + two spheres + a box shell


def surface_points(num_voxels: int, voxel_size: float = 0.05, seed: int = 0,
                   density: float = 6.0, thickness: float = 0.1):
  """Random points on a floor, two spheres and a box shell, scaled so that voxelising
  at ``voxel_size`` gives roughly ``num_voxels`` occupied voxels.

  ``thickness`` is the standard deviation of the noise added to the points, in
  voxels; it thickens surfaces to about 1.5 voxels (about 15 neighbours at K=3 for 0.1).

  Returns:
    ``(points, colors)``: float32 ``(P, 3)`` positions and float32 ``(P, 3)`` RGB in [0, 1].
  """
  rng = np.random.default_rng(seed)
  scale = voxel_size * np.sqrt(num_voxels / (1.45 * _AREA))  # 1.45: noise thickening
  n = int(density * num_voxels)
  parts, colors = [], []

  def add(p, rgb):
    parts.append(p)
    colors.append(np.broadcast_to(np.asarray(rgb, np.float32), p.shape) +
                  0.05 * rng.standard_normal(p.shape).astype(np.float32))

  k = int(n * 1.0 / _AREA)
  add(np.stack([rng.random(k), rng.random(k), np.zeros(k)], 1), [0.5, 0.5, 0.5])
  for centre, rgb in (((0.3, 0.3, 0.25), [0.9, 0.2, 0.2]), ((0.7, 0.4, 0.3), [0.2, 0.8, 0.3])):
    k = int(n * 4 * np.pi * 0.04 / _AREA)
    v = rng.standard_normal((k, 3))
    add(np.asarray(centre) + 0.2 * v / np.linalg.norm(v, axis=1, keepdims=True), rgb)
  k = int(n * 0.54 / _AREA)
  p = rng.random((k, 3))
  axis = rng.integers(0, 3, k)
  p[np.arange(k), axis] = rng.integers(0, 2, k)
  add(np.asarray([0.55, 0.6, 0.0]) + 0.3 * p, [0.2, 0.3, 0.9])
  pts = np.concatenate(parts) * scale
  pts += thickness * voxel_size * rng.standard_normal(pts.shape)  # scanner noise
  pts = pts.astype(np.float32)
  return pts, np.clip(np.concatenate(colors), 0, 1).astype(np.float32)


def surface_voxels(num_voxels: int, voxel_size: float = 0.05, seed: int = 0):
  """Unique voxel centres ``(floor(p / vs) + 0.5) * vs`` of :func:`surface_points`.

  Returns:
    float32 ``(N, 3)`` voxel-centre positions in lexicographic index order,
    with ``N`` close to ``num_voxels``.
  """
  pts, _ = surface_points(num_voxels, voxel_size, seed)
  idx = np.unique(np.floor(pts / voxel_size).astype(np.int64), axis=0)
  return ((idx + 0.5) * voxel_size).astype(np.float32)
