"""The native neighbour search (``jsc_cpu_neighbors``, ffi/search_cpu.cc) against a NumPy
brute force (a dict of voxel -> input index): compact and wide clouds (coordinates up to
2**21 - 1), padding, packed batches, 3x3x3 / 2x2x2 / custom kernels, queries off the
lattice's range, duplicates, empty inputs and outputs, leading batch axes and vmap, and
malformed calls. Called through ``jax.ffi.ffi_call`` directly: ``import jax_sparseconv``
registers the target."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv  # noqa: F401  (registers the FFI targets)

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="jsc_cpu_neighbors is a CPU kernel")

LIMIT = 2**21
TARGET = "jsc_cpu_neighbors"


def kernel_deltas(k):
  """The offsets of a k x k x k kernel (Open3D's order: x fastest)."""
  lo = -((k - 1) // 2)
  r = np.arange(lo, lo + k)
  z, y, x = np.meshgrid(r, r, r, indexing="ij")
  return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.int32)


DELTAS = {
    "3x3x3": kernel_deltas(3),
    "2x2x2": kernel_deltas(2),
    "custom": np.array([[0, 0, 0], [3, 0, 0], [-3, 0, 0], [0, 3, -3], [1, -2, 3], [-3, -3, -3],
                        [3, 3, 3], [2, 2, -1], [0, -1, 0], [3, 0, 0]], np.int32),  # a repeat too
}


def neighbors(in_coords, in_batch, in_valid, out_coords, out_batch, out_valid, deltas):
  """The FFI call; leading axes of the per-point arguments are batch axes."""
  *lead, m, _ = np.shape(out_coords)
  s = np.shape(deltas)[-2]
  call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct((*lead, m, s), jnp.int32),
                                   jax.ShapeDtypeStruct(tuple(lead), jnp.bool_)),
                          vmap_method="broadcast_all")
  return call(*_args(in_coords, in_batch, in_valid, out_coords, out_batch, out_valid, deltas))


def _args(in_coords, in_batch, in_valid, out_coords, out_batch, out_valid, deltas):
  i32 = lambda a: jnp.asarray(a, jnp.int32)
  b = lambda a: jnp.asarray(a, jnp.bool_)
  return (i32(in_coords), i32(in_batch), b(in_valid), i32(out_coords), i32(out_batch),
          b(out_valid), i32(deltas))


def brute(in_coords, in_batch, in_valid, out_coords, out_batch, out_valid, deltas):
  """(neighbors, duplicate) by a dict; duplicates keep the first copy."""
  n, m, s = len(in_coords), len(out_coords), len(deltas)
  table, dup = {}, False
  for j in range(n):
    if in_valid[j]:
      key = (int(in_batch[j]), *map(int, in_coords[j]))
      dup |= key in table
      table.setdefault(key, j)
  nbr = np.full((m, s), n, np.int32)
  for i in range(m):
    if out_valid[i]:
      c, bt = out_coords[i].astype(np.int64), int(out_batch[i])
      for k, d in enumerate(deltas):
        p = c + d
        if np.all((p >= 0) & (p < LIMIT)):
          nbr[i, k] = table.get((bt, *map(int, p)), n)
  return nbr, dup


def check(cloud, deltas):
  """The kernel against the brute force on one (unbatched) cloud."""
  got, dup = neighbors(*cloud, deltas)
  got = np.asarray(got)
  want, want_dup = brute(*cloud, deltas)
  assert bool(dup) == want_dup
  if not want_dup:
    np.testing.assert_array_equal(got, want)
  else:  # which copy is unspecified: same voxel, same cloud, valid
    in_coords, in_batch, in_valid, out_coords, out_batch, _ = map(np.asarray, cloud)
    n = len(in_coords)
    np.testing.assert_array_equal(got == n, want == n)
    i, k = np.nonzero(got != n)
    j = got[i, k]
    assert np.all(in_valid[j])
    np.testing.assert_array_equal(in_batch[j], out_batch[i])
    np.testing.assert_array_equal(in_coords[j], out_coords[i] + deltas[k])
    again, _ = neighbors(*cloud, deltas)  # deterministic
    np.testing.assert_array_equal(np.asarray(again), got)
  return got, want


