"""The bench's synthetic clouds (``jax_sparseconv.scenes``): sizes, lattice, statistics.

NumPy only and fast (~2 s): the statistics that make each cloud what it stands for
(extent in voxels per axis, occupied K=3 neighbours per voxel) are checked here so
that a change to a generator cannot silently turn a workload into another one.
"""

from __future__ import annotations

import itertools
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jax_sparseconv import scenes

VS = 0.05


def set_stats(voxels, vs):
  """Extent and mean K=3 neighbours (self included) with a Python set: the reference."""
  idx = np.round(voxels.astype(np.float64) / vs - 0.5).astype(np.int64)
  occupied = set(map(tuple, idx.tolist()))
  offsets = list(itertools.product((-1, 0, 1), repeat=3))
  total = sum((x + a, y + b, z + c) in occupied for x, y, z in occupied for a, b, c in offsets)
  return tuple(int(e) for e in idx.max(0) - idx.min(0) + 1), total / len(occupied)


@pytest.fixture(scope="module")
def clouds():
  return {name: fn(10_000, VS, 0) for name, fn in scenes.CLOUDS.items()}


@pytest.mark.parametrize("name", ["compact", "spread", "outdoor", "indoor"])
def test_count_unique_on_lattice(clouds, name):
  v = clouds[name]
  assert v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 3
  assert abs(len(v) - 10_000) <= 0.2 * 10_000
  if name != "compact":
    assert len(v) == 10_000  # cut to the exact size
  q = v.astype(np.float64) / VS - 0.5
  assert np.max(np.abs(q - np.round(q))) < 1e-3  # voxel centres (i + 0.5) * vs
  idx = np.round(q).astype(np.int64)
  assert len(np.unique(idx, axis=0)) == len(v)
  assert np.array_equal(idx, idx[np.lexsort(idx.T[::-1])])  # lexicographic order


@pytest.mark.parametrize("name", ["compact", "spread", "outdoor", "indoor"])
def test_cloud_stats_matches_a_set(clouds, name):
  st = scenes.cloud_stats(clouds[name], VS)
  extent, nbrs = set_stats(clouds[name], VS)
  assert st["n"] == len(clouds[name]) and st["extent"] == extent
  assert st["neighbours"] == pytest.approx(nbrs, rel=1e-12)


def test_deterministic_and_seeded(clouds):
  for name, fn in scenes.CLOUDS.items():
    np.testing.assert_array_equal(fn(10_000, VS, 0), clouds[name])
    other = fn(10_000, VS, 1)
    assert other.shape != clouds[name].shape or not np.array_equal(other, clouds[name])


def test_compact_statistics(clouds):
  extent, nbrs = set_stats(clouds["compact"], VS)
  assert 13.5 <= nbrs <= 17  # ~15.5: surfaces ~1.5 voxels thick
  assert all(e < 80 for e in extent)  # compact: ~(N/4)^(1/2) voxels wide


def test_spread_statistics(clouds):
  extent, nbrs = set_stats(clouds["spread"], VS)
  assert 10.5 <= nbrs <= 13  # ~11.7
  assert all(e >= 240 for e in extent)  # a few shapes already spread out
  st = scenes.cloud_stats(scenes.spread_voxels(100_000, VS, 0), VS)
  assert st["n"] == 100_000
  assert 10.5 <= st["neighbours"] <= 13  # the same surfaces at any size
  ex, ey, ez = st["extent"]
  assert 360 <= ex <= 400 and 360 <= ey <= 400 and 320 <= ez <= 360  # 400 x 400 x 360


def test_outdoor_statistics(clouds):
  extent, nbrs = set_stats(clouds["outdoor"], VS)
  assert 3.0 <= nbrs <= 6.5  # ~3.9 at 10k (thin wedges of the scan)
  assert extent[0] >= 2000 and extent[1] >= 1000 and 80 <= extent[2] <= 160
  st = scenes.cloud_stats(scenes.lidar_voxels(100_000, VS, 0), VS)
  assert st["n"] == 100_000
  assert 4.3 <= st["neighbours"] <= 6.5  # ~5: thin surfaces, sparse far away
  ex, ey, ez = st["extent"]
  assert 2500 <= ex <= 5000 and 2000 <= ey <= 4000 and 80 <= ez <= 160  # thousands wide


