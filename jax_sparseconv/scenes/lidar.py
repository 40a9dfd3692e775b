"""A street scanned by a simulated spinning 64-beam LiDAR (:func:`lidar_points`,
:func:`lidar_voxels`, the bench's "outdoor" cloud): an analytic ray caster against
boxes, vertical cylinders and spheres. NumPy only, deterministic in a seed."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._voxels import _centres, _codes, _first_voxels

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


def _near_scene(blocks, seed, sweep):
  """The objects within reach of sweep ``sweep``: ``(scene, near)``, ``scene`` the
  concatenated ``(boxes, cylinders, spheres)`` of the blocks ``near`` (increasing block
  indices). ``blocks`` caches :func:`_street_block` by block index."""
  x = sweep * SWEEP_SPACING
  for b in range(int(np.floor((x - 90) / _BLOCK)), int(np.floor((x + 90) / _BLOCK)) + 1):
    if b not in blocks:
      blocks[b] = _street_block(seed, b)
  near = [k for k in blocks if abs((k + 0.5) * _BLOCK - x) < 90 + _BLOCK]
  return tuple(np.concatenate(z) for z in zip(*(blocks[k] for k in near))), near


def _check_az_steps(az_steps):
  if az_steps % LIDAR_WEDGES or az_steps < LIDAR_WEDGES:
    raise ValueError(f"az_steps must be a positive multiple of {LIDAR_WEDGES}")


def _lidar(num_voxels, voxel_size, seed, az_steps):
  _check_az_steps(az_steps)
  order = _wedge_order(LIDAR_WEDGES)
  beams = LIDAR_ELEVATIONS.size
  blocks = {}
  pts, labels, prio = [], [], []
  have, pending, bound = np.zeros(0, np.int64), [], 0
  sweep = 0
  while True:
    scene, _ = _near_scene(blocks, seed, sweep)
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


#: Car instance ids of :func:`lidar_sweep`: ``1 + CAR_IDS_PER_BLOCK * (block + 2) + j``
#: for the ``j``-th car of a block (blocks from -2: the first sweep sees 90 m back).
CAR_IDS_PER_BLOCK = 64


class Sweep(NamedTuple):
  """One revolution of the simulated LiDAR (:func:`lidar_sweep`)."""
  points: np.ndarray     #: float32 ``(P, 3)`` positions, frame of the first sweep
  labels: np.ndarray     #: int32 ``(P,)`` indices into :data:`LIDAR_LABELS`
  instances: np.ndarray  #: int32 ``(P,)`` car instance ids, 0 off cars
  rings: np.ndarray      #: int32 ``(P,)`` beam of each point (index into LIDAR_ELEVATIONS)
  origin: np.ndarray     #: float64 ``(3,)`` sensor position


def lidar_sweep(sweep: int = 0, seed: int = 0, *, az_steps: int = 2048) -> Sweep:
  """One full revolution of the simulated LiDAR of :func:`lidar_points`: a single scan.

  The sensor is at ``(SWEEP_SPACING * sweep, -1.75, 0)`` on the street of ``seed`` (the
  street of :func:`lidar_points` with the same seed; sweep 0 is its first sweep, and
  :func:`lidar_points` of fewer voxels than a revolution gives a subset of these
  points, bit for bit). The 128 wedges are cast in azimuth order from -180 degrees,
  each wedge's rays beam by beam. A scan at 2048 azimuth steps has ~100k points
  (~25k at 512) and takes ~0.2 s.

  Args:
    sweep: which sweep along the street (``>= 0``); each has its own noise.
    seed: the street.
    az_steps: azimuth steps per revolution, a multiple of :data:`LIDAR_WEDGES`.

  Returns:
    :class:`Sweep` ``(points, labels, instances, rings, origin)``: positions in the
    frame of the first sweep (road at z = -1.73; subtract ``origin`` for the sensor
    frame); car instance ids are the same for a car in every sweep (see
    :data:`CAR_IDS_PER_BLOCK`).
  """
  _check_az_steps(az_steps)
  if sweep < 0:
    raise ValueError(f"sweep must be >= 0, got {sweep}")
  scene, near = _near_scene({}, seed, sweep)
  parts = [_lidar_wedge(scene, sweep, wedge, az_steps, seed) for wedge in range(LIDAR_WEDGES)]
  points = np.concatenate([p for p, _, _ in parts])
  labels = np.concatenate([lab for _, lab, _ in parts])
  rings = (np.concatenate([ray for _, _, ray in parts]) % LIDAR_ELEVATIONS.size).astype(np.int32)
  instances = np.zeros(len(points), np.int32)
  car = np.flatnonzero(labels == LIDAR_LABELS.index("car"))
  p = points[car].astype(np.float64)
  for b in near:
    boxes = _street_block(seed, b)[0]
    boxes = boxes[boxes[:, 6] == LIDAR_LABELS.index("car")]
    if len(boxes) >= CAR_IDS_PER_BLOCK:
      raise ValueError(f"block {b} has {len(boxes)} cars, more than CAR_IDS_PER_BLOCK")
    for j, box in enumerate(boxes):  # 15 cm around the box: range noise is 2 cm
      inside = np.all((p >= box[:3] - 0.15) & (p <= box[3:6] + 0.15), axis=1)
      hit = car[inside & (instances[car] == 0)]
      instances[hit] = 1 + CAR_IDS_PER_BLOCK * (b + 2) + j
  origin = np.array([sweep * SWEEP_SPACING, -1.75, 0.0])
  return Sweep(points, labels, instances, rings, origin)
