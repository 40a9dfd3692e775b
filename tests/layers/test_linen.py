"""Flax Linen layers: parameters, defaults, equivalence with the pure functions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv.linen import SparseConv, SparseConvTranspose

from tests.helpers import lattice_cloud

# The whole module runs under each backend of tests.helpers.KERNEL_BACKENDS.
pytestmark = pytest.mark.usefixtures("kernel_backend")


@pytest.mark.parametrize("layer_cls,fn", [(SparseConv, sc.sparse_conv),
                                          (SparseConvTranspose, sc.sparse_conv_transpose)])
def test_layer_equals_pure_function(rng, layer_cls, fn):
  pos_in = lattice_cloud(rng, 60, 5, 0.2)
  pos_out = lattice_cloud(rng, 40, 5, 0.2)
  feats = rng.standard_normal((60, 3)).astype(np.float32)
  imp = rng.uniform(size=40 if layer_cls is SparseConvTranspose else 60).astype(np.float32)
  layer = layer_cls(filters=5, kernel_size=(3, 1, 3), normalize=True, activation=nn.relu,
                    bias_init=nn.initializers.normal(1.0))
  variables = layer.init(jax.random.key(1), feats, pos_in, pos_out, 0.2, imp)
  p = variables["params"]
  assert p["kernel"].shape == (3, 1, 3, 3, 5) and p["bias"].shape == (5,)
  key = "out_importance" if layer_cls is SparseConvTranspose else "inp_importance"
  expect = fn(p, feats, pos_in, pos_out, 0.2, normalize=True, activation=nn.relu, **{key: imp})
  np.testing.assert_array_equal(layer.apply(variables, feats, pos_in, pos_out, 0.2, imp), expect)


def test_defaults_match_open3d():
  pos = lattice_cloud(np.random.default_rng(0), 30, 4, 1.0)
  layer = SparseConv(filters=64, kernel_size=3)
  p = layer.init(jax.random.key(0), jnp.ones((30, 32)), pos, pos, 1.0)["params"]
  k = np.asarray(p["kernel"])
  assert k.dtype == np.float32 and k.min() >= -0.05 and k.max() <= 0.05
  assert k.min() < -0.04 and k.max() > 0.04  # uniform over the whole [-0.05, 0.05]
  np.testing.assert_array_equal(p["bias"], 0.0)
  p = SparseConv(filters=4, use_bias=False).init(jax.random.key(0), jnp.ones((30, 2)), pos, pos,
                                                 1.0)["params"]
  assert set(p) == {"kernel"}


def test_in_channels_checked():
  pos = lattice_cloud(np.random.default_rng(0), 10, 3, 1.0)
  layer = SparseConv(filters=4, in_channels=8)
  with pytest.raises(ValueError, match="in_channels=8"):
    layer.init(jax.random.key(0), jnp.ones((10, 3)), pos, pos, 1.0)


def test_dtype_bfloat16_and_kernel_map_reuse(rng):
  pos = lattice_cloud(rng, 50, 4, 1.0)
  feats = jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)
  km = jax.jit(lambda p: sc.build_kernel_map(p, p, 1.0, 3))(pos)
  layer = SparseConv(filters=6, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), feats, pos, pos, 1.0, kernel_map=km)
  assert variables["params"]["kernel"].dtype == jnp.float32  # param_dtype
  y = jax.jit(layer.apply)(variables, feats, pos, pos, 1.0, None, km)
  assert y.dtype == jnp.bfloat16
  y32 = SparseConv(filters=6).apply(variables, feats, pos, pos, 1.0)
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.02)