def test_indoor_statistics(clouds):
  extent, nbrs = set_stats(clouds["indoor"], VS)
  assert 12 <= nbrs <= 18  # ~15: closed surfaces of rooms and furniture
  assert extent[2] <= 50  # rooms are 2.4 m high
  st = scenes.cloud_stats(scenes.room_voxels(100_000, VS, 0), VS)
  assert st["n"] == 100_000 and 12 <= st["neighbours"] <= 18
  ex, ey, ez = st["extent"]
  assert ex >= 200 and ey >= 60 and ez <= 50  # several rooms side by side


def test_lidar_points_voxelise_to_lidar_voxels(clouds):
  pts, labels = scenes.lidar_points(10_000, VS, 0)
  assert pts.dtype == np.float32 and labels.dtype == np.int32 and len(pts) == len(labels)
  assert labels.min() >= 0 and labels.max() < len(scenes.LIDAR_LABELS)
  assert len(np.unique(labels)) >= 5  # road, sidewalk, buildings, cars, vegetation, ...
  idx = np.unique(np.floor(pts / VS).astype(np.int64), axis=0)
  np.testing.assert_array_equal(((idx + 0.5) * VS).astype(np.float32), clouds["outdoor"])
  r = np.linalg.norm(pts[:, :2] - [0.0, -1.75], axis=1)
  assert r.max() < scenes.LIDAR_RANGE[1] + 0.1 and np.median(r) < 20  # density falls with range


@pytest.mark.parametrize("name", ["spread", "outdoor", "indoor"])
def test_smaller_cloud_is_a_subset(clouds, name):
  big = scenes.CLOUDS[name](15_000, VS, 0)
  small = set(map(tuple, clouds[name].tolist()))
  assert small <= set(map(tuple, big.tolist()))


def test_other_voxel_size():
  v = scenes.lidar_voxels(5_000, 0.1, 3)
  q = v / 0.1 - 0.5
  assert len(v) == 5_000 and np.max(np.abs(q - np.round(q))) < 1e-3


def test_importable_without_jax():
  """The recipe of the subpackage's docstring, in a fresh interpreter where importing
  jax fails: only ``scenes/`` is run, not ``jax_sparseconv/__init__.py``."""
  path = pathlib.Path(scenes.__file__).parent
  assert path.name == "scenes" and (path / "__init__.py").is_file()
  code = ("import importlib.abc, importlib.util, sys\n"
          "class NoJax(importlib.abc.MetaPathFinder):\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name.split('.')[0] in ('jax', 'jaxlib', 'jax_sparseconv'):\n"
          "      raise ImportError('blocked: ' + name)\n"
          "sys.meta_path.insert(0, NoJax())\n"
          f"path = {str(path)!r}\n"
          "spec = importlib.util.spec_from_file_location(\n"
          "    'scenes', path + '/__init__.py', submodule_search_locations=[path])\n"
          "scenes = importlib.util.module_from_spec(spec)\n"
          "sys.modules['scenes'] = scenes\n"
          "spec.loader.exec_module(scenes)\n"
          "assert not any(m.split('.')[0] in ('jax', 'jaxlib', 'jax_sparseconv')\n"
          "               for m in sys.modules)\n"
          "assert sorted(scenes.CLOUDS) == ['compact', 'indoor', 'outdoor', 'spread']\n"
          "for fn in scenes.CLOUDS.values():\n"
          "  print(fn.__name__, fn(1000).tobytes().hex()[:64])\n"
          "pts, lab = scenes.lidar_points(1000)\n"
          "print('lidar_points', len(pts), lab.max())\n")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       text=True).stdout.splitlines()
  here = [f"{fn.__name__} {fn(1000).tobytes().hex()[:64]}" for fn in scenes.CLOUDS.values()]
  assert out[:4] == here  # the same generators, loaded either way
  pts, lab = scenes.lidar_points(1000)
  assert out[4] == f"lidar_points {len(pts)} {lab.max()}"


