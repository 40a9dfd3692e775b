"""MinkowskiEngine's and SPVNAS's MinkUNets (:mod:`jax_sparseconv.models.minkunet`) and
their checkpoint loaders (:mod:`jax_sparseconv.models.minkowski_weights`).

* Converters: each library's kernel, with a different weight in every slot, run by a
  NumPy brute force of that library's own slot -> offset rule
  (``tests/data/minkunet/layouts.py``, from ME ``src/kernel_region.hpp`` and TorchSparse
  ``nn/utils/kernel.py``), against our conv with the converted kernel.
* Networks: the reference checkpoints ``tests/data/minkunet/*.pth`` (written in ME's and
  TorchSparse's layouts from a torch + spconv reference, checked against the live
  MinkowskiEngine 0.5.4: ``me_verification.json``) give the stored per-point logits to
  1e-4, in eval and in train mode (with the running-stat update), from the raw points
  through our quantisation.
* jit, padded and packed batches, loader errors, round trips.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv import SparseTensor
from jax_sparseconv.models import minkowski_weights as W
from jax_sparseconv.models import minkunet as M
from jax_sparseconv.models.torch_file import load_torch_checkpoint
from tests.helpers import DATA_DIR

DATA = DATA_DIR / "minkunet"
sys.path.insert(0, str(DATA))
import layouts as L  # noqa: E402

MANIFEST = json.loads((DATA / "manifest.json").read_text())
CASES = sorted(MANIFEST["cases"])
TOL = 1e-4


# --------------------------------------------------------------------------- helpers
def level(coords_bxyz, feats, capacity=None, stride=1):
  """A SparseTensor from (b, x, y, z) rows in units of ``stride`` (ME keeps coordinates
  multiplied by the tensor stride), padded to ``capacity``."""
  c = np.asarray(coords_bxyz, np.int64)
  n = len(c)
  cap = n if capacity is None else capacity
  pad = cap - n
  xyz = np.concatenate([c[:, 1:] // stride, np.zeros((pad, 3), np.int64)]).astype(np.int32)
  b = np.concatenate([c[:, 0], np.zeros(pad, np.int64)]).astype(np.int32)
  f = np.concatenate([np.asarray(feats, np.float32),
                      np.zeros((pad, np.shape(feats)[1]), np.float32)])
  return SparseTensor(feats=jnp.asarray(f), coords=jnp.asarray(xyz), valid=jnp.arange(cap) < n,
                      batch=jnp.asarray(b), voxel_size=jnp.ones(3, jnp.float32),
                      origin=jnp.zeros(3, jnp.float32), flags=jnp.zeros((), jnp.int32), maps={})


def rows(t: SparseTensor, stride=1):
  n = int(t.count)
  return np.c_[np.asarray(t.batch)[:n], np.asarray(t.coords)[:n] * stride]


def by_rows(coords, values):
  order = np.lexsort(np.asarray(coords).T[::-1])
  return np.asarray(coords)[order], np.asarray(values)[order]


@pytest.fixture(scope="module")
def cloud():
  r = np.random.default_rng(21)
  coords = np.unique(np.c_[r.integers(0, 2, 500), r.integers(-9, 9, (500, 3))], axis=0)
  return coords, r.standard_normal((len(coords), 3)).astype(np.float32)


def distinct(rng, shape):
  """A kernel whose slots all differ (a slot mix-up changes the result)."""
  k = rng.standard_normal(shape).astype(np.float32)
  assert len(np.unique(k.reshape(shape[0], -1), axis=0)) == shape[0]
  return k


def our_conv(kernel, t, km, transpose=False):
  f = sc.sparse_conv_transpose if transpose else sc.sparse_conv
  km = km.transposed() if transpose else km
  return np.asarray(f({"kernel": jnp.asarray(kernel)}, t.feats, kernel_map=km))


# --------------------------------------------------------------------------- converters
@pytest.mark.parametrize("K", [3, 5])
def test_minkowski_subm_kernel(cloud, rng, K):
  coords, x = cloud
  kme = distinct(rng, (K ** 3, 3, 4))
  _, want = L.me_conv_numpy(coords, x, kme, K)
  t = level(coords, x, len(coords) + 7)
  got = our_conv(W.kernel_from_minkowski(kme), t, t.kernel_map(K))
  np.testing.assert_allclose(got[:len(coords)], want, atol=1e-4)
  assert not got[len(coords):].any()


def test_minkowski_k2s2_and_transposed_kernels(cloud, rng):
  coords, x = cloud
  kme = distinct(rng, (8, 3, 4))
  want_c, want = L.me_conv_numpy(coords, x, kme, 2, stride=2)   # ME: negatives floored
  t = level(coords, x)
  coarse = t.conv(2, 2, rule="floor", key="down", capacity=len(coords))
  km = coarse.maps["down"].kernel_map
  got_c, got = by_rows(rows(coarse, 2), our_conv(W.kernel_from_minkowski(kme), t, km)
                       [:int(coarse.count)])
  np.testing.assert_array_equal(got_c, want_c)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # ME's MinkowskiConvolutionTranspose(k2, s2) back onto the cached finer coordinates
  kt = distinct(rng, (8, 4, 5))
  xc = rng.standard_normal((len(got_c), 4)).astype(np.float32)
  ours_rows = rows(coarse, 2)
  order = np.lexsort(ours_rows.T[::-1])
  xin = np.zeros((len(coords), 4), np.float32)
  xin[order] = xc  # coarse features in our row order
  _, want_up = L.me_conv_numpy(got_c, xc, kt, 2, tensor_stride=2, stride=2, transposed=True,
                               out_coords=coords)
  got_up = our_conv(W.kernel_from_minkowski(kt), coarse.replace(feats=jnp.asarray(xin)), km,
                    transpose=True)
  np.testing.assert_allclose(got_up, want_up, atol=1e-4)


def test_minkowski_kernel_1_and_bias(rng):
  k = rng.standard_normal((3, 5)).astype(np.float32)
  ours = W.kernel_from_minkowski(k)
  assert ours.shape == (1, 1, 1, 3, 5)
  x = rng.standard_normal((4, 3))
  np.testing.assert_allclose(x @ ours[0, 0, 0], x @ k)
  np.testing.assert_array_equal(W.kernel_to_minkowski(ours), k)


@pytest.mark.parametrize("version", ["1.4", "2.1"])
def test_torchsparse_kernels(cloud, rng, version):
  """TorchSparse's odd K (x fastest) and K=2 (z fastest) slots, 1.4 coordinates ``(x, y, z,
  b)`` times the tensor stride and 2.1 ``(b, x, y, z)`` in level units: one layout."""
  coords, x = cloud
  coords = coords - np.r_[0, coords[:, 1:].min(0)]   # SPVNAS's coordinates are >= 0
  ts_in = coords[:, [1, 2, 3, 0]] if version == "1.4" else coords
  t = level(coords, x)
  k3 = distinct(rng, (27, 3, 4))
  _, want = L.ts_conv_numpy(ts_in, x, k3, 3, version=version)
  np.testing.assert_allclose(our_conv(W.kernel_from_torchsparse(k3), t, t.kernel_map(3)),
                             want, atol=1e-4)
  k2 = distinct(rng, (8, 3, 4))
  out_c, want = L.ts_conv_numpy(ts_in, x, k2, 2, stride=2, version=version)
  out_bxyz = out_c[:, [3, 0, 1, 2]] if version == "1.4" else out_c
  coarse = t.conv(2, 2, rule="floor", key="down", capacity=len(coords))
  km = coarse.maps["down"].kernel_map
  got_c, got = by_rows(rows(coarse, 2 if version == "1.4" else 1),
                       our_conv(W.kernel_from_torchsparse(k2), t, km)[:int(coarse.count)])
  want_c, want = by_rows(out_bxyz, want)
  np.testing.assert_array_equal(got_c, want_c)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # an ME-order reading of a TorchSparse K=2 kernel would differ: the check bites
  wrong = our_conv(W.kernel_from_minkowski(k2), t, km)[:int(coarse.count)]
  assert np.abs(by_rows(rows(coarse), wrong)[1] - want).max() > 1e-2
  # the transposed conv (same pairs, same slot)
  kt = distinct(rng, (8, 4, 5))
  xc = rng.standard_normal((len(want_c), 4)).astype(np.float32)
  ts_coarse = want_c[:, [1, 2, 3, 0]] if version == "1.4" else want_c
  _, want_up = L.ts_conv_numpy(ts_coarse, xc, kt, 2, tensor_stride=2, stride=2, transposed=True,
                               out_coords=ts_in, version=version)
  order = np.lexsort(rows(coarse).T[::-1])
  xin = np.zeros((len(coords), 4), np.float32)
  xin[order] = xc
  got_up = our_conv(W.kernel_from_torchsparse(kt), coarse.replace(feats=jnp.asarray(xin)), km,
                    transpose=True)
  np.testing.assert_allclose(got_up, want_up, atol=1e-4)


def test_kernel_round_trips(rng):
  for v in (1, 8, 27, 125):
    k = rng.standard_normal((v, 2, 3)) if v > 1 else rng.standard_normal((2, 3))
    np.testing.assert_array_equal(W.kernel_to_minkowski(W.kernel_from_minkowski(k)), k)
    np.testing.assert_array_equal(W.kernel_to_torchsparse(W.kernel_from_torchsparse(k)), k)
  k2 = rng.standard_normal((8, 2, 3))
  # ME and TS K=2 kernels with the same weights: slots 1<->4 and 3<->6 swapped
  np.testing.assert_array_equal(W.kernel_from_torchsparse(k2[[0, 4, 2, 6, 1, 5, 3, 7]]),
                                W.kernel_from_minkowski(k2))
  with pytest.raises(ValueError, match="cube"):
    W.kernel_from_minkowski(np.zeros((9, 2, 3)))


# --------------------------------------------------------------------------- networks
_NETS: dict = {}


def network(name):
  """(model, variables) of a reference network, loaded from its library-layout .pth."""
  if name not in _NETS:
    sd = load_torch_checkpoint(DATA / f"{name}.pth")
    if name.startswith("me_"):
      cfg = MANIFEST["networks"][name]
      cls = M.ME_MODELS[cfg["cls"]]
      model = cls(out_channels=cfg["out_channels"], width=1 / cfg["divisor"])
      assert M.MinkUNet(**W.minkowski_config(sd)).widths() == model.widths()
      variables = W.minkowski_variables(sd, model)
    else:
      model = M.SPVNASMinkUNet(num_classes=19, cr=MANIFEST["networks"][name]["cr"])
      variables = W.torchsparse_variables(sd, model=model)
      assert W.spvnas_config(sd)["channels"] == model.widths()
    _NETS[name] = (model, variables, jax.jit(model.apply, static_argnames="train",
                                              donate_argnums=()))
  return _NETS[name]


def quantize(case, c, **kw):
  fn = M.tensor_field_quantize if str(c["library"]) == "me" else M.spvnas_quantize
  return fn(c["points"], c["point_features"], float(c["voxel_size"]), batch=c["point_batch"],
            **kw)


@pytest.fixture(scope="module", params=CASES)
def case(request):
  return request.param, np.load(DATA / f"{request.param}.npz")


def test_quantisation_matches_the_zoo(case):
  name, c = case
  x, p2v = quantize(name, c)
  ref = c["voxel_coords"] if str(c["library"]) == "me" else c["voxel_coords_bxyz"]
  np.testing.assert_array_equal(rows(x), ref)
  np.testing.assert_allclose(np.asarray(x.feats)[:len(ref)], c["voxel_features"], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(p2v), c["point_to_voxel"])


def test_reference_point_logits(case):
  name, c = case
  model, variables, apply = network(str(c["network"]))
  x, p2v = quantize(name, c)
  logits = np.asarray(M.slice_points(apply(variables, x), p2v))
  err = np.abs(logits - c["point_logits"]).max()
  assert err < TOL, (name, err)


@pytest.mark.parametrize("name", [n for n in CASES if MANIFEST["cases"][n]["train_forward"]])
def test_reference_train_mode(name):
  """Batch statistics, and the running stats after one step (torch momentum 0.1)."""
  c = np.load(DATA / f"{name}.npz")
  model, variables, _ = network(str(c["network"]))
  x, _ = quantize(name, c)
  out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  np.testing.assert_allclose(np.asarray(out.feats)[:int(x.count)], c["train_voxel_logits"],
                             atol=TOL)
  flavour = "me" if str(c["library"]) == "me" else "ts"
  sd = W._to_state_dict({"params": variables["params"], "batch_stats": upd["batch_stats"]},
                        flavour)
  keys = [k for k in c.files if k.startswith("train_state/") and "num_batches" not in k
          and "point_transforms" not in k]
  assert keys
  for k in keys:
    np.testing.assert_allclose(sd[k[len("train_state/"):]], c[k], atol=1e-5, err_msg=k)


def test_padded_batch_equals_unpadded():
  """Padding points (invalid, garbage positions), a larger capacity, per-level capacities
  and one cloud alone give the same logits as the packed reference batch."""
  name = "me_minkunet14a_room"
  c = np.load(DATA / f"{name}.npz")
  model, variables, apply = network(str(c["network"]))
  n = len(c["points"])
  r = np.random.default_rng(0)
  pts = np.concatenate([c["points"], r.uniform(-50, 50, (37, 3)).astype(np.float32)])
  feats = np.concatenate([c["point_features"], r.standard_normal((37, 3)).astype(np.float32)])
  batch = np.concatenate([c["point_batch"], np.full(37, 5, np.int32)])
  valid = np.arange(n + 37) < n
  x, p2v = M.tensor_field_quantize(pts, feats, float(c["voxel_size"]), batch=batch,
                                   valid=valid, capacity=4000)
  assert int(x.count) == MANIFEST["cases"][name]["num_voxels"] and x.coords.shape[0] == 4000
  padded = np.asarray(M.slice_points(apply(variables, x), p2v))
  np.testing.assert_allclose(padded[:n], c["point_logits"], atol=TOL)
  assert not padded[n:].any() and (np.asarray(p2v)[n:] == -1).all()
  small = model.clone(capacities=(2400, 1200, 600, 300))
  out = jax.jit(small.apply)(variables, x)
  np.testing.assert_allclose(np.asarray(M.slice_points(out, p2v))[:n], c["point_logits"],
                             atol=TOL)
  one = c["point_batch"] == 1      # the second cloud alone
  x1, p1 = M.tensor_field_quantize(c["points"][one], c["point_features"][one],
                                   float(c["voxel_size"]), capacity=2048)
  got = np.asarray(M.slice_points(apply(variables, x1), p1))
  np.testing.assert_allclose(got, c["point_logits"][one], atol=TOL)


def test_quantize_under_jit_and_rules():
  p = jnp.array([[0.01, 0, 0], [0.02, 0, 0], [-0.01, 0, 0], [0.074, 0, 0]])
  f = jnp.array([[1.0], [3.0], [5.0], [7.0]])
  x, p2v = jax.jit(lambda p, f: M.tensor_field_quantize(p, f, 0.05, capacity=4))(p, f)
  assert x.coords[:3, 0].tolist() == [-1, 0, 1] and x.feats[:3, 0].tolist() == [5.0, 2.0, 7.0]
  assert p2v.tolist() == [1, 1, 0, 2] and int(x.count) == 3
  y, q2v = M.spvnas_quantize(p.at[2, 0].set(-0.06), f, 0.05)  # rounded, shifted, first point
  assert y.coords[:3, 0].tolist() == [0, 1, 2] and y.feats[:3, 0].tolist() == [5.0, 1.0, 7.0]
  assert q2v.tolist() == [1, 1, 0, 2]
  with pytest.raises(ValueError, match="reduce"):
    M.sparse_quantize(p, f, 0.05, reduce="max")


def test_init_and_gradients_on_a_reduced_net():
  """A fresh MinkUNet14A at 1/8 width: init, a train step's gradients reach every kernel."""
  r = np.random.default_rng(1)
  pts = r.uniform(0, 2, (600, 3)).astype(np.float32)
  x, p2v = M.tensor_field_quantize(pts, np.c_[pts, np.ones(600)].astype(np.float32), 0.1)
  model = M.MinkUNet14A(out_channels=3, width=0.125)
  v = model.init(jax.random.key(0), x)
  assert v["params"]["conv0p1s1"]["kernel"].shape == (5, 5, 5, 4, 4)
  assert v["params"]["conv1p1s2"]["kernel"].shape == (2, 2, 2, 4, 4)

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(M.slice_points(out, p2v) ** 2)

  g = jax.jit(jax.grad(loss))(v["params"])
  norms = {"/".join(str(getattr(k, "key", k)) for k in p): float(jnp.abs(a).sum())
           for p, a in jax.tree_util.tree_flatten_with_path(g)[0] if p[-1].key == "kernel"}
  assert all(n > 0 for n in norms.values()), [k for k, n in norms.items() if n == 0]


