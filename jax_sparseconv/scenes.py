"""Synthetic scenes (no downloads, NumPy only, deterministic in a seed).

Three kinds of voxel cloud, each as unique float32 voxel centres ``(i + 0.5) * vs``
(``*_voxels``, in lexicographic index order) and, where it makes sense, as raw points
(``*_points``). Neighbours are occupied voxels of the 27 at ``K=3``, the voxel itself
included; extents are in voxels per axis, for ``voxel_size=0.05`` and seed 0.

* :func:`surface_voxels` ("compact"): a floor, two spheres and a box shell, scaled to
  the size asked for: ~15.5 neighbours, 164 x 164 x 82 at 100k voxels.
* :func:`lidar_voxels` ("outdoor"): a street scanned by a simulated spinning 64-beam
  LiDAR: thin surfaces, density falling with range, ~5 neighbours, ~3400 x 2700 x 120
  at 100k voxels (merged sweeps at 1M: ~8 neighbours, ~6200 x 2700 x 120).
* :func:`spread_voxels` ("spread"): small shapes spread out in a fixed
  400 x 400 x 360 volume: ~12 neighbours at any size.

This module does not import jax (``bench/open3d_bench.py`` loads it by file path).
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


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------

_BIAS = 1 << 20  # voxel indices are packed into 21 bits per axis (as the library's range)


def _codes(idx):
  """Packs int64 ``(P, 3)`` voxel indices (``|i| < 2**20``) into int64 keys."""
  b = idx + _BIAS
  return (b[:, 0] << 42) | (b[:, 1] << 21) | b[:, 2]


def _decode(codes):
  mask = (1 << 21) - 1
  return np.stack([codes >> 42, (codes >> 21) & mask, codes & mask], 1) - _BIAS


def _first_voxels(points, priority, num_voxels, voxel_size):
  """The ``num_voxels`` voxels of ``points`` whose points come first by ``priority``.

  A voxel's priority is the smallest of its points'; voxels are kept in that order, so
  the points with ``priority <= cut`` give exactly the kept voxels. Returns
  ``(codes, cut)``: the kept voxels' keys (sorted) and the cut-off priority.
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
  return ((_decode(codes) + 0.5) * voxel_size).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Outdoor street scanned by a spinning LiDAR
# ---------------------------------------------------------------------------------------

#: Beam elevations of the simulated 64-beam sensor (HDL-64E-like: two blocks of 32,
#: denser near the horizon), radians.
LIDAR_ELEVATIONS = np.deg2rad(np.concatenate([np.linspace(3.0, -8.5, 32),
                                              np.linspace(-9.0, -25.0, 32)]))
LIDAR_HEIGHT = 1.73   # sensor above the road (KITTI's); the sensor frame has z = 0 at the sensor
LIDAR_RANGE = (2.5, 80.0)  # no returns from the ego car, nor beyond 80 m
RANGE_NOISE = 0.02    # standard deviation of the range, metres (HDL-64E: < 2 cm)
LIDAR_WEDGES = 128    # a revolution is cast in 128 azimuth wedges (2.8 degrees)
SWEEP_SPACING = 10.0  # metres driven between merged sweeps
_BLOCK = 50.0         # the street is generated in 50 m blocks, each from its own seed
CROSSING_P, CROSSING_W = 0.4, (8.0, 14.0)  # chance of a crossing street per block, width
HEDGE_P = 0.5  # chance of a hedge or fence in front of a building
LIDAR_LABELS = ("road", "sidewalk", "building", "car", "pole", "trunk", "vegetation")


