"""jax_sparseconv.models: Open3D-ML's SparseConvUnet in Flax.

* Each part against a NumPy loop on tiny random inputs (input/output layers, the coarse
  grid, the three conv kinds through the level maps, BatchNorm, residual block).
* A float64 NumPy reference of the whole U-Net (written from Open3D-ML's source, dict-based
  voxel lookups) against the Flax model on tiny clouds: plain / residual, 1-2 block
  repetitions, eval and train-mode BatchNorm, every input form (single, list, padded,
  packed, jit, vmap), gradients.
* Open3D-ML's own outputs (tests/data/unet, made by Open3D-ML 0.20 itself): per-point logits
  and intermediates, the checkpoint reader on real torch.save files, the pre-processing.

Full-size models run eagerly with one capacity for every level, so the geometry programs
(sorts, kernel-map searches) are compiled once and shared by the tests of a process.
"""

from __future__ import annotations

import functools
import io
import pathlib
import pickle
import sys
import types
import zipfile
from collections import OrderedDict

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tests.helpers import rel_err

import jax_sparseconv as sc
from jax_sparseconv.models import (
    SparseBatchNorm, SparseConvUnet, calculate_grid, input_layer, layers, level_kernel_maps,
    load_open3d_ml_checkpoint, open3d_ml_preprocess, open3d_ml_variables, output_layer,
    read_torch_file, to_open3d_ml_state_dict, unet_layout, unet_level_sizes)
from jax_sparseconv.models.layers import NetworkInNetwork, ResidualBlock

DATA = pathlib.Path(__file__).parents[1] / "data" / "unet"


# ---------------------------------------------------------------------------------------------
# NumPy reference (float64), written from Open3D-ML's sparseconvnet.py


def np_torch_layout(reps, planes, residual):
  """``UNet.get_UNet``: type tags of ``unet.net``, literally as Open3D-ML builds them."""
  layers_ = []

  def block(a, b):
    if residual:
      layers_.append(("residual", a, b))
    else:
      layers_.extend([("bn", a), ("relu",), ("subm", a, b)])

  for _ in range(reps):
    block(planes[0], planes[0])
  if len(planes) > 1:
    layers_.extend([("concat",), ("bn", planes[0]), ("relu",), ("conv", planes[0], planes[1])])
    layers_.extend(np_torch_layout(reps, planes[1:], residual))
    layers_.extend([("bn", planes[1]), ("relu",), ("deconv", planes[1], planes[0]), ("join",)])
    for i in range(reps):
      block(planes[0] * (2 if i == 0 else 1), planes[0])
  return layers_


def random_state_dict(rng, m, reps, residual, levels=7, in_channels=3, num_classes=20):
  """A state_dict with Open3D-ML's keys, shapes and offsets, random values (BN stats too)."""
  sd = OrderedDict()

  def bn(prefix, c):
    sd[prefix + ".bn.weight"] = rng.uniform(0.5, 1.5, c)
    sd[prefix + ".bn.bias"] = rng.uniform(-0.2, 0.2, c)
    sd[prefix + ".bn.running_mean"] = rng.uniform(-0.3, 0.3, c)
    sd[prefix + ".bn.running_var"] = rng.uniform(0.5, 2.0, c)
    sd[prefix + ".bn.num_batches_tracked"] = np.zeros((), np.int64)

  def conv(prefix, k, a, b):
    sd[prefix + ".net.kernel"] = rng.uniform(-1, 1, (k, k, k, a, b)) * 1.7 / np.sqrt(k**3 * a)
    sd[prefix + ".net.offset"] = np.full(3, 0.0 if k == 3 else -0.5)

  conv("sub_sparse_conv", 3, in_channels, m)
  planes = [m * (i + 1) for i in range(levels)]
  for i, layer in enumerate(np_torch_layout(reps, planes, residual)):
    p = f"unet.net.{i}"
    if layer[0] == "bn":
      bn(p, layer[1])
    elif layer[0] == "subm":
      conv(p, 3, layer[1], layer[2])
    elif layer[0] in ("conv", "deconv"):
      conv(p, 2, layer[1], layer[2])
    elif layer[0] == "residual":
      a, b = layer[1:]
      if a != b:
        sd[p + ".lin.linear.weight"] = rng.uniform(-0.3, 0.3, (b, a))
      bn(p + ".batch_norm1", a)
      conv(p + ".sub_sparse_conv1", 3, a, b)
      bn(p + ".batch_norm2", b)
      conv(p + ".sub_sparse_conv2", 3, b, b)
  bn("batch_norm", m)
  sd["linear.linear.weight"] = rng.uniform(-0.3, 0.3, (num_classes, m))
  sd["linear.linear.bias"] = rng.uniform(-0.3, 0.3, num_classes)
  return OrderedDict((k, np.asarray(v, np.float32) if v.dtype == np.float64 else v)
                     for k, v in sd.items())


