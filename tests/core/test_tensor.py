"""SparseTensor levels and the layers over them, against the functional API."""

from __future__ import annotations

import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv.linen import DownConv, SubMConv, UpConv

from tests.helpers import lattice_cloud, rel_err

ROOT = pathlib.Path(__file__).parents[2]


def _cloud(rng, n=300, extent=12):
  pts = lattice_cloud(rng, n, extent=extent, voxel_size=0.5)
  return pts, rng.standard_normal((len(pts), 3)).astype(np.float32)


def test_layers_equal_the_functional_calls(rng):
  pts, f = _cloud(rng)
  fine = sc.SparseTensor.from_voxels(pts, f, 0.5).with_kernel_map(3)
  coarse = fine.down()
  key = jax.random.key(1)
  sub, down, up = SubMConv(5), DownConv(6), UpConv(3)
  ps = sub.init(key, fine)
  x = sub.apply(ps, fine)
  pd = down.init(key, x, coarse)
  c = down.apply(pd, x, coarse)
  pu = up.init(key, c, x)
  u = up.apply(pu, c, x)
  vs = 0.5
  y_sub = sc.sparse_conv(ps["params"], f, pts, pts, vs)
  c_pos = np.asarray(coarse.positions[:int(coarse.count)])
  y_down = sc.sparse_conv(pd["params"], np.asarray(y_sub), pts, c_pos, vs)
  y_up = sc.sparse_conv_transpose(pu["params"], np.asarray(y_down), c_pos, pts, vs)
  assert rel_err(x.feats, y_sub) < 1e-6
  assert rel_err(c.feats[:len(c_pos)], y_down) < 1e-6
  assert rel_err(u.feats, y_up) < 1e-6
  assert np.all(np.asarray(c.feats[len(c_pos):]) == 0)  # padding rows of the coarse level


def _levels(points, feats, vs, valid=None, batch=None):
  t = sc.SparseTensor.from_points(points, feats, vs, valid=valid, batch=batch).with_kernel_map(3)
  return t, t.down().with_kernel_map(3)


def _model_apply():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, fine, coarse):
      x = SubMConv(4, activation=nn.relu)(fine)
      c = DownConv(4, activation=nn.relu)(x, coarse)
      c = SubMConv(4)(c)
      return UpConv(2)(c, x).feats

  return Net()


def test_padded_vmap_and_packed_equal_single_clouds(rng):
  vs = 0.5
  clouds = [rng.uniform(0, 5, (n, 3)).astype(np.float32) for n in (150, 110)]
  feats = [rng.standard_normal((len(c), 3)).astype(np.float32) for c in clouds]
  net = _model_apply()
  f0, c0 = _levels(clouds[0], feats[0], vs)
  variables = net.init(jax.random.key(0), f0, c0)
  singles = []
  for p, f in zip(clouds, feats):
    fine, coarse = _levels(p, f, vs)
    y = net.apply(variables, fine, coarse)
    singles.append(np.asarray(y[:int(fine.count)]))
    assert np.all(np.asarray(y[int(fine.count):]) == 0)

  # Padded to one capacity, vmapped.
  cap = 160
  pad = lambda a: np.concatenate([a, np.zeros((cap - len(a), a.shape[1]), a.dtype)])
  P = np.stack([pad(c) for c in clouds])
  F = np.stack([pad(f) for f in feats])
  counts = np.array([len(c) for c in clouds], np.int32)
  fine, coarse = jax.jit(jax.vmap(lambda p, f, k: _levels(p, f, vs, valid=k)))(P, F, counts)
  ys = jax.jit(jax.vmap(net.apply, in_axes=(None, 0, 0)))(variables, fine, coarse)
  for b in range(2):
    k = int(fine.count[b])
    assert k == len(singles[b])
    # Voxel order is Morton order in both: rows correspond.
    assert rel_err(ys[b, :k], singles[b]) < 1e-5

  # Packed.
  batch = np.repeat(np.arange(2), [len(c) for c in clouds]).astype(np.int32)
  fine, coarse = jax.jit(lambda p, f, b: _levels(p, f, vs, batch=b))(
      np.concatenate(clouds), np.concatenate(feats), batch)
  y = net.apply(variables, fine, coarse)
  k = int(fine.count)
  fb = np.asarray(fine.batch[:k])
  for b in range(2):
    assert rel_err(np.asarray(y[:k])[fb == b], singles[b]) < 1e-5


def test_readme_example_is_the_tested_file_and_runs(capsys):
  readme = (ROOT / "README.md").read_text()
  source = (ROOT / "examples" / "unet.py").read_text()
  marker = "<!-- example: examples/unet.py -->\n```python\n"
  assert marker in readme, "README must show examples/unet.py"
  shown = readme.split(marker, 1)[1].split("```", 1)[0]
  assert shown == source
  runpy.run_path(str(ROOT / "examples" / "unet.py"), run_name="__main__")
  out = capsys.readouterr().out
  accuracy = float(out.strip().rsplit("accuracy", 1)[1])
  assert accuracy > 0.9


def test_levels_nest_like_open3d_ml(rng):
  """Three downs: parents are floor(i / 2) of the previous level's integer voxels at every
  level (before: the second down() failed, its points off the first coarse lattice)."""
  pts = rng.uniform(0, 12, (400, 3)).astype(np.float32)
  t = sc.SparseTensor.from_points(pts, np.ones((400, 1), np.float32), 0.5)
  idx = np.unique(np.floor(pts / 0.5).astype(np.int64), axis=0)
  for level in range(3):
    t = t.down()
    idx = np.unique(idx // 2, axis=0)
    k = int(t.count)
    assert k == len(idx)
    got = np.unique(np.floor(np.asarray(t.positions[:k]) / np.asarray(t.voxel_size)), axis=0)
    np.testing.assert_array_equal(got, idx)
    assert np.all(np.asarray(t.maps["down"].input_counts())[
        np.asarray(t.maps["down"].in_mask)] == 1)  # every finer voxel has one parent
