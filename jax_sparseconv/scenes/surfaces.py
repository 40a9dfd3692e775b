"""Compact surfaces (:func:`surface_points`, :func:`surface_voxels`, the bench's
"compact" cloud) and small shapes spread out in a large volume (:func:`spread_voxels`,
"spread"). NumPy only, deterministic in a seed."""

from __future__ import annotations

import numpy as np

from ._voxels import _centres, _codes, _first_voxels

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


# ---------------------------------------------------------------------------------------
# Shapes spread out in a large volume
# ---------------------------------------------------------------------------------------

SPREAD_VOLUME = (400, 400, 360)  # voxels
SPREAD_THICKNESS = 0.02  # standard deviation of the surface noise, voxels
_R3 = 1.0 / 1.2207440846057596**np.arange(1, 4)  # Roberts' R3 sequence steps


def _rotation(rng):
  q = rng.standard_normal(4)
  a, b, c, d = q / np.linalg.norm(q)
  return np.array([[a*a + b*b - c*c - d*d, 2 * (b*c - a*d), 2 * (b*d + a*c)],
                   [2 * (b*c + a*d), a*a - b*b + c*c - d*d, 2 * (c*d - a*b)],
                   [2 * (b*d - a*c), 2 * (c*d + a*b), a*a - b*b - c*c + d*d]])


def _spread_shape(seed, i, density, thickness):
  """Points of shape ``i`` (in voxels): a sphere, a box shell or a flat rectangle of
  random size and orientation, somewhere in :data:`SPREAD_VOLUME`."""
  rng = np.random.default_rng([seed, 17, i])
  kind = rng.integers(0, 3)
  if kind == 0:  # sphere
    r = rng.uniform(4, 12)
    k = int(density * 4 * np.pi * r * r)
    v = rng.standard_normal((k, 3))
    p = r * v / np.linalg.norm(v, axis=1, keepdims=True)
    size = r
  elif kind == 1:  # box shell
    s = rng.uniform(6, 20, 3)
    areas = 2 * np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]])
    k = int(density * areas.sum())
    p = (rng.random((k, 3)) - 0.5) * s
    axis = rng.choice(3, k, p=areas / areas.sum())
    p[np.arange(k), axis] = (rng.integers(0, 2, k) - 0.5) * s[axis]
    p = p @ _rotation(rng).T
    size = 0.5 * np.linalg.norm(s)
  else:  # flat rectangle (a wall, a floor, a table top)
    s = rng.uniform(10, 40, 2)
    k = int(density * s[0] * s[1])
    p = np.concatenate([(rng.random((k, 2)) - 0.5) * s, np.zeros((k, 1))], 1) @ _rotation(rng).T
    size = 0.5 * np.linalg.norm(s)
  vol = np.asarray(SPREAD_VOLUME, np.float64)
  # Centres from an R3 low-discrepancy sequence, so that even a few shapes fill the volume.
  u = (np.random.default_rng([seed, 18]).random(3) + (i + 1) * _R3) % 1.0
  centre = size + u * np.maximum(vol - 2 * size, 0)
  return centre + p + thickness * rng.standard_normal(p.shape)


def spread_voxels(num_voxels: int, voxel_size: float = 0.05, seed: int = 0):
  """Random spheres, box shells and flat rectangles spread out in a fixed
  400 x 400 x 360-voxel volume: compact surfaces (~11-12 occupied neighbours per voxel
  at ``K=3``, self included) in a cloud whose extent does not shrink with its size
  (100k voxels fill 0.17% of the volume's bounding box).

  Shapes (8-40 voxels across, ~900 voxels of surface each, 4 points per voxel of
  area, 0.02 voxel of noise) are added until the cloud has ``num_voxels`` voxels; the
  last one is cut by a plane. The layout is in voxels, whatever ``voxel_size``.
  Deterministic in ``seed``; a smaller cloud is a subset of a larger one.

  Returns:
    float32 ``(num_voxels, 3)`` voxel centres ``(i + 0.5) * vs`` in lexicographic
    index order.
  """
  pts, prio, codes, i = [], [], [], 0
  have = 0
  while have < num_voxels:
    p = _spread_shape(seed, i, density=4.0, thickness=SPREAD_THICKNESS)
    codes.append(np.unique(_codes(np.floor(p).astype(np.int64))))
    t = p @ np.random.default_rng([seed, 19, i]).standard_normal(3)
    pts.append(p)
    prio.append(i + 0.5 * (t - t.min()) / max(np.ptp(t), 1e-9))  # the last shape is cut
    i += 1
    have += len(codes[-1])
    if have >= num_voxels:  # shapes rarely overlap: count the union only at the end
      codes = [np.unique(np.concatenate(codes))]
      have = len(codes[0])
  codes, _ = _first_voxels(np.concatenate(pts), np.concatenate(prio), num_voxels, 1.0)
  return _centres(codes, voxel_size)