class NpCloud:
  """One cloud's voxel levels: integer coordinates, lookup dicts, parents and cells."""

  def __init__(self, points, feats, levels):
    vox = np.floor(np.asarray(points, np.float64)).astype(np.int64)
    key = [tuple(v) for v in vox]
    order = sorted(set(key), key=lambda c: (c[2], c[1], c[0]))  # Open3D-ML: z, then y, then x
    index = {c: i for i, c in enumerate(order)}
    self.index_map = np.array([index[c] for c in key])
    sums = np.zeros((len(order), feats.shape[1]))
    np.add.at(sums, self.index_map, np.asarray(feats, np.float64))
    self.x0 = sums / np.bincount(self.index_map)[:, None]
    self.coords = [np.array(order, np.int64).reshape(-1, 3)]
    self.parent, self.cell = [], []
    for _ in range(levels - 1):
      c = self.coords[-1]
      par = np.floor_divide(c, 2)
      uniq = sorted({tuple(p) for p in par})
      pidx = {p: i for i, p in enumerate(uniq)}
      self.parent.append(np.array([pidx[tuple(p)] for p in par], np.int64))
      self.cell.append(c - 2 * par)
      self.coords.append(np.array(uniq, np.int64).reshape(-1, 3))
    self.lookup = [{tuple(c): i for i, c in enumerate(cs)} for cs in self.coords]

  def subm(self, x, lev, w):
    out = np.zeros((len(x), w.shape[-1]))
    for i, c in enumerate(self.coords[lev]):
      for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            j = self.lookup[lev].get((c[0] + dx, c[1] + dy, c[2] + dz))
            if j is not None:
              out[i] += x[j] @ w[dz + 1, dy + 1, dx + 1]
    return out

  def down(self, x, lev, w):
    out = np.zeros((len(self.coords[lev + 1]), w.shape[-1]))
    for i, (p, c) in enumerate(zip(self.parent[lev], self.cell[lev])):
      out[p] += x[i] @ w[c[2], c[1], c[0]]
    return out

  def up(self, x, lev, w):
    return np.stack([x[p] @ w[c[2], c[1], c[0]]
                     for p, c in zip(self.parent[lev], self.cell[lev])])


def np_batch_norm(xs, sd, prefix, train, eps=1e-4):
  w, b = sd[prefix + ".bn.weight"], sd[prefix + ".bn.bias"]
  if train:  # statistics over the voxels of all clouds (Open3D-ML concatenates them)
    cat = np.concatenate(xs)
    mean, var = cat.mean(0), cat.var(0)
  else:
    mean, var = sd[prefix + ".bn.running_mean"], sd[prefix + ".bn.running_var"]
  return [(x - mean) / np.sqrt(var + eps) * w + b for x in xs]


