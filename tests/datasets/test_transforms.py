"""Per-cloud transforms: cropping, augmenting (NumPy generator or JAX key), voxelising to a
capacity (the library's voxels and order, overflow counted), labels per voxel, batching."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv import scenes
from jax_sparseconv.datasets import transforms as T


@pytest.fixture(scope="module")
def street():
  pts, labels = scenes.lidar_points(3000, 0.05, 0)
  feats = np.random.default_rng(0).random((len(pts), 2)).astype(np.float32)
  return pts, feats, labels


# ----------------------------------------------------------------------------- crop


def test_crop_is_half_open():
  p = np.float32([[0, 0, 0], [1, 0, 0], [0.999, 0.5, 0.5], [-0.001, 0, 0]])
  assert T.crop_mask(p, (0, 0, 0, 1, 1, 1)).tolist() == [True, False, True, False]
  cloud = dict(coord=p, label=np.arange(4), name="x", scale=np.float32(2.0))
  out = T.crop(cloud, (0, 0, 0, 1, 1, 1))
  assert out["label"].tolist() == [0, 2] and out["name"] == "x" and out["scale"] == 2.0
  with pytest.raises(ValueError):
    T.crop_mask(p, (0, 0, 0, 0, 1, 1))


# ----------------------------------------------------------------------------- augment


def test_augment_deterministic_and_rigid():
  p = np.random.default_rng(1).standard_normal((100, 3)).astype(np.float32)
  a, m = T.augment(p, T.example_rng(0, 1, 2), jitter=0.0)
  b, _ = T.augment(p, T.example_rng(0, 1, 2), jitter=0.0)
  c, _ = T.augment(p, T.example_rng(0, 1, 3), jitter=0.0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  s = abs(np.linalg.det(m)) ** (1 / 3)
  assert 0.95 <= s <= 1.05
  np.testing.assert_allclose(m.T @ m, s * s * np.eye(3), atol=1e-12)  # rotation x flips x scale
  assert m[2, 2] == pytest.approx(s) and np.allclose(m[2, :2], 0)  # about z only
  np.testing.assert_allclose(a, p.astype(np.float64) @ m.T, atol=1e-5)
  assert a.dtype == np.float32


def test_augment_off_and_jitter():
  p = np.random.default_rng(1).standard_normal((1000, 3)).astype(np.float32)
  same, m = T.augment(p, np.random.default_rng(0), rotation=0, flip_x=0, flip_y=0,
                      scale=(1, 1), jitter=0)
  np.testing.assert_array_equal(same, p)
  np.testing.assert_array_equal(m, np.eye(3))
  j, _ = T.augment(p, np.random.default_rng(0), rotation=0, flip_x=0, flip_y=0, scale=(1, 1),
                   jitter=0.01, jitter_clip=0.02)
  d = np.abs(j.astype(np.float64) - p)
  assert d.max() <= 0.02 + 1e-6 and 0.005 < d.std() < 0.015
  flipped, m = T.augment(p, np.random.default_rng(0), rotation=0, flip_x=1, flip_y=0,
                         scale=(1, 1), jitter=0)
  np.testing.assert_array_equal(flipped[:, 0], -p[:, 0])


def test_augment_from_jax_keys():
  p = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
  k = jax.random.key(7)
  a, _ = T.augment(p, k)
  b, _ = T.augment(p, jax.random.key(7))
  c, _ = T.augment(p, jax.random.split(k)[1])
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  raw = jax.random.PRNGKey(7)  # a legacy uint32 key, and its NumPy copy
  r1, _ = T.augment(p, raw)
  r2, _ = T.augment(p, np.asarray(raw))
  np.testing.assert_array_equal(r1, r2)
  np.testing.assert_array_equal(r1, a)  # the same key data, the same draws
  i1, _ = T.augment(p, 5)
  i2, _ = T.augment(p, 5)
  np.testing.assert_array_equal(i1, i2)
  with pytest.raises(TypeError):
    T.as_generator(1.5)
  with pytest.raises(ValueError):
    T.as_generator(-1)


def test_transform_normals():
  rng = np.random.default_rng(0)
  n = rng.standard_normal((20, 3))
  n /= np.linalg.norm(n, axis=1, keepdims=True)
  p = rng.standard_normal((20, 3))
  _, m = T.augment(p, rng, jitter=0)
  out = T.transform_normals(n, m)
  # a tangent t (t . n = 0) stays tangent: (M t) . n' = 0
  t = np.cross(n, rng.standard_normal((20, 3)))
  np.testing.assert_allclose(np.sum((t @ m.T) * out, 1), 0, atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1)


def test_example_rng_streams():
  a = T.example_rng(0, 0, 0).random(4)
  assert np.array_equal(a, T.example_rng(0, 0, 0).random(4))
  for other in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
    assert not np.array_equal(a, T.example_rng(*other).random(4))
  with pytest.raises(ValueError):
    T.example_rng(0, -1, 0)


# ----------------------------------------------------------------------------- voxelize


def test_voxelize_matches_the_library(street):
  pts, feats, _ = street
  h = T.voxelize(pts, feats, 0.2)
  ref = sc.voxelize(jnp.asarray(pts), jnp.asarray(feats), 0.2)
  n = int(ref.count)
  assert h.count == n and h.overflow == 0 and h.positions.shape == (len(pts), 3)
  np.testing.assert_array_equal(h.positions[:n], np.asarray(ref.positions)[:n])  # bit for bit
  np.testing.assert_allclose(h.feats[:n], np.asarray(ref.feats)[:n], atol=1e-6)
  assert np.all(np.isnan(h.positions[n:])) and np.all(h.feats[n:] == 0)
  # the inverse: each point's voxel contains it
  np.testing.assert_array_equal(np.floor(pts / np.float32(0.2)).astype(np.int32),
                                h.coords[h.inverse])
  np.testing.assert_array_equal(h.coords[:n], np.floor(h.positions[:n] / np.float32(0.2)))
  # and the same voxels as a level of the library
  t = sc.SparseTensor.from_voxels(jnp.asarray(h.positions), jnp.asarray(h.feats), 0.2,
                                  valid=h.count)
  np.testing.assert_array_equal(np.asarray(t.coords)[:n], h.coords[:n])


@pytest.mark.parametrize("seed,vs,offset", [(0, 0.05, -3.0), (1, 0.3, 100.0), (2, 1.0, -7e3)])
def test_voxelize_matches_the_library_anywhere(seed, vs, offset):
  rng = np.random.default_rng(seed)
  pts = (offset + rng.random((2000, 3)) * rng.uniform(1, 50, 3)).astype(np.float32)
  pts = np.concatenate([pts, pts[:300]])  # duplicated points
  h = T.voxelize(pts, pts, vs, 1500)
  ref = sc.voxelize(jnp.asarray(pts), jnp.asarray(pts), vs,
                    capacity=len(pts))  # all of them, to cut here
  n = int(ref.count)
  assert h.count == min(n, 1500) and h.overflow == max(n - 1500, 0)
  np.testing.assert_array_equal(h.positions[:h.count], np.asarray(ref.positions)[:h.count])


def test_voxelize_packed_matches_the_library(street):
  pts, feats, _ = street
  b = (np.arange(len(pts)) % 3).astype(np.int32)
  h = T.voxelize(pts, feats, 0.2, batch=b)
  ref = sc.voxelize(jnp.asarray(pts), jnp.asarray(feats), 0.2, batch=jnp.asarray(b))
  n = int(ref.count)
  assert h.count == n
  np.testing.assert_array_equal(h.positions[:n], np.asarray(ref.positions)[:n])
  np.testing.assert_array_equal(h.batch[:n], np.asarray(ref.batch)[:n])
  np.testing.assert_array_equal(h.batch[h.inverse], b)


def test_voxelize_capacity_is_counted(street):
  pts, feats, _ = street
  full = T.voxelize(pts, feats, 0.2)
  cap = full.count - 37
  h = T.voxelize(pts, feats, 0.2, cap)
  assert h.count == cap and h.overflow == 37 and h.positions.shape == (cap, 3)
  np.testing.assert_array_equal(h.positions, full.positions[:cap])  # the first in order
  dropped = h.inverse < 0
  assert np.array_equal(dropped, full.inverse >= cap)  # every dropped point is marked
  assert h.count + h.overflow == full.count
  big = T.voxelize(pts, feats, 0.2, full.count + 5)
  assert big.overflow == 0 and np.all(np.isnan(big.positions[-5:]))
  with pytest.raises(ValueError, match="capacity"):
    T.voxelize(pts, feats, 0.2, cap, on_overflow="raise")


def test_voxelize_rejects_bad_input():
  with pytest.raises(ValueError):
    T.voxelize(np.zeros((3, 2)))
  with pytest.raises(ValueError):
    T.voxelize(np.float32([[np.nan, 0, 0]]))
  with pytest.raises(ValueError):
    T.voxelize(np.zeros((3, 3)), voxel_size=0)
  with pytest.raises(ValueError, match="span"):
    T.voxelize(np.float32([[0, 0, 0], [1e6, 0, 0]]), voxel_size=0.5)
  e = T.voxelize(np.zeros((0, 3), np.float32), capacity=4)
  assert e.count == 0 and e.overflow == 0 and e.positions.shape == (4, 3)


def test_voxel_labels_majority():
  inverse = np.array([0, 0, 0, 1, 1, 2, 2, 3, -1])
  labels = np.array([5, 5, 7, 2, 3, 0, 0, 9, 9])
  # voxel 1 ties (2 and 3): the smallest; voxel 2 only ignored labels
  assert T.voxel_labels(inverse, labels, 4, ignore_index=0).tolist() == [5, 2, 0, 9]
  assert T.voxel_labels(inverse, labels, 4, ignore_index=-1).tolist() == [5, 2, 0, 9]
  assert T.voxel_labels(inverse, labels, 5, ignore_index=-1).tolist() == [5, 2, 0, 9, -1]
  assert T.voxel_labels(inverse, np.full(9, -1), 2).tolist() == [-1, -1]


def test_voxel_labels_against_a_loop(street):
  pts, _, labels = street
  h = T.voxelize(pts, None, 0.3)
  got = T.voxel_labels(h.inverse, labels, h.count)
  for v in range(0, h.count, 7):
    votes = np.bincount(labels[h.inverse == v])
    assert got[v] == np.argmax(votes)


# ----------------------------------------------------------------------------- batching


def _clouds():
  rng = np.random.default_rng(3)
  return [dict(coord=rng.random((n, 3)).astype(np.float32), labels=np.arange(n, dtype=np.int32),
               num_points=n, name=f"c{n}") for n in (3, 5, 2)]


def test_pad_batch():
  clouds = _clouds()
  b = T.pad_batch(clouds, 6)
  assert b["coord"].shape == (3, 6, 3) and b["labels"].shape == (3, 6)
  assert b["count"].tolist() == [3, 5, 2] and b["dropped"].tolist() == [0, 0, 0]
  np.testing.assert_array_equal(b["valid"], np.arange(6)[None] < b["count"][:, None])
  np.testing.assert_array_equal(b["coord"][1, :5], clouds[1]["coord"])
  assert np.all(np.isnan(b["coord"][0, 3:])) and np.all(b["labels"][0, 3:] == 0)
  assert b["num_points"].tolist() == [3, 5, 2] and b["name"] == ["c3", "c5", "c2"]
  assert np.all(T.pad_batch(clouds, 6, fill={"labels": -1})["labels"][2, 2:] == -1)
  with pytest.raises(ValueError, match="capacity"):
    T.pad_batch(clouds, 4)
  t = T.pad_batch(clouds, 4, on_overflow="truncate")
  assert t["count"].tolist() == [3, 4, 2] and t["dropped"].tolist() == [0, 1, 0]


def test_pack_batch():
  clouds = _clouds()
  b = T.pack_batch(clouds, 12)
  assert b["coord"].shape == (12, 3) and int(b["count"]) == 10
  assert b["batch"].tolist() == [0] * 3 + [1] * 5 + [2] * 2 + [0, 0]
  assert b["offsets"].tolist() == [0, 3, 8, 10] and b["counts"].tolist() == [3, 5, 2]
  assert b["valid"].tolist() == [True] * 10 + [False] * 2
  np.testing.assert_array_equal(b["labels"][3:8], np.arange(5))
  with pytest.raises(ValueError):
    T.pack_batch(clouds, 9)
  t = T.pack_batch(clouds, 7, on_overflow="truncate")
  assert t["counts"].tolist() == [3, 4, 0] and t["dropped"].tolist() == [0, 1, 2]
  assert int(t["count"]) == 7 and t["valid"].all()


def test_packed_batch_to_the_library():
  """A packed batch of voxel examples is one level of the library (``from_voxels``)."""
  clouds = [dict(coord=scenes.lidar_points(n, 0.05, s)[0], label=scenes.lidar_points(
      n, 0.05, s)[1]) for n, s in ((800, 0), (600, 1))]
  make = functools.partial(T.voxel_example, voxel_size=0.2, ignore_index=-1)
  ex = [make(c, T.example_rng(0, 0, i)) for i, c in enumerate(clouds)]
  b = T.pack_batch(ex, 2000)
  t = sc.SparseTensor.from_voxels(jnp.asarray(b["positions"]), jnp.asarray(b["feats"]), 0.2,
                                  valid=int(b["count"]), batch=jnp.asarray(b["batch"]))
  assert int(jnp.sum(t.valid)) == int(b["count"]) == sum(len(e["positions"]) for e in ex)
  ref = sc.voxelize(jnp.asarray(np.concatenate([c["coord"] for c in clouds])),
                    jnp.zeros((sum(len(c["coord"]) for c in clouds), 0)), 0.2,
                    batch=jnp.asarray(np.repeat([0, 1], [len(c["coord"]) for c in clouds])))
  assert int(ref.count) == int(b["count"])


# ----------------------------------------------------------------------------- chains


def test_voxel_example(street):
  pts, feats, labels = street
  cloud = dict(coord=pts, strength=feats[:, :1], label=labels + 1, name="s")
  rng_range = (-20, -20, -3, 20, 20, 1)
  ex = T.voxel_example(cloud, T.example_rng(0, 0, 0), voxel_size=0.2, feat_keys=("strength",),
                       ignore_index=0, point_cloud_range=rng_range, capacity=400,
                       augmentation=dict(jitter=0.0))
  v = len(ex["positions"])
  assert v == 400 and ex["overflow"] > 0  # capped, and the cap reported
  assert ex["feats"].shape == (v, 1) and ex["labels"].shape == (v,) and ex["name"] == "s"
  assert ex["num_points"] == int(T.crop_mask(pts, rng_range).sum())
  assert ex["labels"].min() >= 1  # every kept voxel has a point with a label
  again = T.voxel_example(cloud, T.example_rng(0, 0, 0), voxel_size=0.2,
                          feat_keys=("strength",), ignore_index=0,
                          point_cloud_range=rng_range, capacity=400,
                          augmentation=dict(jitter=0.0))
  for k in ("positions", "feats", "labels"):
    np.testing.assert_array_equal(ex[k], again[k])
  ev = T.voxel_example(cloud, None, voxel_size=0.2, ignore_index=0)  # no augmentation
  h = T.voxelize(pts, None, 0.2)
  np.testing.assert_array_equal(ev["positions"], h.positions[:h.count])
  assert ev["overflow"] == 0 and ev["feats"].shape == (h.count, 0)


def test_point_example(street):
  pts, feats, labels = street
  cloud = dict(coord=pts, strength=feats[:, :1], label=labels)
  ex = T.point_example(cloud, jax.random.key(0), feat_keys=("strength",),
                       augmentation=dict(rotation=0.0, flip_x=0, flip_y=0, scale=(1, 1),
                                         jitter=0))
  np.testing.assert_array_equal(ex["coord"], pts)
  np.testing.assert_array_equal(ex["labels"], labels)
  b = T.pad_batch([ex, ex], len(pts) + 10)
  t = sc.SparseTensor.from_points(jnp.asarray(b["coord"][0]), jnp.asarray(b["feats"][0]), 0.2,
                                  valid=int(b["count"][0]))
  assert int(jnp.sum(t.valid)) == T.voxelize(pts, None, 0.2).count
