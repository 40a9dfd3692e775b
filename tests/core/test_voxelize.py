"""unique_voxels / voxelize / downsample."""

from __future__ import annotations

import jax
import numpy as np

import jax_sparseconv as sc

from tests.helpers import lattice_cloud


def test_unique_voxels_averages_and_pads(rng):
  base = lattice_cloud(rng, 30, 4, 0.5)
  pick = rng.integers(0, 30, 80)
  pos, feats = base[pick], rng.standard_normal((80, 2)).astype(np.float32)
  up, uf, k = jax.jit(sc.unique_voxels)(pos, feats, 0.5)
  k = int(k)
  assert k == len(np.unique(pick)) and up.shape == (80, 3)
  assert np.all(np.isnan(np.asarray(up[k:]))) and np.all(np.asarray(uf[k:]) == 0.0)  # padding
  for p, f in zip(np.asarray(up[:k]), np.asarray(uf[:k])):
    rows = np.all(np.abs(pos - p) < 1e-4, axis=1)
    np.testing.assert_allclose(f, feats[rows].mean(0), rtol=1e-5, atol=1e-6)
  # the result is a valid kernel-map input (no duplicates), with the count as validity
  sc.build_kernel_map(up, up, 0.5, 3, in_valid=k, out_valid=k)


def test_unique_voxels_keeps_clouds_apart():
  pos = np.array([[0.5, 0.5, 0.5]] * 3, np.float32)
  up, uf, ub, k = sc.unique_voxels(pos, np.array([[1.0], [2.0], [4.0]]), 1.0,
                                   batch=np.array([0, 1, 1]))
  assert int(k) == 2
  assert ub[:2].tolist() == [0, 1] and uf[:2, 0].tolist() == [1.0, 3.0]


def test_voxelize_and_downsample(rng):
  pts = rng.uniform(-1, 1, (500, 3)).astype(np.float32)
  p, f, k = sc.voxelize(pts, np.ones((500, 1), np.float32), 0.25)
  k = int(k)
  idx = np.unique(np.floor(pts / 0.25).astype(int), axis=0)
  assert k == len(idx)
  np.testing.assert_allclose(np.sort(np.asarray(p[:k]), axis=0),
                             np.sort((idx + 0.5) * 0.25, axis=0), atol=1e-6)
  c, kc = sc.downsample(p, 0.25, valid=k)
  kc = int(kc)
  assert kc == len(np.unique(idx // 2, axis=0))
  # every fine voxel has exactly one coarse output whose K=2 window covers it
  km = sc.build_kernel_map(p, c, 0.25, 2, in_valid=k, out_valid=kc)
  counts = np.asarray(km.input_counts())
  assert np.all(counts[:k] == 1)