def np_unet(sd, clouds, m, reps, residual, levels, train=False):
  """Open3D-ML's ``SparseConvUnet.forward`` for a list of :class:`NpCloud` (float64)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  relu = lambda xs: [np.maximum(x, 0) for x in xs]  # noqa: E731

  def subm(xs, lev, w):
    return [c.subm(x, lev, w) for c, x in zip(clouds, xs)]

  xs = subm([c.x0 for c in clouds], 0, sd["sub_sparse_conv.net.kernel"])
  planes = [m * (i + 1) for i in range(levels)]
  lev, skips = 0, []
  for i, layer in enumerate(np_torch_layout(reps, planes, residual)):
    p = f"unet.net.{i}"
    kind = layer[0]
    if kind == "bn":
      xs = np_batch_norm(xs, sd, p, train)
    elif kind == "relu":
      xs = relu(xs)
    elif kind == "subm":
      xs = subm(xs, lev, sd[p + ".net.kernel"])
    elif kind == "residual":
      lin = sd.get(p + ".lin.linear.weight")
      skip = xs if lin is None else [x @ lin.T for x in xs]
      h = relu(np_batch_norm(xs, sd, p + ".batch_norm1", train))
      h = subm(h, lev, sd[p + ".sub_sparse_conv1.net.kernel"])
      h = relu(np_batch_norm(h, sd, p + ".batch_norm2", train))
      h = subm(h, lev, sd[p + ".sub_sparse_conv2.net.kernel"])
      xs = [a + b for a, b in zip(skip, h)]
    elif kind == "concat":
      skips.append(xs)
    elif kind == "conv":
      xs = [c.down(x, lev, sd[p + ".net.kernel"]) for c, x in zip(clouds, xs)]
      lev += 1
    elif kind == "deconv":
      lev -= 1
      xs = [c.up(x, lev, sd[p + ".net.kernel"]) for c, x in zip(clouds, xs)]
    elif kind == "join":
      xs = [np.concatenate([s, x], -1) for s, x in zip(skips.pop(), xs)]
  xs = relu(np_batch_norm(xs, sd, "batch_norm", train))
  xs = [x @ sd["linear.linear.weight"].T + sd["linear.linear.bias"] for x in xs]
  return np.concatenate([x[c.index_map] for x, c in zip(xs, clouds)])


def tiny_cloud(rng, n=160, extent=10, origin=(3, 5, 1)):
  """Points in voxel units (voxel centres plus jitter inside the voxel, some voxels shared)."""
  vox = rng.integers(0, extent, (n, 3)) + np.asarray(origin)
  pts = vox + rng.uniform(0.05, 0.95, (n, 3))
  return pts.astype(np.float32), rng.uniform(0, 255, (n, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# parts


def test_input_layer_matches_open3d_ml_rules(rng):
  pts, feats = tiny_cloud(rng, 160, extent=6)
  pts[151:], feats[151:] = np.nan, 1e9  # padding: anything, NaN included
  ref = NpCloud(pts[:151], feats[:151], 1)
  vox, vf, idx, err = input_layer(pts, feats, valid=151)
  k = int(vox.count)
  assert not bool(err) and k == len(ref.coords[0]) and vox.capacity == 160
  np.testing.assert_array_equal(vox.coords[:k], ref.coords[0])  # Open3D-ML's (z, y, x) order
  np.testing.assert_allclose(vf[:k], ref.x0, rtol=1e-6)
  np.testing.assert_array_equal(idx[:151], ref.index_map)
  assert np.all(np.asarray(idx[151:]) == 160) and np.all(np.asarray(vf[k:]) == 0)
  np.testing.assert_array_equal(vox.positions()[:k], ref.coords[0] + 0.5)
  # Open3D-ML's output layer: each point takes its voxel's row, padding gets zeros.
  out = output_layer(vf, idx)
  np.testing.assert_allclose(out[:151], ref.x0[ref.index_map], rtol=1e-6)
  assert np.all(np.asarray(out[151:]) == 0)
  # a capacity below the voxel count is reported; exactly enough is not
  assert bool(input_layer(pts, feats, valid=151, capacity=k - 1)[3])
  assert not bool(input_layer(pts, feats, valid=151, capacity=k)[3])
  # a valid NaN point is an error; a bool mask works as the count does
  assert bool(input_layer(pts, feats, valid=152)[3])
  vox2, vf2, _, _ = input_layer(pts, feats, valid=np.arange(160) < 151)
  np.testing.assert_array_equal(vox2.coords, vox.coords)


def test_input_layer_wide_spans_and_packed_batches(rng):
  # coordinates spanning > 2**11 per axis need the two-word sort key
  pts, feats = tiny_cloud(rng, 160, extent=5000, origin=(-2500, 7, -3))
  batch = rng.integers(0, 3, 160)
  pts[:50] = pts[50:100]  # shared voxels across clouds stay apart
  vox, vf, idx, err = input_layer(pts, feats, batch=batch)
  assert not bool(err)
  keys = np.concatenate([batch[:, None], np.floor(pts).astype(np.int64)], 1)
  uniq = np.unique(keys, axis=0)
  uniq = uniq[np.lexsort((uniq[:, 1], uniq[:, 2], uniq[:, 3], uniq[:, 0]))]  # b, z, y, x
  k = int(vox.count)
  assert k == len(uniq)
  np.testing.assert_array_equal(vox.batch[:k], uniq[:, 0])
  np.testing.assert_array_equal(vox.coords[:k], uniq[:, 1:])
  # spans of 2**16 voxels or more are reported
  far = pts.copy()
  far[0, 0] = 70000.5
  assert bool(input_layer(far, feats)[3])


def test_calculate_grid_parents_and_downsample(rng):
  pts, feats = tiny_cloud(rng, 160, extent=9, origin=(-4, 3, -7))  # negative coordinates too
  vox, _, _, _ = input_layer(pts, feats)
  k = int(vox.count)
  fine = np.asarray(vox.coords[:k])
  coarse, parent, err = calculate_grid(vox)
  kc = int(coarse.count)
  want = np.unique(np.floor_divide(fine, 2), axis=0)
  assert not bool(err) and kc == len(want)
  got = np.asarray(coarse.coords[:kc])
  assert {tuple(c) for c in got} == {tuple(c) for c in want}
  np.testing.assert_array_equal(got[np.asarray(parent[:k])], np.floor_divide(fine, 2))
  assert np.all(np.asarray(parent[k:]) == coarse.capacity)
  # in fine units the parents sit at 2j + 0.5: what jax_sparseconv.downsample gives
  ds, nds = sc.downsample(jnp.asarray(fine + 0.5, jnp.float32), 1.0)
  assert {tuple(p) for p in np.asarray(ds[:int(nds)])} == {tuple(p) for p in 2.0 * got + 0.5}
  assert bool(calculate_grid(vox, kc - 1)[2]) and not bool(calculate_grid(vox, kc)[2])


def test_level_maps_three_conv_kinds_vs_numpy(rng):
  pts, feats = tiny_cloud(rng, 160, extent=7)
  ref = NpCloud(pts, feats, 2)
  vox, _, _, _ = input_layer(pts, feats)
  coarse, _, _ = calculate_grid(vox)
  maps = level_kernel_maps(vox, coarse)
  k, kc = int(vox.count), int(coarse.count)
  # the JAX coarse order is (z, y, x); the NumPy one (x, y, z): compare through positions
  perm = np.array([ref.lookup[1][tuple(c)] for c in np.asarray(coarse.coords[:kc])])
  x = rng.standard_normal((vox.capacity, 4)).astype(np.float32)
  x[k:] = 0
  xc = rng.standard_normal((coarse.capacity, 4)).astype(np.float32)
  xc[kc:] = 0
  w3 = rng.standard_normal((3, 3, 3, 4, 5)).astype(np.float32)
  w2 = rng.standard_normal((2, 2, 2, 4, 5)).astype(np.float32)
  subm = layers.SubmanifoldSparseConv(5).apply({"params": {"kernel": w3}}, x, maps.subm)
  np.testing.assert_allclose(subm[:k], ref.subm(x[:k], 0, w3), rtol=1e-5, atol=1e-5)
  down = layers.Convolution(5).apply({"params": {"kernel": w2}}, x, maps.down)
  np.testing.assert_allclose(down[:kc], ref.down(x[:k], 0, w2)[perm], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(down[kc:]) == 0)
  xc_np = np.zeros((kc, 4))
  xc_np[perm] = xc[:kc]
  up = layers.DeConvolution(5).apply({"params": {"kernel": w2}}, xc, maps.up)
  np.testing.assert_allclose(up[:k], ref.up(xc_np, 0, w2), rtol=1e-5, atol=1e-5)
  # every fine voxel has exactly one parent; the counts of the K=2 maps say so
  assert np.all(np.asarray(maps.up.neighbor_counts()[:k]) == 1)
  assert np.asarray(maps.down.neighbor_counts()[:kc]).sum() == k


def test_sparse_batch_norm_eval_and_train(rng):
  x = rng.standard_normal((2, 30, 6)).astype(np.float32) * 3 + 1
  counts = np.array([30, 17])
  x[1, 17:] = 1e6  # padding must not enter the statistics
  v = {"params": {"scale": rng.uniform(0.5, 1.5, 6), "bias": rng.uniform(-1, 1, 6)},
       "batch_stats": {"mean": rng.uniform(-1, 1, 6), "var": rng.uniform(0.5, 2, 6)}}
  bn = SparseBatchNorm()
  valid = np.arange(30)[None] < counts[:, None]
  y = bn.apply(v, x, counts)
  p, s = v["params"], v["batch_stats"]
  want = (x - s["mean"]) / np.sqrt(s["var"] + 1e-4) * p["scale"] + p["bias"]
  np.testing.assert_allclose(y[valid], want[valid], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(y)[~valid] == 0)
  y, upd = bn.apply(v, x, counts, train=True, mutable=["batch_stats"])
  sel = x[valid].astype(np.float64)
  mean, var = sel.mean(0), sel.var(0)
  want = (sel - mean) / np.sqrt(var + 1e-4) * p["scale"] + p["bias"]
  np.testing.assert_allclose(np.asarray(y)[valid], want, rtol=1e-4, atol=1e-4)
  n = len(sel)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.99 * s["mean"] + 0.01 * mean,
                             rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"],  # torch: the unbiased variance
                             0.99 * s["var"] + 0.01 * var * n / (n - 1), rtol=1e-5)
  # the same statistics through a vmap axis (padded clouds under vmap)
  bn_ax = SparseBatchNorm(axis_name="clouds")
  y2, upd2 = jax.vmap(lambda xi, ci: bn_ax.apply(v, xi, ci, train=True, mutable=["batch_stats"]),
                      axis_name="clouds")(x, counts)
  np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd2["batch_stats"]["var"][0], upd["batch_stats"]["var"], rtol=1e-5)


def test_network_in_network_and_residual_block(rng):
  pts, feats = tiny_cloud(rng, 160, extent=5)
  ref = NpCloud(pts, feats, 1)
  vox, _, _, _ = input_layer(pts, feats)
  k = int(vox.count)
  maps = level_kernel_maps(vox)
  x = np.zeros((vox.capacity, 6), np.float32)
  x[:k] = rng.standard_normal((k, 6))
  block = ResidualBlock(3)
  shapes = jax.tree_util.tree_map(jnp.shape, block.init(jax.random.key(0), x, vox.valid,
                                                       maps.subm))
  assert NetworkInNetwork(6).init(jax.random.key(0), x) == {}  # identity: no parameters
  sd = {"lin.linear.weight": rng.standard_normal((3, 6)).astype(np.float32)}
  for name, c in (("batch_norm1", 6), ("batch_norm2", 3)):
    for leaf, (lo, hi) in (("weight", (0.5, 1.5)), ("bias", (-1, 1)), ("running_mean", (-1, 1)),
                           ("running_var", (0.5, 2))):
      sd[f"{name}.bn.{leaf}"] = rng.uniform(lo, hi, c).astype(np.float32)
  sd["sub_sparse_conv1.net.kernel"] = rng.standard_normal((3, 3, 3, 6, 3)).astype(np.float32) / 9
  sd["sub_sparse_conv2.net.kernel"] = rng.standard_normal((3, 3, 3, 3, 3)).astype(np.float32) / 9
  for key in list(sd):
    if ".net." in key:
      sd[key.replace("kernel", "offset")] = np.zeros(3, np.float32)
  v = open3d_ml_variables(sd)
  assert jax.tree_util.tree_map(jnp.shape, v) == shapes
  y = block.apply(v, x, vox.valid, maps.subm)
  s = {k_: np.asarray(a, np.float64) for k_, a in sd.items()}
  h = np.maximum(np_batch_norm([x[:k]], s, "batch_norm1", False)[0], 0)
  h = np.maximum(np_batch_norm([ref.subm(h, 0, s["sub_sparse_conv1.net.kernel"])], s,
                               "batch_norm2", False)[0], 0)
  want = x[:k] @ s["lin.linear.weight"].T + ref.subm(h, 0, s["sub_sparse_conv2.net.kernel"])
  np.testing.assert_allclose(y[:k], want, rtol=1e-4, atol=1e-4)


def test_unet_layout_matches_open3d_ml_module_indices():
  planes = [16 * (i + 1) for i in range(7)]
  plain = unet_layout(1, planes, False)
  assert len(plain) == 87
  assert [i for i, (k, _, _) in enumerate(plain) if k == "bn"] == [
      0, 4, 7, 11, 14, 18, 21, 25, 28, 32, 35, 39, 42, 45, 49, 52, 56, 59, 63, 66, 70, 73, 77, 80,
      84]
  assert [i for i, (k, _, _) in enumerate(plain) if k == "conv"] == [6, 13, 20, 27, 34, 41]
  assert [i for i, (k, _, _) in enumerate(plain) if k == "deconv"] == [47, 54, 61, 68, 75, 82]
  assert [(i, a, b) for i, (k, a, b) in enumerate(plain) if k == "subm"][-6:] == [
      (51, 192, 96), (58, 160, 80), (65, 128, 64), (72, 96, 48), (79, 64, 32), (86, 32, 16)]
  res = unet_layout(1, planes, True)
  assert len(res) == 61
  assert [i for i, (k, _, _) in enumerate(res) if k == "residual"] == list(range(0, 35, 5)) + \
      list(range(35, 61, 5))
  res2 = unet_layout(2, planes, True)  # README of tests/data/unet: reps=2 indices
  assert [i for i, (k, _, _) in enumerate(res2) if k == "residual"][:2] == [0, 1]
  assert res2[42] == ("residual", 192, 96) and res2[43] == ("residual", 96, 96)
  assert [k for k, *_ in res2].index("deconv") == 40
  for reps in (1, 2, 3):
    for residual in (False, True):
      want = np_torch_layout(reps, planes, residual)
      assert [k for k, *_ in unet_layout(reps, planes, residual)] == [w[0] for w in want]


@pytest.mark.parametrize("residual", [False, True])
def test_state_dict_names_and_variables_tree(rng, residual):
  m = 16
  sd = random_state_dict(rng, m, 1, residual)
  # REFERENCE-unet.md: 184 entries / 2,693,772 numbers plain, 281 / 4,340,224 residual (m=16)
  assert (len(sd), sum(v.size for v in sd.values())) == (
      (281, 4_340_224) if residual else (184, 2_693_772))
  v = open3d_ml_variables(sd)
  model = SparseConvUnet(multiplier=m, residual_blocks=residual)
  pts, feats = tiny_cloud(rng, 40)
  shapes = jax.eval_shape(model.init, jax.random.key(0), pts, feats)
  assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == \
      jax.tree_util.tree_map(lambda a: a.shape, v)
  back = to_open3d_ml_state_dict(v)
  assert set(back) == set(sd)
  for key, val in sd.items():
    np.testing.assert_array_equal(back[key], val, err_msg=key)
  # linear weights are transposed into Dense kernels; conv kernels keep Open3D's layout
  np.testing.assert_array_equal(v["params"]["linear"]["kernel"], sd["linear.linear.weight"].T)
  np.testing.assert_array_equal(v["params"]["sub_sparse_conv"]["kernel"],
                                sd["sub_sparse_conv.net.kernel"])
  bad = dict(sd)
  bad["unet.net.6.net.offset" if not residual else "unet.net.4.net.offset"] = np.zeros(3)
  with pytest.raises(ValueError, match="offset"):
    open3d_ml_variables(bad)
  with pytest.raises(ValueError, match="not part of SparseConvUnet"):
    open3d_ml_variables({**sd, "unet.net.99.foo": np.zeros(1)})
  assert open3d_ml_variables({"module." + k: a for k, a in sd.items()})["params"].keys() == \
      v["params"].keys()


# ---------------------------------------------------------------------------------------------
# the whole network: tiny clouds against the NumPy reference


@pytest.fixture(scope="module")
def tiny_case():
  rng = np.random.default_rng(20251125)
  clouds = [tiny_cloud(rng, 160, extent=9), tiny_cloud(rng, 120, extent=7, origin=(40, 2, 9))]
  return clouds


@pytest.mark.parametrize("reps,residual,levels", [(1, False, 3), (2, True, 3)])
def test_tiny_unet_vs_numpy_float64(tiny_case, reps, residual, levels):
  rng = np.random.default_rng(reps * 10 + residual)
  m = 3
  sd = random_state_dict(rng, m, reps, residual, levels=levels, num_classes=5)
  model = SparseConvUnet(multiplier=m, conv_block_reps=reps, residual_blocks=residual,
                         num_classes=5, num_levels=levels)
  v = open3d_ml_variables(sd)
  pts, feats = zip(*tiny_case)
  want = np_unet(sd, [NpCloud(p, f, levels) for p, f in tiny_case], m, reps, residual, levels)
  caps = (160,) * levels
  got = model.apply(v, list(pts), list(feats), capacities=caps)
  assert rel_err(got, want) < 1e-5
  got0 = model.apply(v, pts[0], feats[0], capacities=caps)  # one cloud alone: the same rows
  assert rel_err(got0, want[:160]) < 1e-5


def test_input_forms_jit_vmap_and_gradients(tiny_case):
  """Single, list, padded (B, n, 3), packed (batch ids), under jit and vmap: same logits;
  a training step under jit. A 2-level U-Net keeps the compiled programs small."""
  rng = np.random.default_rng(5)
  levels, m = 2, 3
  sd = random_state_dict(rng, m, 1, False, levels=levels, num_classes=4)
  v = open3d_ml_variables(sd)
  model = SparseConvUnet(multiplier=m, num_classes=4, num_levels=levels)
  (p0, f0), (p1, f1) = tiny_case
  want = np_unet(sd, [NpCloud(p, f, levels) for p, f in tiny_case], m, 1, False, levels)
  n0, n1 = len(p0), len(p1)
  # packed: concatenated clouds with cloud ids, in any order, padded to 320 rows
  perm = rng.permutation(n0 + n1)
  pts = np.full((320, 3), np.nan, np.float32)
  feats = np.zeros((320, 3), np.float32)
  batch = np.zeros(320, np.int32)
  pts[:n0 + n1] = np.concatenate([p0, p1])[perm]
  feats[:n0 + n1] = np.concatenate([f0, f1])[perm]
  batch[:n0 + n1] = np.repeat([0, 1], [n0, n1])[perm]
  inv = np.argsort(perm)
  got = model.apply(v, pts, feats, batch=batch, valid=n0 + n1, capacities=(320,) * levels)
  assert rel_err(np.asarray(got)[:n0 + n1][inv], want) < 1e-5
  assert np.all(np.asarray(got)[n0 + n1:] == 0)
  # padded (B, n, 3) + counts, garbage in the padding, under jit with exact capacities
  pad = np.full((2, 160, 3), np.nan, np.float32)
  fpad = np.full((2, 160, 3), 7.0, np.float32)
  pad[0, :n0], pad[1, :n1], fpad[0, :n0], fpad[1, :n1] = p0, p1, f0, f1
  counts = np.array([n0, n1])
  caps = tuple(max(c) for c in zip(*unet_level_sizes([p0, p1], levels=levels)))
  padded = jax.jit(functools.partial(model.apply, capacities=caps))(v, pad, fpad, valid=counts)
  assert padded.shape == (2, 160, 4)
  assert rel_err(np.concatenate([padded[0, :n0], padded[1, :n1]]), want) < 1e-5
  assert np.all(np.asarray(padded[1, n1:]) == 0)
  small = (caps[0] - 1,) + caps[1:]
  with pytest.raises(ValueError, match="capacity"):  # a capacity too small: an error ...
    model.apply(v, p0, f0, capacities=small)
  one = SparseConvUnet(multiplier=m, num_classes=4, num_levels=1)
  v1 = {"params": {k: v["params"][k] for k in ("sub_sparse_conv", "batch_norm", "linear")},
        "batch_stats": {"batch_norm": v["batch_stats"]["batch_norm"]}}
  v1["params"]["unet"] = {"net_0": v["params"]["unet"]["net_0"],
                          "net_2": v["params"]["unet"]["net_2"]}
  v1["batch_stats"]["unet"] = {"net_0": v["batch_stats"]["unet"]["net_0"]}

  @functools.partial(jax.jit, static_argnames="caps")
  def one_level(v1, pad, fpad, counts, caps):
    return jax.vmap(lambda p, f, c: one.apply(v1, p, f, valid=c, capacities=caps))(
        pad, fpad, counts)

  vmapped = one_level(v1, pad, fpad, counts, (160,))
  np.testing.assert_allclose(vmapped, one.apply(v1, pad, fpad, valid=counts, capacities=(160,)),
                             rtol=1e-5, atol=1e-5)  # vmap over padded clouds = the batch form
  assert np.all(np.isfinite(vmapped))
  with pytest.raises(Exception, match="capacity"):  # ... and from inside jit + vmap
    np.asarray(one_level(v1, pad, fpad, counts, small[:1]))

  # a training step: value_and_grad under jit, train-mode BatchNorm over both clouds
  labels = jnp.asarray(rng.integers(0, 4, (2, 160)))

  def loss_fn(params, stats):
    logits, upd = model.apply({"params": params, "batch_stats": stats}, pad, fpad, valid=counts,
                              train=True, mutable=["batch_stats"], capacities=caps)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mask = jnp.arange(160)[None] < counts[:, None]
    return jnp.sum(jnp.where(mask, nll, 0)) / mask.sum(), (upd, logits)

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (upd, logits)), grads = step(v["params"], v["batch_stats"])
  want_t = np_unet(sd, [NpCloud(p, f, levels) for p, f in tiny_case], m, 1, False, levels,
                   train=True)
  assert rel_err(np.concatenate([logits[0, :n0], logits[1, :n1]]), want_t) < 1e-4
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert not np.allclose(upd["batch_stats"]["batch_norm"]["mean"],
                         v["batch_stats"]["batch_norm"]["mean"])
  # finite differences along the gradient of a level-0 and a level-1 kernel
  for name in ("net_2", "net_9"):
    gk = grads["unet"][name]["kernel"]
    d = gk / jnp.linalg.norm(gk)

    def shifted(s):
      p = jax.tree_util.tree_map(lambda a: a, v["params"])
      p["unet"][name] = {"kernel": v["params"]["unet"][name]["kernel"] + s * d}
      return float(step(p, v["batch_stats"])[0][0])

    eps = 1e-2
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(fd - float(jnp.linalg.norm(gk))) < 2e-2 * abs(fd) + 1e-4, name


# ---------------------------------------------------------------------------------------------
# Open3D-ML's own outputs


def _load_case(name):
  d = np.load(DATA / f"{name}.npz")
  sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
  cfg = dict(multiplier=int(d["config_multiplier"]), voxel_size=float(d["config_voxel_size"]),
             conv_block_reps=int(d["config_conv_block_reps"]),
             residual_blocks=bool(d["config_residual_blocks"]),
             in_channels=int(d["config_in_channels"]), num_classes=int(d["config_num_classes"]),
             grid_size=int(d["config_grid_size"]))
  return d, sd, cfg


def _by_position(pos, feats):
  order = np.lexsort(np.asarray(pos).T[::-1])
  return np.asarray(pos)[order], np.asarray(feats)[order]


@pytest.mark.parametrize("name", ["plain", "residual"])
def test_open3d_ml_logits_and_intermediates(name):
  d, sd, cfg = _load_case(name)
  model = SparseConvUnet(**cfg)
  v = open3d_ml_variables(sd)
  pts = [d["points_b0"], d["points_b1"]]
  feats = [d["feats_b0"], d["feats_b1"]]
  n = max(len(p) for p in pts)
  logits, inter = model.apply(v, pts, feats, capacities=(n,) * 7, mutable=["intermediates"])
  err = rel_err(logits, d["logits"])
  print(f"{name}: max |logit diff| / max |logit| = {err:.2e}")
  assert err < 1e-4
  inter = inter["intermediates"]
  vox = inter["voxels"][0]
  layout = unet_layout(cfg["conv_block_reps"], model.planes, cfg["residual_blocks"])
  deep = [k for k, *_ in layout].index("deconv") - 3
  assert deep == int(d["deep_module_index"])
  # the clouds are packed: cloud b's rows of every level start at b * n (one capacity n)
  rows = lambda a, b, k=None: np.asarray(a)[b * n:b * n + (n if k is None else k)]  # noqa
  for b in range(2):
    levels = [jax.tree_util.tree_map(lambda a: rows(a, b), lv) for lv in inter["voxels"][0]]
    k = int(levels[0].count)
    # InputLayer: same voxels in the same order, same mean features
    np.testing.assert_array_equal(levels[0].positions()[:k], d[f"inp_pos_b{b}"])
    np.testing.assert_allclose(rows(inter["input_layer"][0], b, k), d[f"inp_feats_b{b}"],
                               rtol=1e-6)
    # coarse levels: Open3D-ML keeps them at j + 0.25 (other row order)
    for lev in range(1, 7):
      kl = int(levels[lev].count)
      got = _by_position(levels[lev].positions(0.25)[:kl], np.zeros(kl))[0]
      want = _by_position(d[f"level{lev}_pos_b{b}"], np.zeros(kl))[0]
      np.testing.assert_array_equal(got, want)
    if f"subm0_feats_b{b}" in d.files:
      assert rel_err(rows(inter["out_sub_sparse_conv"][0], b, k), d[f"subm0_feats_b{b}"]) < 1e-5
    k6 = int(levels[6].count)
    gp, gf = _by_position(levels[6].positions(0.25)[:k6],
                          rows(inter["unet"][f"out_net_{deep}"][0], b, k6))
    wp, wf = _by_position(d[f"deep_pos_b{b}"], d[f"deep_feats_b{b}"])
    np.testing.assert_array_equal(gp, wp)
    assert rel_err(gf, wf) < 1e-4
  assert vox[0].coords.shape == (2 * n, 3)


@pytest.mark.parametrize("fname", ["small_checkpoint.pth", "small_state_dict.pth"])
def test_load_checkpoint_real_torch_files(fname):
  d = np.load(DATA / "small_checkpoint.npz")
  sd = load_open3d_ml_checkpoint(DATA / fname)
  want = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
  assert list(sd) == list(want)  # all 184 entries, in the model's order
  for k, a in want.items():
    assert sd[k].dtype == a.dtype and sd[k].shape == a.shape, k
    np.testing.assert_array_equal(sd[k], a, err_msg=k)
  raw = read_torch_file(DATA / fname)
  if fname == "small_checkpoint.pth":
    assert raw["epoch"] == int(d["epoch"])
    assert set(raw) >= {"model_state_dict", "optimizer_state_dict", "scheduler_state_dict"}
  else:
    assert isinstance(raw, OrderedDict)


def test_small_checkpoint_logits():
  d = np.load(DATA / "small_checkpoint.npz")
  _, _, cfg = _load_case("plain")
  cfg["multiplier"] = int(d["config_multiplier"])
  model = SparseConvUnet(**cfg)
  v = open3d_ml_variables(load_open3d_ml_checkpoint(DATA / "small_checkpoint.pth"))
  p = np.load(DATA / "plain.npz")
  # cloud 0 is the same pre-processed cloud as in plain.npz: run it in the same 2-cloud form
  # as the tests above (same compiled geometry), compare its rows
  n = len(d["points_b0"])
  logits = model.apply(v, [d["points_b0"], p["points_b1"]], [d["feats_b0"], p["feats_b1"]],
                       capacities=(n,) * 7)
  assert rel_err(logits[:n], d["logits"]) < 1e-4


def test_open3d_ml_preprocess_reproduces_points():
  d = np.load(DATA / "plain.npz")
  for b in range(2):
    xyz, rgb = d[f"raw_xyz_b{b}"], d[f"raw_rgb_b{b}"]
    seed = int(d[f"preprocess_seed_b{b}"])
    p, f, kept = open3d_ml_preprocess(xyz, rgb, float(d["config_voxel_size"]),
                                      np.random.default_rng(seed))
    np.testing.assert_array_equal(p, d[f"points_b{b}"])
    np.testing.assert_array_equal(f, d[f"feats_b{b}"])
    np.testing.assert_array_equal(kept, np.arange(len(xyz)))
    p2, _, _ = open3d_ml_preprocess(xyz, rgb, 0.05, d[f"grid_offset_b{b}"])
    np.testing.assert_array_equal(p2, d[f"points_b{b}"])
    p3, _, _ = SparseConvUnet().preprocess(xyz, rgb, seed)  # an int seeds default_rng
    np.testing.assert_array_equal(p3, d[f"points_b{b}"])
  # rows leaving [0, 4096) are dropped; the kept indices say which
  xyz = np.array([[0.0, 0, 0], [300.0, 0, 0], [0.1, 0.2, 0.3]], np.float32)
  p, f, kept = open3d_ml_preprocess(xyz, np.eye(3), 0.05, [10.0, 10.0, 10.0])
  assert kept.tolist() == [0, 2] and p.tolist() == [[10.5, 10.5, 10.5], [12.5, 14.5, 16.5]]


# ---------------------------------------------------------------------------------------------
# the torch-free reader on synthetic torch.save files (dtypes, views, refusing code)


def _fake_torch_save(obj, tensors_dtype_names):
  """Writes ``obj`` (arrays inside) in torch's zip format, pickling the arrays as torch does
  (``_rebuild_tensor_v2`` over persistent storages), without torch: fake ``torch`` modules."""
  torch_mod = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("not called when writing")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", \
      "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  storage_classes = {}
  for name in set(tensors_dtype_names.values()):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch_mod, name, cls)
    storage_classes[name] = cls
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils
  torch_mod._utils = utils
  storages = []

  class Storage:
    def __init__(self, arr, cls):
      self.arr, self.cls = arr, cls

  class Tensor:
    def __init__(self, base, offset, shape, strides, cls):
      self.base, self.offset, self.shape, self.strides, self.cls = base, offset, shape, strides, cls

    def __reduce__(self):
      return (_rebuild_tensor_v2, (self.base, self.offset, self.shape, self.strides, False,
                                   OrderedDict()))

  def wrap(x):
    if isinstance(x, dict):
      return type(x)((k, wrap(v)) for k, v in x.items())
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray):
      arr, view = x  # (base array, ("view", offset, shape, strides)) or plain
      cls = storage_classes[tensors_dtype_names[id(arr)]]
      st = Storage(arr.ravel(), cls)
      storages.append(st)
      return Tensor(st, view[0], view[1], view[2], cls)
    if isinstance(x, np.ndarray):
      cls = storage_classes[tensors_dtype_names[id(x)]]
      st = Storage(np.ascontiguousarray(x).ravel(), cls)
      storages.append(st)
      strides = tuple(s // x.itemsize for s in np.ascontiguousarray(x).strides)
      return Tensor(st, 0, x.shape, strides, cls)
    return x

  class P(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, Storage):
        return ("storage", o.cls, str(storages.index(o)), "cpu", o.arr.size)
      return None

  try:
    wrapped = wrap(obj)
    buf = io.BytesIO()
    P(buf, protocol=2).dump(wrapped)
  finally:
    for k, mod in saved.items():
      if mod is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = mod
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for i, st in enumerate(storages):
      zf.writestr(f"archive/data/{i}", st.arr.tobytes())
    zf.writestr("archive/version", "3\n")
  out.seek(0)
  return out


def test_read_torch_file_dtypes_views_and_refusal(rng):
  arrs = {
      "f32": rng.standard_normal((2, 3)).astype(np.float32),
      "f64": rng.standard_normal(4),
      "f16": rng.standard_normal((3, 1)).astype(np.float16),
      "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
      "i64": np.arange(3, dtype=np.int64),
      "scalar": np.array(7, np.int64),
      "bool": np.array([True, False]),
  }
  names = {"f32": "FloatStorage", "f64": "DoubleStorage", "f16": "HalfStorage",
           "bf16": "BFloat16Storage", "i64": "LongStorage", "scalar": "LongStorage",
           "bool": "BoolStorage"}
  dtype_names = {id(a): names[k] for k, a in arrs.items()}
  base = np.arange(24, dtype=np.float32)
  dtype_names[id(base)] = "FloatStorage"
  obj = {"model_state_dict": OrderedDict(arrs), "epoch": 2,
         "view": (base, (1, (3, 2), (4, 2)))}  # a strided view into a shared storage
  f = _fake_torch_save(obj, dtype_names)
  got = read_torch_file(f)
  for k, a in arrs.items():
    assert got["model_state_dict"][k].dtype == a.dtype, k
    np.testing.assert_array_equal(got["model_state_dict"][k], a)
  np.testing.assert_array_equal(got["view"], np.lib.stride_tricks.as_strided(
      base[1:], (3, 2), (16, 8)))
  f.seek(0)
  sd = load_open3d_ml_checkpoint(f)
  assert list(sd) == list(arrs)

  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ("echo pwned",))

  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  buf.seek(0)
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    read_torch_file(buf)
  with pytest.raises(ValueError, match="zip"):
    read_torch_file(io.BytesIO(b"not a zip file"))
