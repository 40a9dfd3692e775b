"""Gradients in float64 with jax.test_util.check_grads: reverse and forward mode, order 2,
with respect to features, kernel, bias and the importance arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_sparseconv as sc
from jax_sparseconv import reference

from tests.helpers import lattice_cloud, rel_err, x64

# The whole module runs under each backend of tests.helpers.KERNEL_BACKENDS.
pytestmark = pytest.mark.usefixtures("kernel_backend")


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
@pytest.mark.parametrize("kernel_size", [2, (3, 1, 3)], ids=str)
def test_check_grads_float64_order2(rng, transpose, kernel_size):
  ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
  with x64():
    in_pos = lattice_cloud(rng, 40, 4, 0.5).astype(np.float64)
    out_pos = lattice_cloud(rng, 30, 4, 0.5).astype(np.float64)
    kernel = rng.standard_normal(ks + (2, 3))
    bias = rng.standard_normal(3)
    feats = rng.standard_normal((40, 2))
    imp = rng.uniform(0.5, 1.5, 30 if transpose else 40)
    fn = sc.sparse_conv_transpose if transpose else sc.sparse_conv
    key = "out_importance" if transpose else "inp_importance"
    km = sc.build_kernel_map(in_pos, out_pos, 0.5, ks, transpose=transpose)

    def f(kernel, bias, feats, imp):
      return fn({"kernel": kernel, "bias": bias}, feats, in_pos, out_pos, 0.5, normalize=True,
                activation=jax.numpy.tanh, kernel_map=km, **{key: imp})

    # central differences with eps=1e-6 in float64: truncation ~1e-12, rounding ~1e-10
    check_grads(f, (kernel, bias, feats, imp), order=2, modes=("fwd", "rev"), eps=1e-6,
                atol=1e-5, rtol=1e-5)


def test_gradients_match_reference_vjp(rng):
  """The VJP w.r.t. importance (which Open3D does not give) against the dense reference."""
  vs = 1.0
  in_pos = lattice_cloud(rng, 80, 5, vs)
  out_pos = lattice_cloud(rng, 70, 5, vs)
  kernel = rng.standard_normal((3, 3, 3, 2, 2)).astype(np.float32)
  feats = rng.standard_normal((80, 2)).astype(np.float32)
  imp = rng.uniform(0.5, 1.5, 80).astype(np.float32)
  ct = rng.standard_normal((70, 2)).astype(np.float32)

  def ours(k, f, i):
    return sc.sparse_conv({"kernel": k}, f, in_pos, out_pos, vs, normalize=True, inp_importance=i)

  def dense(k, f, i):
    return reference.dense_sparse_conv(k, None, f, in_pos, out_pos, vs, normalize=True,
                                       importance=i)

  g1 = jax.vjp(ours, kernel, feats, imp)[1](ct)
  g2 = jax.vjp(dense, kernel, feats, imp)[1](ct)
  for a, b in zip(g1, g2):
    assert rel_err(a, b) < 1e-5


def test_second_order_hessian_vector_product(rng):
  """Double backward: grad of a grad-norm penalty, as used by gradient-penalty losses."""
  in_pos = lattice_cloud(rng, 50, 4, 1.0)
  kernel = rng.standard_normal((3, 3, 3, 2, 2)).astype(np.float32)
  feats = rng.standard_normal((50, 2)).astype(np.float32)

  def loss_k(k, x):
    return jax.numpy.sum(jax.numpy.sin(sc.sparse_conv({"kernel": k}, x, in_pos, in_pos, 1.0)))

  def loss_dense(k, x):
    return jax.numpy.sum(jax.numpy.sin(
        reference.dense_sparse_conv(k, None, x, in_pos, in_pos, 1.0)))

  def gp(loss):
    return lambda k: jax.numpy.sum(jax.grad(loss, argnums=1)(k, feats) ** 2)

  g = jax.grad(gp(loss_k))(kernel)
  g_ref = jax.grad(gp(loss_dense))(kernel)
  assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("duplicate_outputs", [False, True], ids=["unique", "duplicated"])
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "transpose"])
def test_backward_gather_and_scatter_paths(rng, duplicate_outputs, transpose):
  """Unique outputs: the feature gradient gathers through the inverse map; duplicated
  outputs: it falls back to a scatter-add. Both against the dense reference."""
  in_pos = lattice_cloud(rng, 70, 5, 1.0)
  out_pos = lattice_cloud(rng, 50, 5, 1.0)
  if duplicate_outputs:
    out_pos = np.concatenate([out_pos, out_pos[:10]])
  km = sc.build_kernel_map(in_pos, out_pos, 1.0, 3, transpose=transpose)
  assert bool(km.out_unique) != duplicate_outputs
  kernel = rng.standard_normal((3, 3, 3, 2, 3)).astype(np.float32)
  feats = rng.standard_normal((70, 2)).astype(np.float32)
  ct = rng.standard_normal((len(out_pos), 3)).astype(np.float32)
  fn = sc.sparse_conv_transpose if transpose else sc.sparse_conv

  def ours(k, f):
    return fn({"kernel": k}, f, in_pos, out_pos, 1.0, kernel_map=km)

  def dense(k, f):
    return reference.dense_sparse_conv(k, None, f, in_pos, out_pos, 1.0, transpose=transpose)

  for a, b in zip(jax.vjp(ours, kernel, feats)[1](ct), jax.vjp(dense, kernel, feats)[1](ct)):
    assert rel_err(a, b) < 1e-5


def test_vmap_of_grad_and_grad_of_vmap_equal_loop(rng):
  kernel = rng.standard_normal((2, 2, 2, 2, 2)).astype(np.float32)
  pos = np.stack([lattice_cloud(rng, 40, 4, 1.0) for _ in range(3)])
  feats = rng.standard_normal((3, 40, 2)).astype(np.float32)

  def loss(k, f, p):
    return jax.numpy.sum(jax.numpy.tanh(sc.sparse_conv({"kernel": k}, f, p, p, 1.0)))

  loop = [jax.grad(loss, argnums=(0, 1))(kernel, feats[b], pos[b]) for b in range(3)]
  per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0))(kernel, feats, pos)
  summed = jax.grad(lambda k, f: jax.numpy.sum(jax.vmap(loss, in_axes=(None, 0, 0))(k, f, pos)),
                    argnums=(0, 1))(kernel, feats)
  for b in range(3):
    assert rel_err(per_example[0][b], loop[b][0]) < 1e-5
    assert rel_err(per_example[1][b], loop[b][1]) < 1e-5
    assert rel_err(summed[1][b], loop[b][1]) < 1e-5
  assert rel_err(summed[0], sum(g[0] for g in loop)) < 1e-5
  # vmap over the kernel too (per-example weights)
  ks = np.stack([kernel, 2 * kernel, -kernel])
  y = jax.vmap(lambda k, f, p: sc.sparse_conv({"kernel": k}, f, p, p, 1.0))(ks, feats, pos)
  for b in range(3):
    assert rel_err(y[b], sc.sparse_conv({"kernel": ks[b]}, feats[b], pos[b], pos[b], 1.0)) < 1e-6
