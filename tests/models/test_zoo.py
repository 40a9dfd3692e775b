"""The zoo's spconv networks against spconv itself: OpenPCDet's VoxelBackBone8x (SECOND) and
VoxelResBackBone8x (CenterPoint) with HeightCompression and MeanVFE, Pointcept's SpUNet-v1m1.

Reference cases (tests/data/zoo, made by torch 2.13 + spconv 2.3.8 with make_cases.py, see
its README): reduced-width networks with the originals' module names, random weights and
BatchNorm statistics, checkpoints in each zoo's format (OpenPCDet: legacy torch.save with
'model_state', spconv 1.x and 2.x layouts; Pointcept: zip, 'module.backbone.' keys),
simulated LiDAR scans and indoor rooms; eval-mode and train-mode outputs of every stage.
Regular-conv outputs come in spconv's hash order: levels are compared sorted by index.
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers import rel_err

from jax_sparseconv.models import (SpUNet, VoxelBackBone8x, VoxelResBackBone8x,
                                   load_torch_checkpoint, mean_vfe, openpcdet_variables,
                                   pointcept_variables, spconv_kernel, spconv_variables,
                                   to_spconv_state_dict)

DATA = pathlib.Path(__file__).parents[1] / "data" / "zoo"
TOL = 1e-4
LEVELS = ("x_conv1", "x_conv2", "x_conv3", "x_conv4", "encoded_spconv_tensor")
MODELS = {"second": VoxelBackBone8x, "centerpoint": VoxelResBackBone8x}


@functools.lru_cache(maxsize=None)
def case(name):
  return dict(np.load(DATA / f"{name}.npz"))


def backbone(name, **kw):
  d = case(name)
  return MODELS[name](4, tuple(int(g) for g in d["config/grid_size"]),
                      channels=tuple(int(c) for c in d["config/channels"]), **kw)


def by_index(indices, feats):
  indices, feats = np.asarray(indices), np.asarray(feats)
  order = np.lexsort(indices.T[::-1])
  return indices[order], feats[order]


def check_level(t, indices, feats, what):
  k = int(t.count)
  gi, gf = by_index(t.indices()[:k], t.feats[:k])
  wi, wf = by_index(indices, feats)
  np.testing.assert_array_equal(gi, wi, err_msg=what)
  err = rel_err(gf, wf)
  assert err < TOL, (what, err)
  return err


@functools.lru_cache(maxsize=None)
def jitted(name, train):
  """One compiled program per model and mode (capacities from the core's rules)."""
  d = case(name)
  model = backbone(name)
  caps = model.level_sizes(d["voxel_coords"], 2)
  model = backbone(name, capacities=caps)

  def run(v, feats, coords, valid):
    if train:
      return model.apply(v, feats, coords, 2, valid, train=True, mutable=["batch_stats"])
    return model.apply(v, feats, coords, 2, valid)
  return jax.jit(run)


@pytest.mark.parametrize("name,layout", [("second", "1"), ("centerpoint", "2")])
def test_openpcdet_backbone_eval_matches_spconv(name, layout):
  d = case(name)
  ckpt = load_torch_checkpoint(DATA / f"{name}_spconv{layout}.pth")
  assert "dense_head.conv_cls.weight" in ckpt  # a whole-detector file: head keys skipped
  v = openpcdet_variables(ckpt, spconv_version=layout)
  n = len(d["voxel_coords"])
  out = jitted(name, False)(v, d["voxel_features"], d["voxel_coords"], n)
  errs = [check_level(out[k], d[f"eval/{k}/indices"], d[f"eval/{k}/feats"], k) for k in LEVELS]
  bev = out["spatial_features"]
  assert bev.shape == d["eval/spatial_features"].shape
  errs.append(rel_err(bev, d["eval/spatial_features"]))
  print(f"{name} spconv{layout}: max rel err per stage {['%.1e' % e for e in errs]}")
  assert errs[-1] < TOL


def test_openpcdet_train_mode_matches_spconv():
  name = "centerpoint"
  d = case(name)
  v = openpcdet_variables(load_torch_checkpoint(DATA / f"{name}_spconv2.pth"), "2")
  out, upd = jitted(name, True)(v, d["voxel_features"], d["voxel_coords"],
                                len(d["voxel_coords"]))
  for k in LEVELS:
    check_level(out[k], d[f"train/{k}/indices"], d[f"train/{k}/feats"], k)
  assert rel_err(out["spatial_features"], d["train/spatial_features"]) < TOL
  stats = upd["batch_stats"]["conv_out.1"]
  np.testing.assert_allclose(stats["mean"], d["train/conv_out.1.running_mean"], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(stats["var"], d["train/conv_out.1.running_var"], rtol=1e-4)


def test_openpcdet_layouts_and_file_forms():
  """spconv 1.x and 2.x files give the same variables; 'model_state' or a bare dict."""
  name = "second"
  raw1 = load_torch_checkpoint(DATA / f"{name}_spconv1.pth")
  raw2 = load_torch_checkpoint(DATA / f"{name}_spconv2.pth")
  v1, v2 = openpcdet_variables(raw1, "1"), openpcdet_variables(raw2, "2")
  assert jax.tree_util.tree_structure(v1) == jax.tree_util.tree_structure(v2)
  for a, b in zip(jax.tree_util.tree_leaves(v1), jax.tree_util.tree_leaves(v2)):
    np.testing.assert_array_equal(a, b)
  v_nested = openpcdet_variables({"model_state": raw2, "epoch": 3}, "2")
  assert jax.tree_util.tree_structure(v_nested) == jax.tree_util.tree_structure(v2)
  # the same tree as the model's own
  d = case(name)
  shapes = jax.eval_shape(lambda f, c: backbone(name).init(jax.random.key(0), f, c, 2),
                          d["voxel_features"], d["voxel_coords"])
  assert jax.tree_util.tree_map(jnp.shape, shapes) == jax.tree_util.tree_map(jnp.shape, v1)
  # the wrong layout for Cin != Cout convs fails with the layer named, not silently
  with pytest.raises(ValueError, match="kernel"):
    backbone(name).apply(openpcdet_variables(raw1, "2"), d["voxel_features"],
                         d["voxel_coords"], 2)
  with pytest.raises(ValueError, match="spconv_version"):
    openpcdet_variables(raw1, "3")
  with pytest.raises(ValueError, match="start with"):
    openpcdet_variables({"vfe.x": np.zeros(3)}, "1")
  with pytest.raises(ValueError, match="neither"):
    openpcdet_variables({**raw2, "backbone_3d.conv1.0.0.offset": np.zeros((2, 2))}, "2")
  # the way back reproduces the file
  back = to_spconv_state_dict(v2, "2", prefix="backbone_3d.")
  for k, a in back.items():
    np.testing.assert_array_equal(a, raw2[k], err_msg=k)
  back1 = to_spconv_state_dict(v1, "1", prefix="backbone_3d.")
  for k, a in back1.items():
    np.testing.assert_array_equal(a, raw1[k], err_msg=k)


def test_padded_shuffled_voxels_give_the_same_levels(rng):
  """Voxels in another order with garbage padding rows (a padded batch), under jit."""
  name = "second"
  d = case(name)
  v = openpcdet_variables(load_torch_checkpoint(DATA / f"{name}_spconv1.pth"), "1")
  n = len(d["voxel_coords"])
  perm = rng.permutation(n)
  pad = 37
  feats = np.concatenate([d["voxel_features"][perm], np.full((pad, 4), 1e6, np.float32)])
  coords = np.concatenate([d["voxel_coords"][perm], np.full((pad, 4), 3, np.int32)])
  model = backbone(name, capacities=backbone(name).level_sizes(d["voxel_coords"], 2))
  out = jax.jit(lambda v, f, c: model.apply(v, f, c, 2, n))(v, feats, coords)
  assert out["x_conv1"].feats.shape[0] == n + pad
  assert np.all(np.asarray(out["x_conv1"].feats[n:]) == 0)
  for k in LEVELS:
    check_level(out[k], d[f"eval/{k}/indices"], d[f"eval/{k}/feats"], k)
  assert rel_err(out["spatial_features"], d["eval/spatial_features"]) < TOL


def test_bev_feeds_a_flax_2d_network():
  """The BEV map into a small Flax 2D head; a training step through backbone and head."""
  name = "second"
  d = case(name)
  v = openpcdet_variables(load_torch_checkpoint(DATA / f"{name}_spconv1.pth"), "1")
  model = backbone(name, capacities=backbone(name).level_sizes(d["voxel_coords"], 2))

  class Head(nn.Module):
    @nn.compact
    def __call__(self, bev):
      x = jnp.transpose(bev, (0, 2, 3, 1))  # (B, C*D, H, W) -> NHWC
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      return nn.Conv(2, (1, 1))(x)

  head = Head()
  hv = head.init(jax.random.key(0), jnp.asarray(d["eval/spatial_features"]))
  target = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))

  def loss_fn(params, hparams):
    out, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]},
                           d["voxel_features"], d["voxel_coords"], 2, train=True,
                           mutable=["batch_stats"])
    pred = head.apply(hparams, out["spatial_features"])
    return jnp.mean((pred - target) ** 2), upd

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, upd), (g, gh) = step(v["params"], hv)
  assert np.isfinite(float(loss))
  assert float(jnp.linalg.norm(g["conv_input.0"]["kernel"])) > 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves((g, gh)))
  assert set(upd["batch_stats"]) == set(v["batch_stats"])