def _street_block(seed, b):
  """Objects of the street between ``x = 50 b`` and ``50 (b + 1)`` metres (sensor frame).

  Returns ``boxes (B, 7)`` [x0, y0, z0, x1, y1, z1, label], ``cylinders (C, 6)``
  [x, y, r, z0, z1, label] (vertical) and ``spheres (S, 5)`` [x, y, z, r, label].
  """
  rng = np.random.default_rng([seed, 7, b + (1 << 16)])
  g = -LIDAR_HEIGHT
  lo, hi = b * _BLOCK, (b + 1) * _BLOCK
  boxes, cyls, sphs = [], [], []
  # Some blocks have a crossing street, open to the horizon; the first sweep is taken
  # at one (within 4 m of its axis).
  cross = (np.inf, np.inf)
  p, w = rng.random(), rng.uniform(*CROSSING_W)
  x0 = rng.uniform(-4, 4) - w / 2 if b == 0 else rng.uniform(lo, hi - w)
  if b == 0 or p < CROSSING_P:
    cross = (x0, x0 + w)
  free = lambda a, z: z <= cross[0] or a >= cross[1]
  for side in (-1.0, 1.0):
    # Sidewalk: a 15 cm kerb from |y| = 5.5 m on (courtyards and lots behind the facades).
    for a, z in ((lo, min(cross[0], hi)), (min(cross[1], hi), hi)):
      if z > a:
        boxes.append([a, 5.5, g - 1, z, 90.0, g + 0.15, 1] if side > 0 else
                     [a, -90.0, g - 1, z, -5.5, g + 0.15, 1])
    # Buildings: a front row along the street (facades 8-12 m from its axis, gaps for
    # alleys and parking lots) and a second row behind it.
    for y0, y1, dmin, dmax in ((8.0, 12.0, 8.0, 18.0), (28.0, 40.0, 10.0, 25.0)):
      x = lo
      while x < hi:
        if cross[0] <= x < cross[1]:
          x = cross[1]
          continue
        if rng.random() < 0.2:
          x += rng.uniform(4, 20)
          continue
        length = min(rng.uniform(8, 35), hi - x, cross[0] - x if x < cross[0] else np.inf)
        yf, depth, height = rng.uniform(y0, y1), rng.uniform(dmin, dmax), rng.uniform(6, 25)
        ya, yb = (yf, yf + depth) if side > 0 else (-yf - depth, -yf)
        boxes.append([x, ya, g - 1, x + length, yb, g + height, 2])
        if y0 < 20 and rng.random() < HEDGE_P:  # a hedge or fence in front of it
          yh, th = yf - rng.uniform(0.6, 2.5), rng.uniform(0.3, 1.0)
          ya, yb = (yh - th, yh) if side > 0 else (-yh, -yh + th)
          boxes.append([x + 0.5, ya, g - 1, x + length - 0.5, yb, g + rng.uniform(0.8, 1.8), 6])
        x += length
    x = lo + rng.uniform(0, 5)
    while x < hi:  # parked cars along the kerb (one in five a van)
      length, width = rng.uniform(3.8, 5.0), rng.uniform(1.7, 2.0)
      height = rng.uniform(1.7, 2.1) if rng.random() < 0.2 else rng.uniform(1.4, 1.55)
      y = side * rng.uniform(4.3, 4.6)
      if free(x - 2, x + length + 2):
        boxes.append([x, y - width / 2, g + 0.2, x + length, y + width / 2, g + height, 3])
      x += length + (rng.uniform(4, 15) if rng.random() < 0.25 else rng.uniform(0.8, 4))
    x = lo + rng.uniform(0, 20)
    while x < hi:  # poles (street lights, signs)
      y, r, top = side * rng.uniform(6.0, 6.8), rng.uniform(0.08, 0.15), rng.uniform(4, 9)
      if free(x, x):
        cyls.append([x, y, r, g - 1, g + top, 4])
      x += rng.uniform(15, 35)
    x = lo + rng.uniform(0, 10)
    while x < hi:  # trees: a trunk and a round crown
      y, trunk, r = side * rng.uniform(6.0, 7.2), rng.uniform(2.0, 3.5), rng.uniform(1.5, 3.0)
      radius = rng.uniform(0.12, 0.25)
      if free(x - r, x + r):
        cyls.append([x, y, radius, g - 1, g + trunk + 0.5, 5])
        sphs.append([x, y, g + trunk + 0.8 * r, r, 6])
      x += rng.uniform(8, 25)
  x = lo + rng.uniform(0, 30)
  while x < hi:  # oncoming traffic in the other lane (the sensor drives at y = -1.75)
    length, width = rng.uniform(3.8, 5.0), rng.uniform(1.7, 1.9)
    y, height = rng.uniform(1.6, 1.9), rng.uniform(1.4, 1.6)
    boxes.append([x, y - width / 2, g + 0.2, x + length, y + width / 2, g + height, 3])
    x += length + rng.uniform(15, 60)
  return (np.asarray(boxes, np.float64).reshape(-1, 7),
          np.asarray(cyls, np.float64).reshape(-1, 6),
          np.asarray(sphs, np.float64).reshape(-1, 5))


