"""Flax NNX layers: the same parameters and results as the Linen layers (and so as the
pure functions), under nnx.jit and nnx.grad, with kernel maps, on SparseTensor levels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_sparseconv as sc
from jax_sparseconv import linen
from jax_sparseconv import nnx as sc_nnx

from tests.helpers import lattice_cloud

PAIRS = [(sc_nnx.SparseConv, linen.SparseConv, "inp_importance"),
         (sc_nnx.SparseConvTranspose, linen.SparseConvTranspose, "out_importance")]


def params_of(layer):
  """The NNX layer's parameters as a Linen ``variables`` dict (same names and layout)."""
  p = {"kernel": layer.kernel[...]}
  if layer.bias is not None:
    p["bias"] = layer.bias[...]
  return {"params": p}


def clouds(rng, n_in=60, n_out=40, cin=3):
  pos_in = lattice_cloud(rng, n_in, 5, 0.2)
  pos_out = lattice_cloud(rng, n_out, 5, 0.2)
  feats = rng.standard_normal((n_in, cin)).astype(np.float32)
  return pos_in, pos_out, feats


@pytest.mark.parametrize("nnx_cls,linen_cls,imp_name", PAIRS)
def test_equals_linen_with_the_same_parameters(rng, nnx_cls, linen_cls, imp_name):
  pos_in, pos_out, feats = clouds(rng)
  imp = rng.uniform(size=len(pos_out) if imp_name == "out_importance" else len(pos_in))
  imp = imp.astype(np.float32)
  kw = dict(kernel_size=(3, 1, 3), normalize=True, activation=jax.nn.relu)
  layer = nnx_cls(3, 5, bias_init=jax.nn.initializers.normal(1.0), rngs=nnx.Rngs(1), **kw)
  ref = linen_cls(filters=5, **kw)
  variables = params_of(layer)
  # the same parameter tree (names, shapes, dtypes) as the Linen layer creates
  expect_tree = jax.eval_shape(ref.init, jax.random.key(0), feats, pos_in, pos_out, 0.2, imp)
  assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), expect_tree) == \
      jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables)
  assert variables["params"]["kernel"].shape == (3, 1, 3, 3, 5)
  y = layer(feats, pos_in, pos_out, 0.2, imp)
  np.testing.assert_array_equal(y, ref.apply(variables, feats, pos_in, pos_out, 0.2, imp))
  # and the other way: the Linen layer's initial parameters loaded into the NNX layer
  lin_vars = ref.init(jax.random.key(3), feats, pos_in, pos_out, 0.2, imp)
  layer.kernel[...] = lin_vars["params"]["kernel"]
  layer.bias[...] = lin_vars["params"]["bias"]
  np.testing.assert_array_equal(layer(feats, pos_in, pos_out, 0.2, imp),
                                ref.apply(lin_vars, feats, pos_in, pos_out, 0.2, imp))
  fn = sc.sparse_conv_transpose if imp_name == "out_importance" else sc.sparse_conv
  np.testing.assert_array_equal(y, fn(variables["params"], feats, pos_in, pos_out, 0.2,
                                      normalize=True, activation=jax.nn.relu,
                                      **{imp_name: imp}))


def test_defaults_match_open3d_and_linen():
  layer = sc_nnx.SparseConv(32, 64, rngs=nnx.Rngs(0))
  k = np.asarray(layer.kernel[...])
  assert k.shape == (3, 3, 3, 32, 64) and k.dtype == np.float32
  assert k.min() >= -0.05 and k.max() <= 0.05 and k.min() < -0.04 and k.max() > 0.04
  np.testing.assert_array_equal(layer.bias[...], 0.0)
  no_bias = sc_nnx.SparseConv(2, 4, use_bias=False, rngs=nnx.Rngs(0))
  assert no_bias.bias is None
  assert set(nnx.state(no_bias, nnx.Param).keys()) == {"kernel"}
  assert sc_nnx.SparseConvTranspose(2, 4, kernel_size=2, rngs=nnx.Rngs(0)).kernel.shape == \
      (2, 2, 2, 2, 4)
  assert sc_nnx.DownConv(2, 4, rngs=nnx.Rngs(0)).kernel.shape == (2, 2, 2, 2, 4)
  assert sc_nnx.UpConv(2, 4, rngs=nnx.Rngs(0)).kernel.shape == (2, 2, 2, 2, 4)
  assert sc_nnx.SubMConv(2, 4, rngs=nnx.Rngs(0)).kernel.shape == (3, 3, 3, 2, 4)


def test_in_channels_checked():
  pos = lattice_cloud(np.random.default_rng(0), 10, 3, 1.0)
  layer = sc_nnx.SparseConv(8, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"in_channels=8 but feats has shape \(10, 3\)"):
    layer(jnp.ones((10, 3)), pos, pos, 1.0)
  t = sc.SparseTensor.from_voxels(pos, jnp.ones((10, 3)), 1.0)
  with pytest.raises(ValueError, match="SubMConv: in_channels=8"):
    sc_nnx.SubMConv(8, 4, rngs=nnx.Rngs(0))(t)


