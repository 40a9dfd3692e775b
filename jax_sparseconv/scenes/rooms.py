"""Furnished rooms (:func:`room_points`, labelled, for the demo) and an office floor of
them (:func:`room_voxels`, the bench's "indoor" cloud). NumPy only, deterministic in a
seed."""

from __future__ import annotations

import numpy as np

from ._voxels import _centres, _codes, _first_voxels

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


def room_points(seed: int, density: float = 250.0, *, instances: bool = False):
  """A furnished room (no downloads): floor, two or three walls, tables, chairs, balls and
  columns, each surface sampled with ``density`` points per square metre, coloured with
  per-object hues and noise, one label per point (indices into :data:`ROOM_LABELS`).

  The room spans ``[0, w] x [0, d] x [0, 2.4]`` metres, ``w, d`` in 3.5-5 m.

  Args:
    seed: the room (any int, or sequence of ints, ``numpy.random.default_rng`` takes).
    density: points per square metre of surface.
    instances: also return the object of each point (what it returns otherwise is the
      same either way).

  Returns:
    ``(points, colors, labels)``: float32 ``(P, 3)`` metres, float32 ``(P, 3)`` in [0, 1],
    int32 ``(P,)``; with ``instances``, a fourth int32 ``(P,)``: the object index
    (0 the floor, then each wall, table, chair, ball and column in turn).
  """
  rng = np.random.default_rng(seed)
  w, d, h = rng.uniform(3.5, 5.0), rng.uniform(3.5, 5.0), 2.4
  pts, cols, labs, objs = [], [], [], []

  def add(p, label, rgb, noise=0.06):
    pts.append(p)
    cols.append(np.clip(np.asarray(rgb) + noise * rng.standard_normal(p.shape), 0, 1))
    labs.append(np.full(len(p), label))
    objs.append(np.full(len(p), len(objs)))  # draws nothing: the room is the same

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
  out = (points.astype(np.float32), np.concatenate(cols).astype(np.float32),
         np.concatenate(labs).astype(np.int32))
  return out + (np.concatenate(objs).astype(np.int32),) if instances else out


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