@pytest.mark.parametrize("b", [0, 1])
def test_mean_vfe_matches_openpcdet_voxel_generator(b):
  d = case("second")
  pts = d[f"points_b{b}"]
  kw = dict(point_cloud_range=tuple(d["config/pc_range"]),
            voxel_size=tuple(d["config/voxel_size"]),
            max_points_per_voxel=int(d["config/max_points"]),
            max_voxels=int(d["config/max_voxels"]))
  want_f, want_c = d[f"vfe_feats_b{b}"], d[f"vfe_coords_b{b}"]
  cap = len(want_c) + 5
  f, c, k = jax.jit(functools.partial(mean_vfe, capacity=cap, **kw))(pts)
  k = int(k)
  assert k == len(want_c)
  np.testing.assert_array_equal(c[:k, 1:], want_c)  # same voxels, same order (first point)
  assert np.all(np.asarray(c[:k, 0]) == 0) and np.all(np.asarray(f[k:]) == 0)
  assert rel_err(f[:k], want_f) < 1e-6
  if b == 0:  # max_voxels and max_points_per_voxel cut as the generator does
    kw.update(max_points_per_voxel=3, max_voxels=500)
    f, c, k = mean_vfe(pts, **kw)
    np.testing.assert_array_equal(c[:int(k), 1:], d["vfe_small/coords"])
    assert rel_err(f[:int(k)], d["vfe_small/feats"]) < 1e-6