def compact_cloud(rng, n, extent=24, clouds=1):
  """n distinct voxels per cloud in an extent**3 box; `clouds` clouds share coordinates."""
  flat = np.concatenate([rng.choice(extent**3, size=n, replace=False) for _ in range(clouds)])
  coords = np.stack(np.unravel_index(flat, (extent,) * 3), axis=1).astype(np.int32)
  batch = np.repeat(np.arange(clouds, dtype=np.int32), n)
  return coords, batch


def wide_cloud(rng, clusters, per):
  """Clusters of nearby voxels anywhere in [0, 2**21)^3, the corners of the range included."""
  centres = rng.integers(0, LIMIT, size=(clusters, 3))
  corners = np.array(list(itertools.product((0, LIMIT - 1), repeat=3)))
  centres[: min(clusters, 8)] = corners[:clusters]
  pts = centres[:, None, :] + rng.integers(-3, 4, size=(clusters, per, 3))
  pts = np.clip(pts.reshape(-1, 3), 0, LIMIT - 1)
  return np.unique(pts, axis=0).astype(np.int32)


def with_queries(rng, coords, batch, m, pad=0.0, spread=2):
  """Outputs near the inputs (some exactly on them), `pad` of them invalid."""
  pick = rng.integers(0, len(coords), size=m)
  out = coords[pick].astype(np.int64) + rng.integers(-spread, spread + 1, size=(m, 3))
  out = np.clip(out, 0, LIMIT - 1).astype(np.int32)
  return out, batch[pick], rng.random(m) >= pad


@pytest.mark.parametrize("kernel", sorted(DELTAS))
@pytest.mark.parametrize("pad", [0.0, 0.3])
def test_compact(rng, kernel, pad):
  coords, batch = compact_cloud(rng, 1500, extent=16)
  in_valid = rng.random(len(coords)) >= pad
  out, out_batch, out_valid = with_queries(rng, coords, batch, 1200, pad)
  got, want = check((coords, batch, in_valid, out, out_batch, out_valid), DELTAS[kernel])
  assert np.mean(want != len(coords)) > 0.05  # the test finds neighbours at all
  if pad:
    assert np.all(got[~out_valid] == len(coords))


@pytest.mark.parametrize("kernel", sorted(DELTAS))
def test_wide(rng, kernel):
  coords = wide_cloud(rng, 200, 12)
  batch = np.zeros(len(coords), np.int32)
  in_valid = rng.random(len(coords)) >= 0.1
  out, out_batch, out_valid = with_queries(rng, coords, batch, 1500, 0.1)
  _, want = check((coords, batch, in_valid, out, out_batch, out_valid), DELTAS[kernel])
  assert np.mean(want != len(coords)) > 0.01


def test_packed_batches_share_coordinates(rng):
  coords, batch = compact_cloud(rng, 400, extent=10, clouds=3)
  in_valid = rng.random(len(coords)) >= 0.2
  out, out_batch, out_valid = with_queries(rng, coords, batch, 900)
  out_batch[::7] = 5  # a cloud with no inputs
  got, _ = check((coords, batch, in_valid, out, out_batch, out_valid), DELTAS["3x3x3"])
  found = got != len(coords)
  np.testing.assert_array_equal(batch[got[found]],
                                np.broadcast_to(out_batch[:, None], got.shape)[found])


def test_edges_of_the_range_do_not_wrap():
  """Queries off [0, 2**21) are not found, and never alias another voxel: inputs sit on
  every corner and face of the range (where a wrapped or carried coordinate would land)."""
  edge = (0, 1, 2, 3, 4, 5, LIMIT - 5, LIMIT - 4, LIMIT - 3, LIMIT - 2, LIMIT - 1)
  coords = np.array(list(itertools.product(edge, repeat=3)), np.int32)
  batch = np.zeros(len(coords), np.int32)
  # Centres on the inputs and just outside the range (valid rows, off the lattice's range).
  centres = np.array(list(itertools.product((-2, -1, 0, 1, LIMIT - 2, LIMIT - 1, LIMIT, LIMIT + 1),
                                            repeat=3)), np.int32)
  out = np.concatenate([coords, centres])
  ones = lambda k: np.ones(k, bool)
  for deltas in (DELTAS["3x3x3"], DELTAS["custom"], np.array([[-5, 0, 0], [0, 0, 5], [4, 4, 4]])):
    check((coords, batch, ones(len(coords)), out, np.zeros(len(out), np.int32), ones(len(out))),
          deltas)


