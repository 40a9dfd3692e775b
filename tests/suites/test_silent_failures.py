"""What a new user tripped on (issue 14): every one of these was silently wrong before.

Each test states the failure it guards against; each failed on the code before the fix.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv.linen import SparseConv

from tests.helpers import lattice_cloud

KERNEL = {"kernel": jnp.ones((3, 3, 3, 2, 4)), "bias": jnp.zeros(4)}


class ConvReluHead(nn.Module):
  """conv -> ReLU -> mean -> Dense: the ReLU turned the NaN poison into exact zeros."""

  @nn.compact
  def __call__(self, feats, pos, km):
    h = SparseConv(4, 3)(feats, pos, pos, 1.0, kernel_map=km)
    return nn.Dense(2)(jnp.mean(nn.relu(h), axis=0))


def _duplicated_cloud(rng):
  pos = lattice_cloud(rng, 30, extent=4, voxel_size=1.0)
  return np.concatenate([pos, pos[:2]])  # two duplicated voxels: an invalid map


def test_error_survives_a_relu_under_jit(rng):
  """Before: logits of exactly 0 for an invalid map. Now the program raises."""
  pos = _duplicated_cloud(rng)
  model = ConvReluHead()
  feats = jnp.ones((len(pos), 2))
  ok = lattice_cloud(rng, 30, extent=4, voxel_size=1.0)
  variables = model.init(jax.random.key(0), feats[:30], ok, sc.build_kernel_map(ok, ok, 1.0, 3))

  @jax.jit
  def run(variables, feats, pos):
    return model.apply(variables, feats, pos, sc.build_kernel_map(pos, pos, 1.0, 3))

  assert np.all(np.isfinite(run(variables, feats[:30], ok)))
  with pytest.raises(Exception, match="duplicated input voxels"):
    jax.block_until_ready(run(variables, feats, pos))


def test_flag_mode_keeps_the_flags_as_data(rng, flag_errors):
  """Error mode "flag" (for export): no raise under jit, the flags say what is wrong."""
  pos = _duplicated_cloud(rng)
  km = jax.jit(lambda p: sc.build_kernel_map(p, p, 1.0, 3))(pos)
  assert int(km.flags) & sc.ErrorCode.DUPLICATE_INPUT
  y = jax.jit(lambda km: sc.sparse_conv(KERNEL, jnp.ones((len(pos), 2)), pos, pos, 1.0,
                                        kernel_map=km))(km)
  assert np.all(np.isnan(y))


def test_error_raises_under_vmap_of_eager_calls(rng):
  """Before: under vmap (nn.vmap, jax.vmap) even eager calls only poisoned (tracers)."""
  pos = _duplicated_cloud(rng)
  both = np.stack([pos, pos])
  with pytest.raises(ValueError, match="duplicated input voxels"):
    jax.vmap(lambda p: sc.build_kernel_map(p, p, 1.0, 3))(both)


def test_downsample_of_a_padded_cloud_needs_its_count(rng):
  """Before: a spurious coarse voxel at (0.5, 0.5, 0.5) from the zero padding rows."""
  pts = (lattice_cloud(rng, 40, extent=6, voxel_size=1.0) + 10.0).astype(np.float32)
  padded, _, count = sc.unique_voxels(np.concatenate([pts, pts[:5]]),
                                      np.ones((45, 1), np.float32), 1.0)
  assert int(count) == 40
  with pytest.raises(ValueError, match="pass their count"):
    sc.downsample(padded, 1.0)
  with pytest.raises(Exception, match="pass their count"):
    jax.block_until_ready(jax.jit(sc.downsample, static_argnums=2)(padded, 1.0, 2))
  coarse, kc = sc.downsample(padded, 1.0, valid=count)
  expect = np.unique(np.floor(pts) // 2, axis=0)
  assert int(kc) == len(expect)
  got = np.unique(np.floor(np.asarray(coarse[:int(kc)])) // 2, axis=0)
  np.testing.assert_array_equal(got, expect)


def test_capacity_and_its_overflow(rng):
  pts = lattice_cloud(rng, 50, extent=6, voxel_size=1.0)
  p, f, k = sc.unique_voxels(pts, np.ones((50, 1), np.float32), 1.0, capacity=64)
  assert p.shape == (64, 3) and int(k) == 50
  with pytest.raises(ValueError, match="capacity"):
    sc.unique_voxels(pts, np.ones((50, 1), np.float32), 1.0, capacity=49)
  c, kc = sc.downsample(pts, 1.0, capacity=30)
  assert c.shape == (30, 3) and int(kc) == len(np.unique(np.floor(pts) // 2, axis=0))


def test_a_map_used_with_another_voxel_size_raises(rng):
  """Before: a map built with the fine voxel size silently turned K=3 into 1x1 convs;
  and the positions/voxel size given with a map were ignored."""
  pos = lattice_cloud(rng, 30, extent=4, voxel_size=0.5)
  km = sc.build_kernel_map(pos, pos, 0.5, 3)
  feats = jnp.ones((30, 2))
  sc.sparse_conv(KERNEL, feats, pos, pos, 0.5, kernel_map=km)
  with pytest.raises(ValueError, match="voxel_size 1.0 differs"):
    sc.sparse_conv(KERNEL, feats, pos, pos, 1.0, kernel_map=km)
  with pytest.raises(Exception, match="voxel_size differs"):
    jax.block_until_ready(jax.jit(lambda vs: sc.sparse_conv(KERNEL, feats, pos, pos, vs,
                                                            kernel_map=km))(1.0))
  with pytest.raises(ValueError, match="outputs"):
    sc.sparse_conv(KERNEL, feats, pos, pos[:20], 0.5, kernel_map=km)


@pytest.mark.parametrize("mode", ["plain", "padded", "packed"])
def test_transposed_map_equals_the_transposed_search(rng, mode):
  fine = lattice_cloud(rng, 200, extent=10, voxel_size=1.0)
  kw, kw_up = {}, {}
  if mode == "padded":
    fine = np.concatenate([fine, np.full((7, 3), np.nan, np.float32)])
    kw = dict(valid=200)
  batch = None
  if mode == "packed":
    batch = np.repeat(np.arange(2), 100).astype(np.int32)
    kw = dict(batch=batch)
  out = sc.downsample(fine, 1.0, **kw)
  coarse, count = out.positions, out.count
  n = len(fine)
  cb = getattr(out, "batch", None)
  maps = dict(in_valid=np.arange(n) < 200, out_valid=np.arange(len(coarse)) < count)
  if mode == "packed":
    maps.update(in_batch=batch, out_batch=cb)
    kw_up = dict(in_batch=cb, out_batch=batch)
  down = sc.build_kernel_map(fine, coarse, 1.0, 2, **maps)
  up = sc.build_kernel_map(coarse, fine, 1.0, 2, transpose=True, in_valid=maps["out_valid"],
                           out_valid=maps["in_valid"], **kw_up)
  t = down.transposed()
  assert t.transpose and t.num_in == up.num_in and t.num_out == up.num_out
  np.testing.assert_array_equal(np.asarray(t.neighbors), np.asarray(up.neighbors))
  np.testing.assert_array_equal(np.asarray(t.inverse), np.asarray(up.inverse))
  np.testing.assert_array_equal(np.asarray(t.out_mask), np.asarray(up.out_mask))
  assert t.transposed().neighbors is down.neighbors
