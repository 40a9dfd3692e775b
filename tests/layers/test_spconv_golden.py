"""spconv's own outputs (tests/data/spconv, made by spconv 2.3.8: see its README) through the
spconv-shaped layers on integer levels: output sets exact, features and every gradient
to float32 rounding, on every kernel backend.

Each case gives spconv's inputs ``indices (N, 4) [b, d0, d1, d2]``, ``features``,
``spatial_shape``, the weights in spconv's layout ``(Cout, k0, k1, k2, Cin)`` and spconv's
outputs (rows sorted) and gradients (of ``sum(out * grad_out)``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv import linen as scn
from tests.helpers import DATA_DIR, rel_err

SPCONV_DIR = DATA_DIR / "spconv"
BACKENDS = ["jnp", "auto", "host"]
TOL = 2e-5


def _load(name):
  with np.load(SPCONV_DIR / f"{name}.npz") as z:
    case = {k: z[k] for k in z.files}
  case["config"] = json.loads(str(case["config"]))
  return case


def _cases(*ops):
  return sorted(p.stem for p in SPCONV_DIR.glob("*.npz") if str(_load(p.stem)["op"]) in ops)


def _level(case, feats=None):
  return sc.SparseTensor.from_indices(
      jnp.asarray(case["indices"]), jnp.asarray(case["features"] if feats is None else feats),
      tuple(int(s) for s in case["spatial_shape"]), int(case["batch_size"]),
      axis_order=str(case["axis_order"]))


def kernel_from_spconv(weight):
  """spconv 2.x's ``(Cout, k0, k1, k2, Cin)`` as this library's ``(k0, k1, k2, Cin, Cout)``;
  kernel volume 1 as spconv computes it (its 1x1 path reads the memory as ``(Cin, Cout)``)."""
  weight = np.asarray(weight)
  cout, *ks, cin = weight.shape
  if np.prod(ks) == 1:
    return weight.reshape(cin, cout).reshape(1, 1, 1, cin, cout)
  return weight.transpose(1, 2, 3, 4, 0)


def weight_grad_to_spconv(grad, cout, ks, cin):
  """The inverse of :func:`kernel_from_spconv` (for the gradients)."""
  grad = np.asarray(grad)
  if np.prod(ks) == 1:
    return grad.reshape(cin, cout).reshape(cout, *ks, cin)
  return grad.transpose(4, 0, 1, 2, 3)


def _sorted_rows(t):
  """This level's valid rows, in spconv's sorted order, and their indices."""
  idx = np.asarray(t.indices())
  valid = np.asarray(t.valid)
  rows = np.nonzero(valid)[0]
  order = np.lexsort(idx[rows].T[::-1])
  return rows[order], idx[rows[order]]


def _matched(t, ref_indices):
  """Our rows in the order of spconv's (sorted) output rows; the sets must be equal."""
  rows, idx = _sorted_rows(t)
  np.testing.assert_array_equal(idx, ref_indices)
  return rows


def _spread(values, rows, n):
  """``values`` (one per reference row) at our rows ``rows`` of an ``n``-row level."""
  out = np.zeros((n, *values.shape[1:]), values.dtype)
  out[rows] = values
  return out


def _check(name, ours, ref, tol=TOL):
  err = rel_err(ours, ref)
  assert err <= tol, f"{name}: relative error {err:.2e}"


def _conv_layer(case, cls):
  cfg = case["config"]
  w = case["weight"]
  kw = dict(kernel_size=tuple(int(k) for k in case["kernel_size"]),
            dilation=tuple(int(d) for d in case["dilation"]), bias="bias" in case)
  if cls is not scn.SparseInverseConv3d:
    kw.update(stride=tuple(int(s) for s in case["stride"]),
              padding=tuple(int(p) for p in case["padding"]))
  return cls(int(w.shape[-1]), int(w.shape[0]), indice_key=cfg.get("indice_key"), **kw)


def _params(case, prefix=""):
  p = {"kernel": jnp.asarray(kernel_from_spconv(case[prefix + "weight"]))}
  if prefix + "bias" in case:
    p["bias"] = jnp.asarray(case[prefix + "bias"])
  return p