def _footprints(objs, kind):
  """xy bounding rectangles ``(n, 4)`` [x0, y0, x1, y1] of boxes, cylinders or spheres."""
  if kind == "box":
    return objs[:, [0, 1, 3, 4]]
  r = objs[:, 2] if kind == "cyl" else objs[:, 3]
  return np.stack([objs[:, 0] - r, objs[:, 1] - r, objs[:, 0] + r, objs[:, 1] + r], 1)


def _in_wedge(rect, o, centre, half):
  """Which rectangles may meet the azimuth wedge ``centre +- half`` seen from ``o``.

  The angular extent of a convex shape seen from outside it is spanned by its
  corners; a rectangle straddling the back direction gets the whole circle
  (conservative, never a miss).
  """
  xs = rect[:, [0, 2, 2, 0]] - o[0]
  ys = rect[:, [1, 1, 3, 3]] - o[1]
  rel = np.angle(np.exp(1j * (np.arctan2(ys, xs) - centre)))
  return (rel.min(1) <= half) & (rel.max(1) >= -half)


def _hit_boxes(o, d, boxes):
  with np.errstate(divide="ignore", invalid="ignore"):
    inv = 1.0 / d
    t1 = (boxes[None, :, 0:3] - o) * inv[:, None, :]
    t2 = (boxes[None, :, 3:6] - o) * inv[:, None, :]
    near = np.nanmax(np.minimum(t1, t2), axis=2)
    far = np.nanmin(np.maximum(t1, t2), axis=2)
  return np.where((near <= far) & (near > 0), near, np.inf)


def _hit_cylinders(o, d, cyls):
  ox, oy = o[0] - cyls[:, 0], o[1] - cyls[:, 1]
  dx, dy = d[:, 0:1], d[:, 1:2]
  a = dx * dx + dy * dy
  b = 2 * (ox * dx + oy * dy)
  disc = b * b - 4 * a * (ox * ox + oy * oy - cyls[:, 2]**2)
  with np.errstate(divide="ignore", invalid="ignore"):
    t = (-b - np.sqrt(disc)) / (2 * a)
  z = o[2] + t * d[:, 2:3]
  return np.where((disc >= 0) & (t > 0) & (z >= cyls[:, 3]) & (z <= cyls[:, 4]), t, np.inf)


def _hit_spheres(o, d, sphs):
  oc = o - sphs[:, :3]
  b = 2 * d @ oc.T
  disc = b * b - 4 * ((oc * oc).sum(1) - sphs[:, 3]**2)
  with np.errstate(invalid="ignore"):
    t = (-b - np.sqrt(disc)) / 2
  return np.where((disc >= 0) & (t > 0), t, np.inf)