def test_far_deltas_without_the_block_cache(rng):
  """Offsets spread wider than the cached box of blocks: every slot is looked up."""
  coords, batch = compact_cloud(rng, 800, extent=16)
  deltas = np.concatenate([DELTAS["3x3x3"], [[400, 0, 0], [-300, 300, 0], [0, 0, -2000]]])
  far = coords[:20] + np.array([400, 0, 0], np.int32)  # some are found at the far offset
  coords = np.concatenate([coords, far])
  batch = np.zeros(len(coords), np.int32)
  out, out_batch, out_valid = with_queries(rng, coords[:800], batch[:800], 600)
  cloud = (coords, batch, np.ones(len(coords), bool), out, out_batch, out_valid)
  check(cloud, deltas)
  extreme = np.array([[0, 0, 0], [2**31 - 1, 0, 0], [-2**31, 1, 0], [1, -2**31, 2**31 - 1]],
                     np.int32)  # int32's ends: far off the range, no overflow
  got, _ = check(cloud, extreme)
  assert np.all(got[:, 1:] == len(coords))


def test_duplicates(rng):
  coords, batch = compact_cloud(rng, 600, extent=12, clouds=2)
  valid = np.ones(len(coords), bool)
  out, out_batch, out_valid = with_queries(rng, coords, batch, 500)
  cloud = lambda c, b, v: (c, b, v, out, out_batch, out_valid)
  assert not bool(neighbors(*cloud(coords, batch, valid), DELTAS["3x3x3"])[1])
  # The same voxel in two clouds is no duplicate; twice in one cloud is.
  dup_coords = np.concatenate([coords, coords[:5]])
  dup_batch = np.concatenate([batch, batch[:5]])
  check(cloud(dup_coords, dup_batch, np.ones(len(dup_coords), bool)), DELTAS["3x3x3"])
  assert bool(neighbors(*cloud(dup_coords, dup_batch, np.ones(len(dup_coords), bool)),
                        DELTAS["3x3x3"])[1])
  other_batch = np.concatenate([batch, np.full(5, 9, np.int32)])
  assert not bool(neighbors(*cloud(dup_coords, other_batch, np.ones(len(dup_coords), bool)),
                            DELTAS["3x3x3"])[1])
  # A padded copy is no duplicate either.
  pad_valid = np.concatenate([valid, np.zeros(5, bool)])
  assert not bool(neighbors(*cloud(dup_coords, dup_batch, pad_valid), DELTAS["3x3x3"])[1])


def test_empty_inputs_and_outputs(rng):
  coords, batch = compact_cloud(rng, 100, extent=8)
  valid = np.ones(len(coords), bool)
  none = np.zeros((0, 3), np.int32), np.zeros(0, np.int32), np.zeros(0, bool)
  got, dup = neighbors(*none, coords, batch, valid, DELTAS["3x3x3"])  # n = 0
  assert got.shape == (100, 27) and np.all(np.asarray(got) == 0) and not bool(dup)
  got, dup = neighbors(coords, batch, valid, *none, DELTAS["3x3x3"])  # m = 0
  assert got.shape == (0, 27) and not bool(dup)
  got, _ = neighbors(coords, batch, valid, coords, batch, valid, np.zeros((0, 3), np.int32))
  assert got.shape == (100, 0)
  all_padding = np.zeros(len(coords), bool)
  got, dup = neighbors(coords, batch, all_padding, coords, batch, valid, DELTAS["3x3x3"])
  assert np.all(np.asarray(got) == len(coords)) and not bool(dup)