_CLASSES = {"SubMConv3d": scn.SubMConv3d, "SparseConv3d": scn.SparseConv3d,
            "SparseConvTranspose3d": scn.SparseConvTranspose3d}


#: Every case runs on the default backend; these also on the jnp path and the host build of
#: the CUDA kernels (one per rule: the backends share the maps, only the products differ).
OTHER_BACKEND_CASES = ("subm_k3", "subm_k1", "conv_k3s2p1_odd", "conv_k311_s211", "tconv_k3s2p1",
                       "inv_k2s2_odd", "chain_encdec", "block_conv_bn_relu")


def _with_backends(names):
  return [pytest.param(n, b, id=f"{n}-{b}") for n in names for b in BACKENDS
          if b == "auto" or n in OTHER_BACKEND_CASES]


@pytest.fixture
def backend(request):
  with sc.kernel_backend(request.param):
    yield request.param


@pytest.mark.parametrize("name,backend", _with_backends(
    _cases("SubMConv3d", "SparseConv3d", "SparseConvTranspose3d")), indirect=["backend"])
def test_conv_forward_and_gradients(name, backend):
  case = _load(name)
  layer = _conv_layer(case, _CLASSES[str(case["op"])])
  t = _level(case)
  out = layer.apply({"params": _params(case)}, t)
  rows = _matched(out, case["out_indices"])
  assert out.spatial_shape == tuple(int(s) for s in case["out_spatial_shape"])
  _check("features", np.asarray(out.feats)[rows], case["out_features"])
  assert not np.any(np.asarray(out.feats)[~np.asarray(out.valid)]), "padding rows not zero"

  g_out = jnp.asarray(_spread(case["grad_out"], rows, out.feats.shape[0]))

  def loss(feats, params):
    return jnp.sum(layer.apply({"params": params}, t.replace(feats=feats)).feats * g_out)

  g_feats, g_params = jax.grad(loss, argnums=(0, 1))(t.feats, _params(case))
  w = case["weight"]
  _check("grad_features", g_feats, case["grad_features"])
  _check("grad_weight", weight_grad_to_spconv(g_params["kernel"], w.shape[0], w.shape[1:4],
                                              w.shape[4]), case["grad_weight"])
  _check("grad_bias", g_params["bias"], case["grad_bias"])


@pytest.mark.parametrize("name,backend", _with_backends(_cases("SparseInverseConv3d")),
                         indirect=["backend"])