def _cast(o, d, scene):
  """Distance along unit rays ``d`` from ``o`` to the first surface, and its label."""
  t = np.full(len(d), np.inf)
  label = np.zeros(len(d), np.int32)  # road
  with np.errstate(divide="ignore"):
    ground = np.where(d[:, 2] < 0, (-LIDAR_HEIGHT - o[2]) / d[:, 2], np.inf)
  t = np.minimum(t, ground)
  for objs, hit in zip(scene, (_hit_boxes, _hit_cylinders, _hit_spheres)):
    if len(objs):
      ts = hit(o, d, objs)
      j = np.argmin(ts, axis=1)
      tj = ts[np.arange(len(d)), j]
      closer = tj < t
      t = np.where(closer, tj, t)
      label = np.where(closer, objs[j, -1].astype(np.int32), label)
  return t, label


def _wedge_order(n):
  """Bit-reversal order of ``n`` (a power of two) wedges: every prefix is spread evenly
  around the circle (0, n/2, n/4, 3n/4, ...)."""
  bits = n.bit_length() - 1
  return [int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)]


def _lidar_wedge(scene, sweep, wedge, az_steps, seed):
  """Points and labels of one azimuth wedge of sweep ``sweep``. Each wedge draws its
  noise from its own seed, so a cloud is the same whatever else is cast."""
  rng = np.random.default_rng([seed, 11, sweep, wedge])
  o = np.array([sweep * SWEEP_SPACING, -1.75, 0.0])
  cols = az_steps // LIDAR_WEDGES
  step = 2 * np.pi / az_steps
  az0 = -np.pi + wedge * cols * step
  beams = LIDAR_ELEVATIONS.size
  # Per-beam azimuth offsets (the lasers are not aligned) and timing jitter.
  az = (az0 + (np.arange(cols) + 0.5) * step)[None, :] + \
      np.random.default_rng([seed, 12]).uniform(-0.5, 0.5, (beams, 1)) * step + \
      rng.normal(0, 0.05, (beams, cols)) * step
  el = np.broadcast_to(LIDAR_ELEVATIONS[:, None], az.shape)
  d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
  centre, half = az0 + cols * step / 2, cols * step / 2 + 2 * step
  r_min, r_max = LIDAR_RANGE
  boxes, cyls, sphs = scene
  culled = []
  for objs, kind in ((boxes, "box"), (cyls, "cyl"), (sphs, "sph")):
    rect = _footprints(objs, kind)
    dist = np.hypot(np.maximum(np.maximum(rect[:, 0] - o[0], o[0] - rect[:, 2]), 0),
                    np.maximum(np.maximum(rect[:, 1] - o[1], o[1] - rect[:, 3]), 0))
    culled.append(objs[(dist < r_max) & _in_wedge(rect, o, centre, half)])
  t, label = _cast(o, d, culled)
  keep = (t > r_min) & (t < r_max) & (rng.random(len(t)) > 0.03)  # 3% dropped returns
  t = t[keep] + rng.normal(0, RANGE_NOISE, int(keep.sum()))
  ray = (np.arange(cols)[None, :] * beams + np.arange(beams)[:, None]).reshape(-1)
  # float32, as returned: voxels are counted from exactly these positions
  return (o + t[:, None] * d[keep]).astype(np.float32), label[keep], ray[keep]


def _lidar(num_voxels, voxel_size, seed, az_steps):
  if az_steps % LIDAR_WEDGES or az_steps < LIDAR_WEDGES:
    raise ValueError(f"az_steps must be a positive multiple of {LIDAR_WEDGES}")
  order = _wedge_order(LIDAR_WEDGES)
  beams = LIDAR_ELEVATIONS.size
  blocks = {}
  pts, labels, prio = [], [], []
  have, pending, bound = np.zeros(0, np.int64), [], 0
  sweep = 0
  while True:
    x = sweep * SWEEP_SPACING
    for b in range(int(np.floor((x - 90) / _BLOCK)), int(np.floor((x + 90) / _BLOCK)) + 1):
      if b not in blocks:
        blocks[b] = _street_block(seed, b)
    near = [v for k, v in blocks.items() if abs((k + 0.5) * _BLOCK - x) < 90 + _BLOCK]
    scene = tuple(np.concatenate(z) for z in zip(*near))
    for rank, wedge in enumerate(order):
      p, lab, ray = _lidar_wedge(scene, sweep, wedge, az_steps, seed)
      pts.append(p)
      labels.append(lab)
      prio.append((sweep * LIDAR_WEDGES + rank) * az_steps * beams + ray)
      pending.append(np.unique(_codes(np.floor(p / voxel_size).astype(np.int64))))
      bound += len(pending[-1])
      if bound >= num_voxels:  # merge only when the new wedges may be enough
        have = np.unique(np.concatenate([have] + pending))
        pending, bound = [], len(have)
      if len(have) >= num_voxels:
        break
    if len(have) >= num_voxels:
      break
    sweep += 1  # the street goes on forever: every sweep adds voxels
  pts, labels, prio = np.concatenate(pts), np.concatenate(labels), np.concatenate(prio)
  codes, cut = _first_voxels(pts, prio, num_voxels, voxel_size)
  keep = prio <= cut
  return pts[keep], labels[keep], codes


