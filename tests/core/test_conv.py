"""sparse_conv / sparse_conv_transpose against slow references on fresh random inputs:
a dense lax.conv_general_dilated on the voxel grid and a NumPy loop over Open3D's rules.
Also padding + vmap, packed batches, dtypes, empty sets and the chunked path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv import reference

from tests.helpers import lattice_cloud, rel_err, small_chunks

# The whole module runs under each backend of tests.helpers.KERNEL_BACKENDS.
pytestmark = pytest.mark.usefixtures("kernel_backend")


def random_case(rng, kernel_size, cin=3, cout=4, n_in=120, n_out=80, extent=7):
  ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
  vs = float(rng.choice([0.1, 0.25, 1.0]))
  centres = bool(rng.integers(2))
  in_pos = lattice_cloud(rng, n_in, extent, vs, centres)
  out_pos = lattice_cloud(rng, n_out, extent, vs, centres)
  kernel = rng.standard_normal(ks + (cin, cout)).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  return vs, in_pos, out_pos, kernel, bias


KERNELS = [1, 2, 3, 4, 5, (3, 1, 3), (2, 3, 1), (1, 4, 5), (5, 2, 3)]


@pytest.mark.parametrize("kernel_size", KERNELS, ids=str)
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_matches_dense_conv(rng, kernel_size, transpose):
  vs, in_pos, out_pos, kernel, bias = random_case(rng, kernel_size)
  normalize = bool(rng.integers(2))
  feats = rng.standard_normal((len(in_pos), 3)).astype(np.float32)
  imp = rng.uniform(0.2, 2.0, len(out_pos) if transpose else len(in_pos)).astype(np.float32)
  params = {"kernel": kernel, "bias": bias}
  if transpose:
    got = sc.sparse_conv_transpose(params, feats, in_pos, out_pos, vs, normalize=normalize,
                                   out_importance=imp)
  else:
    got = sc.sparse_conv(params, feats, in_pos, out_pos, vs, normalize=normalize,
                         inp_importance=imp)
  expect = reference.dense_sparse_conv(kernel, bias, feats, in_pos, out_pos, vs,
                                       normalize=normalize, importance=imp, transpose=transpose)
  assert rel_err(got, expect) < 1e-5


OFFSETS = [(1.0, 0.0, -1.0), (0.3, -0.4, 0.5), (-0.5, -0.5, -0.5), (0.25, 0.0, -0.75)]


@pytest.mark.parametrize("offset", OFFSETS, ids=str)
@pytest.mark.parametrize("kernel_size", [2, 3, (3, 2, 1)], ids=str)
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_matches_numpy_loop_with_offsets(rng, kernel_size, offset, transpose):
  vs, in_pos, out_pos, kernel, bias = random_case(rng, kernel_size, n_in=90, n_out=60, extent=6)
  feats = rng.standard_normal((len(in_pos), 3)).astype(np.float32)
  imp = rng.uniform(0.2, 2.0, len(out_pos) if transpose else len(in_pos)).astype(np.float32)
  fn = sc.sparse_conv_transpose if transpose else sc.sparse_conv
  key = "out_importance" if transpose else "inp_importance"
  got = fn({"kernel": kernel, "bias": bias}, feats, in_pos, out_pos, vs, offset=offset,
           normalize=True, **{key: imp})
  expect = reference.loop_sparse_conv(kernel, bias, feats, in_pos, out_pos, vs, offset=offset,
                                      normalize=True, importance=imp, transpose=transpose)
  assert rel_err(got, expect) < 1e-5


def test_chunked_path_matches(rng, monkeypatch):
  vs, in_pos, out_pos, kernel, bias = random_case(rng, 3, n_in=300, n_out=250, extent=9)
  feats = rng.standard_normal((len(in_pos), 3)).astype(np.float32)
  params = {"kernel": kernel, "bias": bias}
  whole = sc.sparse_conv(params, feats, in_pos, out_pos, vs)
  with small_chunks(monkeypatch, 64):  # 250 outputs -> 4 chunks, the last one padded
    fwd, vjp = jax.vjp(lambda p, x: sc.sparse_conv(p, x, in_pos, out_pos, vs), params, feats)
    g = vjp(jnp.ones_like(fwd))
  _, vjp_whole = jax.vjp(lambda p, x: sc.sparse_conv(p, x, in_pos, out_pos, vs), params, feats)
  g_whole = vjp_whole(jnp.ones_like(fwd))
  assert rel_err(fwd, whole) < 1e-6
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_whole)):
    assert rel_err(a, b) < 1e-5


def test_isolated_outputs_get_bias(rng):
  vs, in_pos, _, kernel, bias = random_case(rng, 3)
  far = in_pos[:5] + np.float32(100 * vs)
  feats = rng.standard_normal((len(in_pos), 3)).astype(np.float32)
  y = sc.sparse_conv({"kernel": kernel, "bias": bias}, feats, in_pos, far, vs, normalize=True)
  np.testing.assert_allclose(y, np.broadcast_to(bias, y.shape), rtol=1e-6)


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_empty_sets(rng, transpose):
  fn = sc.sparse_conv_transpose if transpose else sc.sparse_conv
  params = {"kernel": jnp.ones((3, 3, 3, 2, 5)), "bias": jnp.arange(5.0)}
  pos = lattice_cloud(rng, 10, 4, 1.0)
  y = fn(params, jnp.zeros((0, 2)), jnp.zeros((0, 3)), pos, 1.0, normalize=True)
  np.testing.assert_array_equal(y, np.broadcast_to(np.arange(5.0), (10, 5)))
  y = fn(params, jnp.ones((10, 2)), pos, jnp.zeros((0, 3)), 1.0)
  assert y.shape == (0, 5)
  y = fn(params, jnp.zeros((0, 2)), jnp.zeros((0, 3)), jnp.zeros((0, 3)), 1.0)
  assert y.shape == (0, 5)


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_vmap_over_padded_batch_equals_loop(rng, transpose):
  fn = sc.sparse_conv_transpose if transpose else sc.sparse_conv
  cap_in, cap_out, batch = 70, 60, 3
  kernel = rng.standard_normal((3, 3, 3, 2, 3)).astype(np.float32)
  params = {"kernel": kernel, "bias": rng.standard_normal(3).astype(np.float32)}
  n_in = rng.integers(1, cap_in, batch)
  n_out = rng.integers(1, cap_out, batch)
  P_in = np.zeros((batch, cap_in, 3), np.float32)
  P_out = np.full((batch, cap_out, 3), np.nan, np.float32)  # garbage in padding is ignored
  F = rng.standard_normal((batch, cap_in, 2)).astype(np.float32)
  for b in range(batch):
    P_in[b, :n_in[b]] = lattice_cloud(rng, n_in[b], 6, 1.0)
    P_out[b, :n_out[b]] = lattice_cloud(rng, n_out[b], 6, 1.0)

  def one(f, pi, po, ni, no):
    km = sc.build_kernel_map(pi, po, 1.0, 3, transpose=transpose, in_valid=ni, out_valid=no)
    return fn(params, f, pi, po, 1.0, normalize=True, kernel_map=km)

  got = jax.jit(jax.vmap(one))(F, P_in, P_out, n_in, n_out)
  for b in range(batch):
    ref = fn(params, F[b, :n_in[b]], P_in[b, :n_in[b]], P_out[b, :n_out[b]], 1.0, normalize=True)
    np.testing.assert_allclose(got[b, :n_out[b]], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[b, n_out[b]:], 0.0)  # padded outputs are zero


def test_packed_batch_equals_separate_calls(rng):
  clouds = [lattice_cloud(rng, int(n), 5, 0.5) for n in rng.integers(20, 60, 3)]
  feats = [rng.standard_normal((len(c), 2)).astype(np.float32) for c in clouds]
  params = {"kernel": rng.standard_normal((2, 2, 2, 2, 3)).astype(np.float32)}
  pos = np.concatenate(clouds)
  batch = np.concatenate([np.full(len(c), i) for i, c in enumerate(clouds)])
  km = sc.build_kernel_map(pos, pos, 0.5, 2, in_batch=batch, out_batch=batch)
  got = sc.sparse_conv(params, np.concatenate(feats), pos, pos, 0.5, kernel_map=km)
  expect = np.concatenate([sc.sparse_conv(params, f, c, c, 0.5) for f, c in zip(feats, clouds)])
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_accumulates_in_float32(rng, dtype):
  vs, in_pos, out_pos, kernel, bias = random_case(rng, 3, cin=16, cout=8, n_in=300, extent=8)
  feats = rng.standard_normal((len(in_pos), 16)).astype(np.float32)
  params_h = {"kernel": jnp.asarray(kernel, dtype), "bias": jnp.asarray(bias, dtype)}
  y = sc.sparse_conv(params_h, jnp.asarray(feats, dtype), in_pos, out_pos, vs)
  assert y.dtype == dtype
  # the exact result for the rounded inputs, in float64
  exact = reference.loop_sparse_conv(np.asarray(params_h["kernel"], np.float64), np.asarray(
      params_h["bias"], np.float64), np.asarray(jnp.asarray(feats, dtype), np.float64),
      in_pos, out_pos, vs)
  eps = float(jnp.finfo(dtype).eps)
  # float32 accumulation: the error is one final rounding to the half type, not ~sqrt(K)
  assert rel_err(y, exact) < 2 * eps
  # mixed: half features with a float32 kernel give float32 results
  assert sc.sparse_conv({"kernel": kernel}, jnp.asarray(feats, dtype), in_pos, out_pos,
                        vs).dtype == jnp.float32


def test_float64_with_x64(rng):
  from tests.helpers import x64
  vs, in_pos, out_pos, kernel, bias = random_case(rng, 3)
  feats = rng.standard_normal((len(in_pos), 3))
  with x64():
    y = sc.sparse_conv({"kernel": kernel.astype(np.float64), "bias": bias.astype(np.float64)},
                       feats, in_pos.astype(np.float64), out_pos.astype(np.float64), vs)
    assert y.dtype == jnp.float64
    expect = reference.loop_sparse_conv(kernel, bias, feats, in_pos, out_pos, vs)
    assert rel_err(y, expect) < 1e-12


def test_kernel_map_reuse_and_activation(rng):
  vs, in_pos, out_pos, kernel, bias = random_case(rng, 3)
  feats = rng.standard_normal((len(in_pos), 3)).astype(np.float32)
  km = sc.build_kernel_map(in_pos, out_pos, vs, 3)
  params = {"kernel": kernel, "bias": bias}
  a = sc.sparse_conv(params, feats, in_pos, out_pos, vs, kernel_map=km, activation=jax.nn.relu)
  b = jax.nn.relu(sc.sparse_conv(params, feats, in_pos, out_pos, vs))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(jnp.min(a)) >= 0