def test_inverse_conv(name, backend):
  case = _load(name)
  fwd_case = {k[4:]: v for k, v in case.items() if k.startswith("fwd_")}
  fwd_case["config"] = case["config"]["fwd"]
  fwd = _conv_layer(fwd_case, scn.SparseConv3d)
  inv = scn.SparseInverseConv3d(int(case["weight"].shape[-1]), int(case["weight"].shape[0]),
                                tuple(int(k) for k in case["kernel_size"]), indice_key="k")
  t = _level(case)
  fwd_params, inv_params = _params(case, "fwd_"), _params(case)

  def net(feats, fwd_params, inv_params):
    mid = fwd.apply({"params": fwd_params}, t.replace(feats=feats))
    return mid, inv.apply({"params": inv_params}, mid)

  mid, out = net(t.feats, fwd_params, inv_params)
  mid_rows = _matched(mid, case["fwd_out_indices"])
  _check("forward features", np.asarray(mid.feats)[mid_rows], case["fwd_out_features"])
  # The inverse returns the forward conv's input level, rows in their order.
  np.testing.assert_array_equal(np.asarray(out.indices()), np.asarray(t.indices()))
  rows = _matched(out, case["out_indices"])
  _check("features", np.asarray(out.feats)[rows], case["out_features"])
  # Rows the forward conv dropped get exactly the bias.
  dropped = case["dropped_indices"]
  if len(dropped):
    idx = np.asarray(out.indices())
    hit = np.nonzero((idx[:, None, :] == dropped[None]).all(-1).any(1))[0]
    assert len(hit) == len(dropped)
    np.testing.assert_array_equal(np.asarray(out.feats)[hit],
                                  np.broadcast_to(case["bias"], (len(hit), case["bias"].size)))

  g_out = jnp.asarray(_spread(case["grad_out"], rows, out.feats.shape[0]))
  grads = jax.grad(lambda *a: jnp.sum(net(*a)[1].feats * g_out), argnums=(0, 1, 2))(
      t.feats, fwd_params, inv_params)
  _check("grad_features", grads[0], case["grad_features"])
  for prefix, g in (("fwd_", grads[1]), ("", grads[2])):
    w = case[prefix + "weight"]
    _check(prefix + "grad_weight", weight_grad_to_spconv(g["kernel"], w.shape[0], w.shape[1:4],
                                                         w.shape[4]), case[prefix + "grad_weight"])
    _check(prefix + "grad_bias", g["bias"], case[prefix + "grad_bias"])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_chain_encoder_decoder(backend):
  """SubM -> ReLU -> SparseConv3d("down1") -> ReLU -> SubM -> ReLU -> SparseInverseConv3d."""
  case = _load("chain_encdec")
  stages = case["config"]["stages"]
  layers, params = [], []
  for i, st in enumerate(stages, 1):
    sub = {k[len(f"stage{i}_"):]: v for k, v in case.items() if k.startswith(f"stage{i}_")}
    sub["config"] = st
    cls = {"SubMConv3d": scn.SubMConv3d, "SparseConv3d": scn.SparseConv3d,
           "SparseInverseConv3d": scn.SparseInverseConv3d}[st["class"]]
    layers.append(_conv_layer(sub, cls))
    params.append(_params(sub))
  t = _level(case)

  def net(feats, params):
    x, outs = t.replace(feats=feats), []
    for i, (layer, p) in enumerate(zip(layers, params)):
      x = layer.apply({"params": p}, x)
      if i < 3:
        x = x.replace(feats=jax.nn.relu(x.feats))
      outs.append(x)
    return outs

  outs = net(t.feats, params)
  for i, x in enumerate(outs, 1):
    rows = _matched(x, case[f"stage{i}_indices"])
    _check(f"stage {i}", np.asarray(x.feats)[rows], case[f"stage{i}_features"])
  rows = _matched(outs[-1], case["out_indices"])
  g_out = jnp.asarray(_spread(case["grad_out"], rows, outs[-1].feats.shape[0]))
  g_feats, g_params = jax.grad(lambda f, p: jnp.sum(net(f, p)[-1].feats * g_out),
                               argnums=(0, 1))(t.feats, params)
  _check("grad_features", g_feats, case["grad_features"])
  for i, g in enumerate(g_params, 1):
    w = case[f"stage{i}_weight"]
    _check(f"stage {i} grad_weight", weight_grad_to_spconv(g["kernel"], w.shape[0], w.shape[1:4],
                                                           w.shape[4]),
           case[f"stage{i}_grad_weight"])
    _check(f"stage {i} grad_bias", g["bias"], case[f"stage{i}_grad_bias"])


@pytest.mark.parametrize("name,backend", _with_backends(_cases("post_act_block")),
                         indirect=["backend"])
def test_post_act_block(name, backend):
  """OpenPCDet's conv -> BatchNorm1d (eval) -> ReLU block."""
  case = _load(name)
  cls = scn.SparseConv3d if case["config"]["conv"] == "SparseConv3d" else scn.SubMConv3d
  layer = _conv_layer(case, cls)
  t = _level(case)

  def net(feats, kernel, scale, shift):
    y = layer.apply({"params": {"kernel": kernel}}, t.replace(feats=feats))
    z = (y.feats - case["bn_running_mean"]) / jnp.sqrt(case["bn_running_var"] + case["bn_eps"])
    return y.replace(feats=jnp.where(y.valid[:, None], jax.nn.relu(z * scale + shift), 0))

  args = (t.feats, jnp.asarray(kernel_from_spconv(case["weight"])),
          jnp.asarray(case["bn_weight"]), jnp.asarray(case["bn_bias"]))
  out = net(*args)
  rows = _matched(out, case["out_indices"])
  _check("features", np.asarray(out.feats)[rows], case["out_features"])
  g_out = jnp.asarray(_spread(case["grad_out"], rows, out.feats.shape[0]))
  grads = jax.grad(lambda *a: jnp.sum(net(*a).feats * g_out), argnums=(0, 1, 2, 3))(*args)
  w = case["weight"]
  _check("grad_features", grads[0], case["grad_features"])
  _check("grad_weight", weight_grad_to_spconv(grads[1], w.shape[0], w.shape[1:4], w.shape[4]),
         case["grad_weight"])
  _check("grad_bn_weight", grads[2], case["grad_bn_weight"])
  _check("grad_bn_bias", grads[3], case["grad_bn_bias"])