def lidar_points(num_voxels: int, voxel_size: float = 0.05, seed: int = 0, *,
                 az_steps: int = 2048):
  """A street scanned by a simulated spinning 64-beam LiDAR (outdoor-scan statistics).

  The sensor (1.73 m above the road, 64 beams from +3 to -25 degrees, ``az_steps``
  azimuth steps per revolution: 0.18 degrees by default, an HDL-64E at 10 Hz) drives
  along the x axis of a street: the road, 15 cm kerbs, building facades on both sides
  (gaps for alleys and lots, a second row behind, hedges in front), crossing streets
  open to the horizon (the first sweep is taken in one), parked and oncoming cars
  (boxes), poles (vertical cylinders) and trees (a trunk and a spherical crown). Rays
  are cast analytically against these; returns between 2.5 and 80 m are kept, with
  2 cm of range noise and 3% dropped. At 5 cm, 100k voxels span ~170 x 135 x 6 m
  (~3400 x 2700 x 120 voxels), surfaces are thin and the density falls with range:
  ~5 occupied neighbours per voxel at ``K=3`` (self included; 4.6-6.4 over seeds 0-5),
  what SemanticKITTI-like scans look like to a sparse conv.

  The size is set by how much is scanned, not by a coarser scanner (which would leave
  isolated voxels: 2 neighbours at 1/8 of the resolution): a revolution is cast in
  128 azimuth wedges taken in bit-reversed order, so that any number of them is spread
  evenly around the sensor and keeps the extent; one revolution gives ~90k voxels at
  5 cm; larger clouds merge further sweeps taken every 10 m along the street (as
  multi-sweep maps do: denser, ~8 neighbours at 1M, and longer). The last wedge is
  cut ray by ray so that voxelising the points at ``voxel_size`` gives exactly
  ``num_voxels`` voxels (10k voxels: ~15 wedges, 3.9 neighbours: wedge edges cut the
  scan lines). Coordinates are metres in the frame of the first sweep (road at
  z = -1.73). Deterministic in ``seed``; a smaller cloud is a subset of a larger one.

  Returns:
    ``(points, labels)``: float32 ``(P, 3)`` positions and int32 ``(P,)`` indices
    into :data:`LIDAR_LABELS`.
  """
  pts, labels, _ = _lidar(num_voxels, voxel_size, seed, az_steps)
  return pts, labels


def lidar_voxels(num_voxels: int, voxel_size: float = 0.05, seed: int = 0, *,
                 az_steps: int = 2048):
  """Unique voxel centres ``(i + 0.5) * vs`` of :func:`lidar_points`.

  Returns:
    float32 ``(num_voxels, 3)`` voxel centres in lexicographic index order.
  """
  return _centres(_lidar(num_voxels, voxel_size, seed, az_steps)[2], voxel_size)


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


# ---------------------------------------------------------------------------------------
# The bench's clouds
# ---------------------------------------------------------------------------------------