@pytest.mark.parametrize("nnx_cls,linen_cls,imp_name", PAIRS)
def test_nnx_jit_grad_and_kernel_map(rng, nnx_cls, linen_cls, imp_name):
  pos_in, pos_out, feats = clouds(rng)
  transpose = imp_name == "out_importance"
  layer = nnx_cls(3, 4, bias_init=jax.nn.initializers.normal(1.0), rngs=nnx.Rngs(2))
  ref = linen_cls(filters=4)
  variables = params_of(layer)
  ct = jnp.asarray(rng.standard_normal((len(pos_out), 4)), jnp.float32)
  km = jax.jit(sc.build_kernel_map, static_argnames=("kernel_size", "transpose"))(
      pos_in, pos_out, 0.2, kernel_size=3, transpose=transpose)

  @nnx.jit
  def forward(layer, feats, km):
    return layer(feats, pos_in, pos_out, 0.2, kernel_map=km)

  expect = ref.apply(variables, feats, pos_in, pos_out, 0.2)
  np.testing.assert_allclose(forward(layer, feats, km), expect, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(forward(layer, feats, None), expect, rtol=1e-6, atol=1e-6)

  def loss(layer, feats):
    return jnp.sum(layer(feats, pos_in, pos_out, 0.2, kernel_map=km) * ct)

  grads, g_feats = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, feats)
  e_params, e_feats = jax.grad(
      lambda v, x: jnp.sum(ref.apply(v, x, pos_in, pos_out, 0.2) * ct), argnums=(0, 1))(
          variables, feats)
  np.testing.assert_allclose(grads["kernel"][...], e_params["params"]["kernel"], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(grads["bias"][...], e_params["params"]["bias"], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(g_feats, e_feats, rtol=1e-5, atol=1e-5)


def test_dtype_bfloat16():
  rng = np.random.default_rng(0)
  pos = lattice_cloud(rng, 50, 4, 1.0)
  feats = jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)
  layer = sc_nnx.SparseConv(4, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer.kernel[...].dtype == jnp.float32  # param_dtype
  y = layer(feats, pos, pos, 1.0)
  assert y.dtype == jnp.bfloat16
  y32 = linen.SparseConv(filters=6).apply(params_of(layer), feats, pos, pos, 1.0)
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.02)


def levels(rng):
  pts = lattice_cloud(rng, 120, 8, 0.1)
  fine = sc.SparseTensor.from_voxels(pts, rng.standard_normal((120, 4)).astype(np.float32), 0.1)
  fine = fine.with_kernel_map(3)
  return fine, fine.down().with_kernel_map(3)


class UNetNNX(nnx.Module):
  """A two-level sparse U-Net: the README's Linen example, in NNX."""

  def __init__(self, cin, num_classes, *, rngs):
    self.sub1 = sc_nnx.SubMConv(cin, 8, activation=jax.nn.relu, rngs=rngs)
    self.down = sc_nnx.DownConv(8, 16, activation=jax.nn.relu, rngs=rngs)
    self.sub2 = sc_nnx.SubMConv(16, 16, activation=jax.nn.relu, rngs=rngs)
    self.up = sc_nnx.UpConv(16, 8, activation=jax.nn.relu, rngs=rngs)
    self.head = sc_nnx.SubMConv(16, num_classes, kernel_size=1, rngs=rngs)

  def __call__(self, fine, coarse):
    x = self.sub1(fine)
    c = self.sub2(self.down(x, coarse))
    u = self.up(c, x)
    return self.head(x.replace(feats=jnp.concatenate([x.feats, u.feats], -1))).feats


class UNetLinen(nn.Module):
  num_classes: int = 2

  @nn.compact
  def __call__(self, fine, coarse):
    x = linen.SubMConv(8, activation=jax.nn.relu, name="sub1")(fine)
    c = linen.DownConv(16, activation=jax.nn.relu, name="down")(x, coarse)
    c = linen.SubMConv(16, activation=jax.nn.relu, name="sub2")(c)
    u = linen.UpConv(8, activation=jax.nn.relu, name="up")(c, x)
    x = x.replace(feats=jnp.concatenate([x.feats, u.feats], -1))
    return linen.SubMConv(self.num_classes, kernel_size=1, name="head")(x).feats


def test_level_layers_equal_linen_and_train(rng):
  fine, coarse = levels(rng)
  # an 'rbg' key: threefry's eager compile for each of the ten parameter shapes costs
  # seconds on a small CPU; the initialiser's values do not matter here
  model = UNetNNX(4, 2, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  variables = {"params": {name: params_of(getattr(model, name))["params"]
                          for name in ("sub1", "down", "sub2", "up", "head")}}
  ref = UNetLinen()
  assert jax.tree_util.tree_map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(0), fine,
                                                          coarse)) == \
      jax.tree_util.tree_map(jnp.shape, variables)
  expect = ref.apply(variables, fine, coarse)
  np.testing.assert_allclose(model(fine, coarse), expect, rtol=1e-6, atol=1e-6)

  labels = (fine.positions[:, 2] > 0.4).astype(jnp.int32)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, fine, coarse):
    def loss_fn(model):
      logits = model(fine, coarse)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, fine, coarse)) for _ in range(5)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
