"""Every case computed by Open3D 0.20 itself (tests/data/golden): outputs, neighbour
counts and gradients, through the pure functions and the Flax layers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv.linen import SparseConv, SparseConvTranspose

from tests.helpers import GOLDEN_DIR, rel_err

# The whole module runs under each backend of tests.helpers.KERNEL_BACKENDS.
pytestmark = pytest.mark.usefixtures("kernel_backend")

CASES = sorted(GOLDEN_DIR.glob("*.npz"))
TOL = 1e-4


def load(path):
  d = dict(np.load(path))
  params = {"kernel": d["kernel"].astype(np.float32)}
  if "bias" in d:
    params["bias"] = d["bias"]
  imp = d.get("out_importance" if d["transpose"] else "inp_importance")
  return d, params, imp


def call(d, params, feats, imp, kernel_map=None):
  fn = sc.sparse_conv_transpose if d["transpose"] else sc.sparse_conv
  key = "out_importance" if d["transpose"] else "inp_importance"
  return fn(params, feats, d["inp_positions"], d["out_positions"], d["voxel_size"],
            offset=d.get("offset"), normalize=bool(d["normalize"]), kernel_map=kernel_map,
            **{key: imp})


def test_all_cases_present():
  assert len(CASES) == 13


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden_outputs_and_gradients(path):
  d, params, imp = load(path)
  out, vjp = jax.vjp(lambda p, x: call(d, p, x, imp), params, d["inp_features"])
  g_params, g_feats = vjp(d["grad_out"])
  assert out.shape == d["expect_out_features"].shape
  assert rel_err(out, d["expect_out_features"]) <= TOL
  assert rel_err(g_feats, d["expect_grad_inp_features"]) <= TOL
  assert rel_err(g_params["kernel"], d["expect_grad_kernel"]) <= TOL
  if "bias" in params:
    assert rel_err(g_params["bias"], d["expect_grad_bias"]) <= TOL


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden_neighbor_counts_with_jitted_map(path):
  d, params, imp = load(path)
  transpose = bool(d["transpose"])
  build = jax.jit(sc.build_kernel_map, static_argnames=("kernel_size", "offset", "transpose"))
  offset = None if "offset" not in d else tuple(d["offset"].tolist())
  km = build(d["inp_positions"], d["out_positions"], d["voxel_size"],
             kernel_size=d["kernel"].shape[:3], offset=offset, transpose=transpose)
  counts = km.input_counts() if transpose else km.neighbor_counts()
  np.testing.assert_array_equal(counts, d["expect_num_neighbors"])
  out = jax.jit(lambda km: call(d, params, d["inp_features"], imp, kernel_map=km))(km)
  assert rel_err(out, d["expect_out_features"]) <= TOL


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden_through_flax_layers(path):
  d, params, imp = load(path)
  cout = d["kernel"].shape[-1]
  layer_cls = SparseConvTranspose if d["transpose"] else SparseConv
  offset = None if "offset" not in d else tuple(d["offset"].tolist())
  layer = layer_cls(filters=cout, kernel_size=d["kernel"].shape[:3], use_bias="bias" in d,
                    normalize=bool(d["normalize"]), offset=offset,
                    in_channels=d["inp_features"].shape[1])
  args = (d["inp_features"], d["inp_positions"], d["out_positions"], d["voxel_size"], imp)
  variables = jax.eval_shape(layer.init, jax.random.key(0), *args)
  assert jax.tree_util.tree_map(np.shape, variables["params"]) == \
      jax.tree_util.tree_map(np.shape, params)
  out = layer.apply({"params": params}, *args)  # Open3D weights load unchanged
  assert rel_err(out, d["expect_out_features"]) <= TOL