def test_mean_vfe_packed_batch_is_the_voxels_of_each_cloud():
  d = case("second")
  kw = dict(point_cloud_range=tuple(d["config/pc_range"]),
            voxel_size=tuple(d["config/voxel_size"]), max_points_per_voxel=5, max_voxels=2500)
  p0, p1 = d["points_b0"], d["points_b1"]
  pts = np.concatenate([p0, p1, np.full((10, 4), np.nan, np.float32)])
  batch = np.concatenate([np.zeros(len(p0)), np.ones(len(p1)), np.zeros(10)]).astype(np.int32)
  f, c, k = mean_vfe(pts, batch=batch, valid=len(p0) + len(p1), **kw)
  want = np.asarray(d["voxel_coords"])
  np.testing.assert_array_equal(c[:int(k)], want)  # OpenPCDet's collated [b, z, y, x]
  assert rel_err(f[:int(k)], d["voxel_features"]) < 1e-6
  with pytest.raises(ValueError, match="capacity"):
    mean_vfe(pts, batch=batch, valid=len(p0) + len(p1), capacity=int(k) - 1, **kw)


@functools.lru_cache(maxsize=None)
def spunet_run(train):
  d = case("spunet")
  model = SpUNet(6, 5, base_channels=int(d["config/base_channels"]),
                 channels=tuple(int(c) for c in d["config/channels"]),
                 layers=tuple(int(c) for c in d["config/layers"]))
  model = model.clone(capacities=model.level_sizes(d["grid_coord"], d["offset"]))
  v = pointcept_variables(load_torch_checkpoint(DATA / "spunet.pth"))

  def run(v, g, f, o):
    if train:
      return model.apply(v, g, f, o, train=True, mutable=["batch_stats", "intermediates"])
    return model.apply(v, g, f, o, mutable=["intermediates"])
  return model, v, jax.jit(run)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_spunet_matches_spconv(mode):
  d = case("spunet")
  _, v, run = spunet_run(mode == "train")
  logits, inter = run(v, d["grid_coord"], d["feat"], d["offset"])
  err = rel_err(logits, d[f"{mode}/logits"])
  print(f"SpUNet {mode}: logits max rel err {err:.1e}")
  assert err < TOL
  # the last decoder stage is on the input voxels, in input order
  assert rel_err(inter["intermediates"]["dec0"][0], d[f"{mode}/dec0"]) < TOL


def test_spunet_checkpoint_and_padding():
  d = case("spunet")
  model, v, run = spunet_run(False)
  raw = load_torch_checkpoint(DATA / "spunet.pth")
  assert all(k.startswith("module.backbone.") for k in raw)
  # kernel-1 convs (proj, final) read as spconv 2.x computes them: x @ w.reshape(Cin, Cout)
  w = raw["module.backbone.final.weight"]
  np.testing.assert_array_equal(v["params"]["final"]["kernel"][0, 0, 0],
                                w.reshape(w.shape[-1], w.shape[0]))
  k = spconv_kernel(np.arange(24.0).reshape(4, 1, 1, 1, 6), "2")
  assert k.shape == (1, 1, 1, 6, 4) and k[0, 0, 0, 1, 0] == 4.0
  back = to_spconv_state_dict(v, "2", prefix="module.backbone.")
  for key, a in back.items():
    np.testing.assert_array_equal(a, raw[key], err_msg=key)
  # padded rows after offset[-1] (garbage) are ignored and come out as zeros
  n = len(d["grid_coord"])
  g = np.concatenate([d["grid_coord"], np.full((20, 3), 5, np.int32)])
  f = np.concatenate([d["feat"], np.full((20, 6), 1e5, np.float32)])
  logits, _ = jax.jit(lambda v, g, f, o: model.apply(v, g, f, o, mutable=["intermediates"]))(
      v, g, f, d["offset"])
  assert rel_err(logits[:n], d["eval/logits"]) < TOL and np.all(np.asarray(logits[n:]) == 0)
  with pytest.raises(ValueError, match="neither"):
    spconv_variables({"final.offset": np.zeros((2, 2))})
