"""jax_sparseconv.pooling against NumPy loops: strided max/avg pooling (spconv windows, padding
0), packed batches, padding, jit and gradients; global max/avg pooling per cloud."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparseconv.pooling import global_avg_pool, global_max_pool, sparse_avg_pool, \
    sparse_max_pool


def np_pool(mode, feats, idx, batch, k, s):
  """{(b, o): value}: every window [o*s, o*s + k) per axis holding at least one voxel."""
  out = {}
  for f, i, b in zip(feats, idx, batch):
    lo = -(-(i - k + 1) // s)
    hi = i // s
    for ox in range(lo[0], hi[0] + 1):
      for oy in range(lo[1], hi[1] + 1):
        for oz in range(lo[2], hi[2] + 1):
          out.setdefault((b, ox, oy, oz), []).append(f)
  red = (lambda v: np.max(v, 0)) if mode == "max" else (lambda v: np.mean(v, 0))
  return {key: red(np.stack(v)) for key, v in out.items()}


def random_voxels(rng, n, extent, vs):
  flat = rng.choice(extent**3, size=n, replace=False)
  idx = np.stack(np.unravel_index(flat, (extent,) * 3), 1) - extent // 2  # negative too
  return idx, ((idx + 0.5) * vs).astype(np.float32)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (1, 2), (3, 3)])
def test_sparse_pool_vs_numpy(rng, mode, k, s):
  vs = 0.3
  idx, pos = random_voxels(rng, 60, 8, vs)
  feats = rng.standard_normal((60, 4)).astype(np.float32)
  fn = sparse_max_pool if mode == "max" else sparse_avg_pool
  out, opos, count = fn(feats, pos, vs, k, s)
  want = np_pool(mode, feats, idx, np.zeros(60, int), k, s)
  c = int(count)
  assert c == len(want)
  got_o = np.rint(np.asarray(opos[:c]) / vs - 0.5).astype(int)
  assert np.all(got_o % s == 0)  # the first voxel of each window
  for o, f in zip(got_o // s, np.asarray(out[:c])):
    np.testing.assert_allclose(f, want[(0, *o)], rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(out[c:]) == 0)


def test_sparse_pool_packed_padded_jit_and_grad(rng):
  vs = 1.0
  idx, pos = random_voxels(rng, 50, 6, vs)
  batch = rng.integers(0, 2, 50)
  pos[25:] = pos[:25]  # the same voxels in both clouds: they must not mix
  idx[25:] = idx[:25]
  batch[:25], batch[25:] = 0, 1
  feats = rng.standard_normal((50, 3)).astype(np.float32)
  pad_pos = np.concatenate([pos, np.full((6, 3), np.nan, np.float32)])
  pad_feats = np.concatenate([feats, np.full((6, 3), 1e9, np.float32)])
  pad_batch = np.concatenate([batch, np.zeros(6, int)])
  fn = jax.jit(functools.partial(sparse_max_pool, kernel_size=2, out_capacity=52))  # >= 50
  out, opos, obatch, count = fn(pad_feats, pad_pos, vs, valid=50, batch=pad_batch)
  want = np_pool("max", feats, idx, batch, 2, 2)
  c = int(count)
  assert c == len(want)
  o = np.rint(np.asarray(opos[:c]) - 0.5).astype(int) // 2
  for b, oo, f in zip(np.asarray(obatch[:c]), o, np.asarray(out[:c])):
    np.testing.assert_allclose(f, want[(b, *oo)], rtol=1e-6)
  # gradient of a max pool: one per window and channel, to the arg max
  g = jax.grad(lambda f: jnp.sum(sparse_max_pool(f, pos, vs, 2, batch=batch)[0]))(feats)
  assert np.asarray(g).sum() == pytest.approx(c * 3) and set(np.unique(g)) <= {0.0, 1.0}
  ga = jax.grad(lambda f: jnp.sum(sparse_avg_pool(f, pos, vs, 2, batch=batch)[0]))(feats)
  assert np.asarray(ga).sum() == pytest.approx(c * 3, rel=1e-5)
  # too small a capacity: an error (the library's error rule)
  with pytest.raises(ValueError):
    sparse_max_pool(feats, pos, vs, 2, batch=batch, out_capacity=c - 1)


def test_global_pooling(rng):
  feats = rng.standard_normal((30, 5)).astype(np.float32)
  batch = rng.integers(0, 3, 30)
  batch[batch == 2] = 0  # cloud 2 empty
  valid = np.ones(30, bool)
  valid[-4:] = False
  mx = global_max_pool(feats, batch=batch, valid=valid, num_clouds=3)
  av = global_avg_pool(feats, batch=batch, valid=valid, num_clouds=3)
  for b in range(3):
    sel = feats[(batch == b) & valid]
    np.testing.assert_allclose(mx[b], sel.max(0) if len(sel) else 0, rtol=1e-6)
    np.testing.assert_allclose(av[b], sel.mean(0) if len(sel) else 0, rtol=1e-5, atol=1e-6)
  # one cloud with a count, and padded clouds (B, n, C) with counts
  np.testing.assert_allclose(global_max_pool(feats, valid=10), feats[:10].max(0))
  padded = feats.reshape(3, 10, 5)
  counts = np.array([10, 3, 0])
  np.testing.assert_allclose(global_avg_pool(padded, valid=counts)[:2],
                             [padded[0].mean(0), padded[1, :3].mean(0)], rtol=1e-5)
  assert np.all(np.asarray(global_max_pool(padded, valid=counts)[2]) == 0)
  vm = jax.vmap(lambda f, c: global_max_pool(f, valid=c))(padded, counts)
  np.testing.assert_allclose(vm, global_max_pool(padded, valid=counts))
  with pytest.raises(ValueError, match="num_clouds"):
    global_max_pool(feats, batch=batch)