def _batched(rng, entries, n=300, m=250):
  """`entries` clouds of one shape (the second one with a duplicate)."""
  parts = []
  for e in range(entries):
    coords, batch = compact_cloud(rng, n, extent=10)
    valid = rng.random(n) >= 0.2
    if e == 1:
      coords[1], valid[:2] = coords[0], True
    out, out_batch, out_valid = with_queries(rng, coords, batch, m, 0.1)
    parts.append((coords, batch, valid, out, out_batch, out_valid))
  return [np.stack(a) for a in zip(*parts)]


def test_leading_axes_match_a_loop(rng):
  stacked = _batched(rng, 6)
  deltas = DELTAS["custom"]
  got, dup = neighbors(*[a.reshape(2, 3, *a.shape[1:]) for a in stacked], deltas)
  assert got.shape == (2, 3, 250, len(deltas)) and dup.shape == (2, 3)
  got, dup = np.asarray(got).reshape(6, 250, -1), np.asarray(dup).reshape(6)
  for e in range(6):
    want, want_dup = neighbors(*[a[e] for a in stacked], deltas)
    np.testing.assert_array_equal(got[e], np.asarray(want))
    assert dup[e] == bool(want_dup) == (e == 1)


def test_vmap_matches_a_loop(rng):
  stacked = _batched(rng, 4)
  deltas = jnp.asarray(DELTAS["3x3x3"])
  call = lambda *a: neighbors(*a, deltas)  # deltas unbatched (broadcast by vmap)
  got, dup = jax.jit(jax.vmap(call))(*map(jnp.asarray, stacked))
  for e in range(4):
    want, want_dup = neighbors(*[a[e] for a in stacked], deltas)
    np.testing.assert_array_equal(np.asarray(got[e]), np.asarray(want))
    assert bool(dup[e]) == bool(want_dup)
  # Inputs shared, outputs batched.
  shared = [a[0] for a in stacked[:3]]
  f = jax.vmap(lambda oc, ob, ov: neighbors(*shared, oc, ob, ov, deltas))
  got, _ = f(*map(jnp.asarray, stacked[3:]))
  for e in range(4):
    want, _ = neighbors(*shared, *[a[e] for a in stacked[3:]], deltas)
    np.testing.assert_array_equal(np.asarray(got[e]), np.asarray(want))


_ONE_THREAD = """
import sys, numpy as np, jax, jax.numpy as jnp
import jax_sparseconv
d = np.load(sys.argv[1])
m, s = d["out"].shape[0], d["deltas"].shape[0]
call = jax.ffi.ffi_call("jsc_cpu_neighbors", (jax.ShapeDtypeStruct((m, s), jnp.int32),
                                              jax.ShapeDtypeStruct((), jnp.bool_)))
nbr, dup = call(*(jnp.asarray(d[k]) for k in ("coords", "batch", "valid", "out", "out_batch",
                                               "out_valid", "deltas")))
np.savez(sys.argv[2], nbr=nbr, dup=dup)
"""


def test_does_not_depend_on_the_thread_count(rng, tmp_path):
  """The same with every thread and with JAX_SPARSECONV_CPU_THREADS=1 (duplicates too)."""
  coords, batch = compact_cloud(rng, 6000, extent=30, clouds=2)
  coords = np.concatenate([coords, coords[:300]])
  batch = np.concatenate([batch, batch[:300]])
  valid = rng.random(len(coords)) >= 0.1
  out, out_batch, out_valid = with_queries(rng, coords, batch, 8000, 0.1)
  args = dict(coords=coords, batch=batch, valid=valid, out=out, out_batch=out_batch,
              out_valid=out_valid, deltas=DELTAS["3x3x3"])
  np.savez(tmp_path / "in.npz", **args)
  subprocess.run([sys.executable, "-c", _ONE_THREAD, str(tmp_path / "in.npz"),
                  str(tmp_path / "out.npz")], check=True,
                 env={**os.environ, "JAX_SPARSECONV_CPU_THREADS": "1"})
  one = np.load(tmp_path / "out.npz")
  nbr, dup = neighbors(*args.values())
  np.testing.assert_array_equal(np.asarray(nbr), one["nbr"])
  assert bool(dup) == bool(one["dup"]) is True