def cloud_stats(voxels, voxel_size):
  """Size, extent and mean number of occupied ``K=3`` neighbours of a voxel cloud.

  Args:
    voxels: ``(N, 3)`` unique voxel centres ``(i + 0.5) * voxel_size``.

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


# ---------------------------------------------------------------- labelled rooms (demo)

#: Classes of :func:`room_points`, in label order.
ROOM_LABELS = ("floor", "wall", "table", "chair", "ball", "column")


def _box_surface(rng, lo, hi, density):
  """Points on the six faces of the axis-aligned box ``[lo, hi]``."""
  lo, hi = np.asarray(lo, float), np.asarray(hi, float)
  size = hi - lo
  parts = []
  for axis in range(3):
    a, b = [i for i in range(3) if i != axis]
    k = max(1, int(density * size[a] * size[b]))
    for side in (lo[axis], hi[axis]):
      p = lo + rng.random((k, 3)) * size
      p[:, axis] = side
      parts.append(p)
  return np.concatenate(parts)


def room_points(seed: int, density: float = 250.0):
  """A furnished room (no downloads): floor, two or three walls, tables, chairs, balls and
  columns, each surface sampled with ``density`` points per square metre, coloured with
  per-object hues and noise, one label per point (indices into :data:`ROOM_LABELS`).

  Returns:
    ``(points, colors, labels)``: float32 ``(P, 3)`` metres, float32 ``(P, 3)`` in [0, 1],
    int32 ``(P,)``.
  """
  rng = np.random.default_rng(seed)
  w, d, h = rng.uniform(3.5, 5.0), rng.uniform(3.5, 5.0), 2.4
  pts, cols, labs = [], [], []

  def add(p, label, rgb, noise=0.06):
    pts.append(p)
    cols.append(np.clip(np.asarray(rgb) + noise * rng.standard_normal(p.shape), 0, 1))
    labs.append(np.full(len(p), label))

  k = int(density * w * d)
  add(np.c_[rng.random(k) * w, rng.random(k) * d, np.zeros(k)], 0, rng.uniform(0.35, 0.6, 3))
  wall_rgb = rng.uniform(0.7, 0.9, 3)
  for side in rng.permutation(4)[:rng.integers(2, 4)]:
    length = w if side < 2 else d
    k = int(density * length * h)
    t, z = rng.random(k) * length, rng.random(k) * h
    x, y = (t, np.full(k, 0.0 if side == 0 else d)) if side < 2 else (np.full(k, 0.0 if side == 2
                                                                              else w), t)
    add(np.c_[x, y, z], 1, wall_rgb)
  taken = []

  def spot(radius):
    for _ in range(50):
      c = rng.uniform([radius + 0.2, radius + 0.2], [w - radius - 0.2, d - radius - 0.2])
      if all(np.hypot(*(c - q)) > radius + r + 0.15 for q, r in taken):
        taken.append((c, radius))
        return c
    return None

  for _ in range(rng.integers(1, 3)):  # tables: a top and four legs
    c, (a, b) = spot(0.75), rng.uniform(0.5, 0.8, 2)
    if c is None:
      continue
    rgb, top = rng.uniform([0.4, 0.25, 0.1], [0.7, 0.45, 0.25]), rng.uniform(0.7, 0.8)
    parts = [_box_surface(rng, [c[0] - a, c[1] - b, top - 0.04], [c[0] + a, c[1] + b, top],
                          density)]
    for sx in (-1, 1):
      for sy in (-1, 1):
        q = c + [sx * (a - 0.06), sy * (b - 0.06)]
        parts.append(_box_surface(rng, [q[0] - 0.03, q[1] - 0.03, 0], [q[0] + 0.03, q[1] + 0.03,
                                                                        top], density))
    add(np.concatenate(parts), 2, rgb)
  for _ in range(rng.integers(2, 5)):  # chairs: a seat, a back and four legs
    c, s = spot(0.35), 0.22
    if c is None:
      continue
    rgb, seat = rng.random(3), 0.45
    side = rng.integers(4)
    back_lo = [c[0] - s, c[1] - s, seat] if side != 1 else [c[0] - s, c[1] + s - 0.04, seat]
    back_hi = [c[0] + s, c[1] - s + 0.04, seat + 0.45] if side != 1 else [c[0] + s, c[1] + s,
                                                                          seat + 0.45]
    parts = [_box_surface(rng, [c[0] - s, c[1] - s, seat - 0.04], [c[0] + s, c[1] + s, seat],
                          density), _box_surface(rng, back_lo, back_hi, density)]
    for sx in (-1, 1):
      for sy in (-1, 1):
        q = c + [sx * (s - 0.03), sy * (s - 0.03)]
        parts.append(_box_surface(rng, [q[0] - 0.02, q[1] - 0.02, 0], [q[0] + 0.02, q[1] + 0.02,
                                                                        seat], density))
    add(np.concatenate(parts), 3, rgb)
  for _ in range(rng.integers(1, 4)):  # balls
    r = rng.uniform(0.15, 0.35)
    c = spot(r)
    if c is None:
      continue
    v = rng.standard_normal((int(density * 4 * np.pi * r * r), 3))
    add(np.r_[c, r] + r * v / np.linalg.norm(v, axis=1, keepdims=True), 4, rng.random(3))
  for _ in range(rng.integers(1, 3)):  # columns
    r = rng.uniform(0.1, 0.2)
    c = spot(r)
    if c is None:
      continue
    k = int(density * 2 * np.pi * r * h)
    phi, z = rng.random(k) * 2 * np.pi, rng.random(k) * h
    add(np.c_[c[0] + r * np.cos(phi), c[1] + r * np.sin(phi), z], 5, rng.uniform(0.5, 0.9, 3))
  points = np.concatenate(pts) + 0.005 * rng.standard_normal((sum(map(len, pts)), 3))
  return (points.astype(np.float32), np.concatenate(cols).astype(np.float32),
          np.concatenate(labs).astype(np.int32))


ROOM_PITCH = 5.5  # metres between the origins of neighbouring rooms of room_voxels
ROOMS_PER_ROW = 6


def room_voxels(num_voxels: int, voxel_size: float = 0.05, seed: int = 0):
  """An office floor of furnished rooms (:func:`room_points`: floor, walls, tables,
  chairs, balls, columns), ``ROOMS_PER_ROW`` rooms a row at ``ROOM_PITCH`` metres, added
  until the floor has ``num_voxels`` occupied voxels (the last room is cut by a plane).

  Surfaces are sampled with 4 points per voxel of area (``4 / voxel_size**2`` per square
  metre), so they are closed at any voxel size. Deterministic in ``seed``; a smaller
  cloud is a subset of a larger one.

  Returns:
    float32 ``(num_voxels, 3)`` voxel centres ``(i + 0.5) * vs`` in lexicographic index
    order.
  """
  pts, prio, i, have = [], [], 0, 0
  while have < num_voxels:
    p = room_points(seed * 100_003 + i, density=4.0 / voxel_size**2)[0].astype(np.float64)
    p[:, :2] += ROOM_PITCH * np.array([i % ROOMS_PER_ROW, i // ROOMS_PER_ROW])
    t = p @ np.random.default_rng([seed, 23, i]).standard_normal(3)
    pts.append(p)
    prio.append(i + 0.5 * (t - t.min()) / max(np.ptp(t), 1e-9))  # the last room is cut
    have += len(np.unique(_codes(np.floor(p / voxel_size).astype(np.int64))))  # no overlap
    i += 1
  codes, _ = _first_voxels(np.concatenate(pts), np.concatenate(prio), num_voxels, voxel_size)
  return _centres(codes, voxel_size)


#: The voxel-cloud generators by the name ``bench/run.py`` gives them (``--clouds``).
CLOUDS = {"compact": surface_voxels, "spread": spread_voxels, "outdoor": lidar_voxels,
          "indoor": room_voxels}