def test_bottleneck_variant_structure():
  r = np.random.default_rng(2)
  pts = r.uniform(0, 1, (200, 3)).astype(np.float32)
  x, _ = M.tensor_field_quantize(pts, pts, 0.05)
  model = M.MinkUNet50(out_channels=2, width=1 / 16)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  assert shapes["block1_0"]["conv3"]["kernel"].shape == (1, 1, 1, 2, 8)
  assert shapes["block5_0"]["downsample_0"]["kernel"].shape == (1, 1, 1, 16 + 32, 64)
  sd = W.to_minkowski_state_dict(jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, np.float32),
      jax.eval_shape(lambda: model.init(jax.random.key(0), x))))
  assert W.minkowski_config(sd)["block"] == "bottleneck"
  W.minkowski_variables(sd, model)


# --------------------------------------------------------------------------- loader errors
def test_loader_round_trip_and_errors():
  sd = load_torch_checkpoint(DATA / "me_minkunet14a.pth")
  v = W.minkowski_variables(sd)
  back = W.to_minkowski_state_dict(v)
  assert set(back) == set(sd)
  for k in sd:
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  missing = {k: a for k, a in sd.items() if k != "block3.0.conv2.kernel"}
  with pytest.raises(ValueError, match=r"missing.*block3\.0\.conv2\.kernel"):
    W.minkowski_variables(missing)
  with pytest.raises(ValueError, match=r"not .*MinkUNet parameters.*head\.weight"):
    W.minkowski_variables({**sd, "head.weight": np.zeros((3, 3))})
  bad = dict(sd, **{"block2.0.conv1.kernel": np.zeros((27, 5, 8), np.float32)})
  with pytest.raises(ValueError, match=r"block2\.0\.conv1\.kernel"):
    W.minkowski_variables(bad)
  with pytest.raises(ValueError, match="not in MinkUNet"):
    W.minkowski_variables(sd, M.MinkUNet14A(out_channels=6, width=1 / 8, layers=(1,) * 7 + (0,)))
  ts = load_torch_checkpoint(DATA / "spvnas_minkunet.pth")
  with pytest.raises(ValueError, match="version"):
    W.torchsparse_variables(ts, version="3.0")
  with pytest.raises(ValueError, match=r"not in SPVNASMinkUNet.*point_transforms"):
    W.torchsparse_variables(ts, drop=())
  tv = W.torchsparse_variables(ts, version="1.4")
  back = W.to_torchsparse_state_dict(tv)
  for k in back:
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[k], ts[k], err_msg=k)
  assert {k for k in ts if not k.startswith("point_transforms.")} == set(back)