def _raw(results, *args):
  call = jax.ffi.ffi_call(TARGET, tuple(jax.ShapeDtypeStruct(*r) for r in results))
  return jax.block_until_ready(call(*args))


def test_malformed_calls_raise(rng):
  coords, batch = compact_cloud(rng, 50, extent=6)
  valid = np.ones(50, bool)
  d = DELTAS["3x3x3"]
  good = list(_args(coords, batch, valid, coords[:40], batch[:40], valid[:40], d))
  res = [((40, 27), jnp.int32), ((), jnp.bool_)]
  _raw(res, *good)  # well formed
  bad_args = {
      0: jnp.zeros((50, 2), jnp.int32),          # in_coords not (N, 3)
      1: jnp.zeros((49,), jnp.int32),            # in_batch length
      2: jnp.ones((50, 1), jnp.bool_),           # in_valid rank
      3: jnp.zeros((40, 3, 1), jnp.int32),       # out_coords rank
      4: jnp.zeros((41,), jnp.int32),            # out_batch length
      5: jnp.ones((2, 40), jnp.bool_),           # out_valid with a leading axis the rest lack
      6: jnp.zeros((27, 2), jnp.int32),          # deltas not (S, 3)
  }
  for k, bad in bad_args.items():
    args = list(good)
    args[k] = bad
    with pytest.raises(Exception, match="inconsistent shapes"):
      _raw(res, *args)
  for results in ([((40, 26), jnp.int32), ((), jnp.bool_)],     # S
                  [((41, 27), jnp.int32), ((), jnp.bool_)],     # M
                  [((40, 27), jnp.int32), ((1,), jnp.bool_)],   # duplicate not a scalar
                  [((1, 40, 27), jnp.int32), ((1,), jnp.bool_)]):  # batch axes the inputs lack
    with pytest.raises(Exception, match="inconsistent shapes"):
      _raw(results, *good)
  with pytest.raises(Exception):  # a wrong dtype: the binding's check
    _raw(res, good[0].astype(jnp.float32), *good[1:])
  with pytest.raises(Exception):
    _raw(res, *good[:2], good[2].astype(jnp.int32), *good[3:])


# ---------------------------------------------------------------- timing (printed, not asserted)
def sheet(rng, n, extent):
  """About n voxels of a wavy surface spanning extent voxels per axis (a 2-D-ish cloud)."""
  side = int(np.sqrt(n)) + 1
  step = max(1, extent // side)
  u, v = np.meshgrid(np.arange(side) * step, np.arange(side) * step, indexing="ij")
  u, v = u.ravel(), v.ravel()
  w = (extent / 2) * (1 + np.sin(u * 3.0 / extent) * np.cos(v * 3.0 / extent))  # [0, extent]
  pts = np.stack([u, v, w], 1).astype(np.int64)
  if step > 1:  # a sparse sample of a wide surface: jitter, so the sample is no lattice
    pts += rng.integers(0, step, size=pts.shape) * np.array([1, 1, 0])
  pts = np.unique(np.clip(pts, 0, LIMIT - 1), axis=0)
  return pts[rng.permutation(len(pts))[:n]].astype(np.int32)


def time_call(coords, reps=5):
  n = len(coords)
  zeros, ones = jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.bool_)
  c, d = jnp.asarray(coords), jnp.asarray(DELTAS["3x3x3"])
  f = jax.jit(lambda c: neighbors(c, zeros, ones, c, zeros, ones, d))
  jax.block_until_ready(f(c))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(c))
    best = min(best, time.perf_counter() - t0)
  return best


def test_timing_100k_compact_and_wide(rng):
  """n = m = 100k, 3x3x3: a compact sheet (~320 voxels a side) and a sheet over 3000."""
  for name, extent in (("compact sheet", 320), ("wide sheet (3000/axis)", 3000)):
    coords = sheet(rng, 100_000, extent)
    ms = 1e3 * time_call(coords)
    print(f"\njsc_cpu_neighbors n=m={len(coords)}, S=27, {name}: {ms:.1f} ms "
          f"(threads: {os.environ.get('JAX_SPARSECONV_CPU_THREADS', 'all')})")