def test_blocked_jax_really_fails():
  """The blocker of ``test_importable_without_jax`` does block (else that test proves
  nothing)."""
  code = ("import importlib.abc, sys\n"
          "class NoJax(importlib.abc.MetaPathFinder):\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name.split('.')[0] in ('jax', 'jaxlib', 'jax_sparseconv'):\n"
          "      raise ImportError('blocked: ' + name)\n"
          "sys.meta_path.insert(0, NoJax())\n"
          "import jax_sparseconv.scenes\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.returncode != 0 and "blocked: jax_sparseconv" in r.stderr


def test_public_names():
  """Everything the single-module ``scenes.py`` offered is still at the package level."""
  for name in ("surface_points", "surface_voxels", "lidar_points", "lidar_voxels",
               "spread_voxels", "room_points", "room_voxels", "cloud_stats", "CLOUDS",
               "LIDAR_LABELS", "LIDAR_ELEVATIONS", "LIDAR_HEIGHT", "LIDAR_RANGE",
               "RANGE_NOISE", "LIDAR_WEDGES", "SWEEP_SPACING", "CROSSING_P", "CROSSING_W",
               "HEDGE_P", "SPREAD_VOLUME", "SPREAD_THICKNESS", "ROOM_LABELS", "ROOM_PITCH",
               "ROOMS_PER_ROW"):
    assert hasattr(scenes, name), name
  assert set(scenes.__all__) <= set(dir(scenes))
  assert scenes.LIDAR_LABELS == ("road", "sidewalk", "building", "car", "pole", "trunk",
                                 "vegetation")
  assert scenes.ROOM_LABELS == ("floor", "wall", "table", "chair", "ball", "column")


def test_lidar_sweep_is_one_revolution():
  s = scenes.lidar_sweep(0, 0, az_steps=256)
  n = len(s.points)
  assert s.points.dtype == np.float32 and s.points.shape == (n, 3)
  assert s.labels.shape == s.instances.shape == s.rings.shape == (n,)
  assert s.labels.dtype == s.instances.dtype == s.rings.dtype == np.int32
  np.testing.assert_array_equal(s.origin, [0.0, -1.75, 0.0])
  assert 0.6 * 64 * 256 < n < 64 * 256  # most rays return (not those into the sky)
  assert sorted(np.unique(s.rings)) == list(range(len(scenes.LIDAR_ELEVATIONS)))
  # every direction around the sensor is scanned
  az = np.arctan2(s.points[:, 1] - s.origin[1], s.points[:, 0] - s.origin[0])
  assert np.histogram(az, 16, (-np.pi, np.pi))[0].min() > 0
  r = np.linalg.norm(s.points - s.origin.astype(np.float32), axis=1)
  assert r.min() > scenes.LIDAR_RANGE[0] - 0.1 and r.max() < scenes.LIDAR_RANGE[1] + 0.1
  # elevation of each point matches its ring's beam (range noise is 2 cm)
  el = np.arcsin((s.points[:, 2] - s.origin[2]) / r)
  assert np.median(np.abs(el - scenes.LIDAR_ELEVATIONS[s.rings])) < 1e-3


def test_lidar_sweep_instances_and_sweeps():
  a = scenes.lidar_sweep(0, 0, az_steps=256)
  b = scenes.lidar_sweep(1, 0, az_steps=256)
  car = scenes.LIDAR_LABELS.index("car")
  assert np.all(a.instances[a.labels != car] == 0)
  assert np.all(a.instances[a.labels == car] > 0)
  np.testing.assert_array_equal(b.origin, [scenes.SWEEP_SPACING, -1.75, 0.0])
  # a car seen from both sweeps keeps its id, and stays where it is
  shared = set(np.unique(a.instances)) & set(np.unique(b.instances)) - {0}
  assert shared
  for i in list(shared)[:3]:
    ca, cb = a.points[a.instances == i].mean(0), b.points[b.instances == i].mean(0)
    assert np.linalg.norm(ca - cb) < 3.0  # the same box, seen from elsewhere
  again = scenes.lidar_sweep(1, 0, az_steps=256)
  np.testing.assert_array_equal(again.points, b.points)
  with pytest.raises(ValueError):
    scenes.lidar_sweep(-1)
  with pytest.raises(ValueError):
    scenes.lidar_sweep(0, az_steps=100)


def test_lidar_points_are_a_subset_of_the_first_sweep():
  s = scenes.lidar_sweep(0, 0, az_steps=512)
  pts, labels = scenes.lidar_points(5_000, VS, 0, az_steps=512)
  sweep = {tuple(p): l for p, l in zip(s.points.tolist(), s.labels.tolist())}
  assert all(sweep.get(tuple(p)) == l for p, l in zip(pts.tolist(), labels.tolist()))


def test_room_instances():
  pts, cols, labels = scenes.room_points(4)
  p2, c2, l2, inst = scenes.room_points(4, instances=True)
  np.testing.assert_array_equal(pts, p2)
  np.testing.assert_array_equal(cols, c2)
  np.testing.assert_array_equal(labels, l2)
  assert inst.dtype == np.int32 and inst.shape == labels.shape and inst.min() == 0
  for i in np.unique(inst):
    assert len(np.unique(labels[inst == i])) == 1  # an object has one class
  assert np.all(labels[inst == 0] == scenes.ROOM_LABELS.index("floor"))
  assert len(np.unique(inst)) > len(np.unique(labels))  # several walls, chairs, ...