@pytest.mark.parametrize("name", _cases("SparseMaxPool3d"))
def test_max_pool(name):
  case = _load(name)
  layer = scn.SparseMaxPool3d(tuple(int(k) for k in case["kernel_size"]),
                              tuple(int(s) for s in case["stride"]),
                              tuple(int(p) for p in case["padding"]),
                              tuple(int(d) for d in case["dilation"]))
  t = _level(case)
  out = layer(t)
  rows = _matched(out, case["out_indices"])
  ours = np.asarray(out.feats)[rows]
  ref = case["out_features"]
  if bool(case["spconv_cpu_clamp_bug"]):
    # spconv's Native pool returns max(0, max): ours keeps the negative maxima, and agrees
    # with it exactly where the maximum is not negative.
    np.testing.assert_array_equal(np.maximum(ours, 0), ref)
    assert np.sum(ours < 0) > 0 and np.all(ours[ref == 0] <= 0)
    return
  np.testing.assert_array_equal(ours, ref)
  g_out = jnp.asarray(_spread(case["grad_out"], rows, out.feats.shape[0]))
  g = jax.grad(lambda f: jnp.sum(layer(t.replace(feats=f)).feats * g_out))(t.feats)
  _check("grad_features", g, case["grad_features"])


@pytest.mark.parametrize("name", ["dense", "dense_channels_last"])
def test_dense(name):
  case = _load(name)
  first = case["config"]["channels_first"]
  t = _level(case)
  np.testing.assert_array_equal(np.asarray(t.dense(channels_first=first)), case["dense"])
  g = jax.grad(lambda f: jnp.sum(t.replace(feats=f).dense(channels_first=first) *
                                 case["grad_out"]))(t.feats)
  np.testing.assert_array_equal(np.asarray(g), case["grad_features"])


def test_axis_order_names_the_columns_only():
  """spconv layers act on the index columns ``d0, d1, d2`` whatever they are called:
  ``axis_order="xyz"`` gives spconv's outputs too (it changes positions, not indices)."""
  case = _load("conv_k3s2p1_odd")
  layer = _conv_layer(case, scn.SparseConv3d)
  t = sc.SparseTensor.from_indices(jnp.asarray(case["indices"]), jnp.asarray(case["features"]),
                                   tuple(int(s) for s in case["spatial_shape"]), 2,
                                   axis_order="xyz")
  out = layer.apply({"params": _params(case)}, t)
  rows = _matched(out, case["out_indices"])
  _check("features", np.asarray(out.feats)[rows], case["out_features"])


def test_nnx_layers_give_spconv_outputs():
  """The NNX spconv layers, given spconv's weights, reproduce the encoder-decoder chain."""
  from flax import nnx

  from jax_sparseconv import nnx as snnx
  case = _load("chain_encdec")
  x = _level(case)
  for i, st in enumerate(case["config"]["stages"], 1):
    cls = getattr(snnx, st["class"])
    w = case[f"stage{i}_weight"]
    kw = {} if cls is snnx.SparseInverseConv3d else dict(
        stride=tuple(int(s) for s in case[f"stage{i}_stride"]),
        padding=tuple(int(p) for p in case[f"stage{i}_padding"]))
    layer = cls(int(w.shape[-1]), int(w.shape[0]),
                tuple(int(k) for k in case[f"stage{i}_kernel_size"]),
                dilation=tuple(int(d) for d in case[f"stage{i}_dilation"]),
                indice_key=st.get("indice_key"), rngs=nnx.Rngs(0), **kw)
    layer.kernel = nnx.Param(jnp.asarray(kernel_from_spconv(w)))
    layer.bias = nnx.Param(jnp.asarray(case[f"stage{i}_bias"]))
    x = layer(x)
    if i < 4:
      x = x.replace(feats=jax.nn.relu(x.feats))
    rows = _matched(x, case[f"stage{i}_indices"])
    _check(f"stage {i}", np.asarray(x.feats)[rows], case[f"stage{i}_features"])
