"""Kernel maps (`_src/kernel_map.py`): the search against a brute-force all-pairs search;
range, duplicates, padding and packed batches; the inverse table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax_sparseconv as sc
from jax_sparseconv._src import ffi
from jax_sparseconv import reference
from jax_sparseconv import ErrorCode

DUPLICATE_INPUT, NONFINITE_POSITION, OUT_OF_RANGE = (
    ErrorCode.DUPLICATE_INPUT, ErrorCode.NONFINITE_POSITION, ErrorCode.OUT_OF_RANGE)

from tests.helpers import lattice_cloud, map_as_sets




CASES = [  # kernel_size (z, y, x), offset [x, y, z]
    (1, None), (2, None), (3, None), (4, None), (5, None),
    ((3, 1, 3), None), ((2, 3, 1), None), ((1, 4, 5), None),
    (3, (1.0, 0.0, -1.0)), (3, (0.3, -0.4, 0.5)), (2, (0.25, 0.0, -0.75)), (1, (0.6, 0.0, -0.3)),
]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kernel_size,offset", CASES)
def test_search_matches_brute_force(rng, kernel_size, offset, transpose):
  vs = float(rng.choice([0.05, 0.3, 1.0]))
  centres = bool(rng.integers(2))
  origin = float(rng.uniform(-5, 5)) // vs * vs
  in_pos = lattice_cloud(rng, 150, extent=7, voxel_size=vs, centres=centres, origin=origin)
  out_pos = lattice_cloud(rng, 90, extent=8, voxel_size=vs, centres=centres, origin=origin)
  km = sc.build_kernel_map(in_pos, out_pos, vs, kernel_size, offset=offset, transpose=transpose)
  ks = sc.build_kernel_map(in_pos, out_pos, vs, kernel_size, offset=offset).kernel_size
  # transpose: per output m, the inputs n whose window contains m (m in M(n))
  expect = reference.brute_force_neighbors(in_pos, out_pos, vs, ks, offset, transpose)
  assert map_as_sets(km) == [sorted(int(i) for i in e) for e in expect]


def test_span_beyond_1024_voxels_without_x64():
  assert not jax.config.jax_enable_x64
  vs = 0.01
  idx = np.array([[0, 0, 0], [1, 0, 0], [3000, 0, 0], [3001, 0, 0], [3000, 5000, 90000],
                  [3000, 5001, 90000]])
  pos = ((idx + 0.5) * vs).astype(np.float32) - 20.0
  km = sc.build_kernel_map(pos, pos, vs, 3)
  assert map_as_sets(km) == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]]


def test_out_of_range_is_an_error_and_a_flag_under_jit(flag_errors):
  pos = np.array([[0.5, 0.5, 0.5], [2**20 + 0.5, 0.5, 0.5]], np.float32)
  with pytest.raises(ValueError, match="span"):
    sc.build_kernel_map(pos, pos, 1.0, 3)
  km = jax.jit(lambda p: sc.build_kernel_map(p, p, 1.0, 3))(pos)
  assert int(km.flags) & OUT_OF_RANGE
  params = {"kernel": jnp.ones((3, 3, 3, 1, 1))}
  y = jax.jit(lambda p: sc.sparse_conv(params, jnp.ones((2, 1)), p, p, 1.0))(pos)
  assert np.all(np.isnan(y))


def test_duplicates_error_flag_and_unique_helper(rng, flag_errors):
  pos = lattice_cloud(rng, 40, extent=5, voxel_size=1.0)
  dup = np.concatenate([pos, pos[:3]])
  with pytest.raises(ValueError, match="unique_voxels"):
    sc.build_kernel_map(dup, pos, 1.0, 3)
  km = jax.jit(lambda p: sc.build_kernel_map(p, p, 1.0, 3))(dup)
  assert int(km.flags) & DUPLICATE_INPUT
  assert any("duplicated" in e for e in km.errors)
  with pytest.raises(ValueError):
    km.check()
  # Padded duplicates are not duplicates.
  sc.build_kernel_map(dup, pos, 1.0, 3, in_valid=len(pos))


def test_nan_positions_error_and_nan_outputs_under_jit(rng, flag_errors):
  pos = lattice_cloud(rng, 20, extent=4, voxel_size=1.0)
  bad = pos.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    sc.build_kernel_map(bad, pos, 1.0, 3)
  km = jax.jit(lambda p: sc.build_kernel_map(p, pos, 1.0, 3))(bad)
  assert int(km.flags) & NONFINITE_POSITION
  # ... but a NaN in a padded row is ignored.
  sc.build_kernel_map(bad, pos, 1.0, 3, in_valid=np.arange(20) != 3)


def test_off_lattice_is_an_error(rng):
  pos = lattice_cloud(rng, 20, extent=4, voxel_size=1.0)
  with pytest.raises(ValueError, match="lattice"):
    sc.build_kernel_map(pos, pos + np.float32(0.5), 1.0, 3)


def test_padding_inputs_never_neighbours_outputs_empty(rng):
  pos = lattice_cloud(rng, 60, extent=5, voxel_size=1.0)
  n_in, n_out = 45, 50
  km = sc.build_kernel_map(pos, pos, 1.0, 3, in_valid=n_in, out_valid=n_out)
  ref = sc.build_kernel_map(pos[:n_in], pos[:n_out], 1.0, 3)
  got = map_as_sets(km)
  assert got[:n_out] == map_as_sets(ref)
  assert all(row == [] for row in got[n_out:])
  # a bool mask works the same as a count, and both may be traced
  mask = np.arange(60) < n_in
  km2 = jax.jit(lambda v: sc.build_kernel_map(pos, pos, 1.0, 3, in_valid=v, out_valid=n_out))(mask)
  assert map_as_sets(km2) == got


def test_packed_batch_never_crosses_clouds(rng):
  a = lattice_cloud(rng, 50, extent=4, voxel_size=1.0)
  b = lattice_cloud(rng, 30, extent=4, voxel_size=1.0)  # same region: would be neighbours
  pos = np.concatenate([a, b])
  batch = np.array([0] * 50 + [1] * 30)
  km = sc.build_kernel_map(pos, pos, 1.0, 3, in_batch=batch, out_batch=batch)
  got = map_as_sets(km)
  ka, kb = sc.build_kernel_map(a, a, 1.0, 3), sc.build_kernel_map(b, b, 1.0, 3)
  assert got[:50] == map_as_sets(ka)
  assert got[50:] == [[i + 50 for i in row] for row in map_as_sets(kb)]


@pytest.mark.parametrize("collide", [False, True])
def test_cpu_invert_matches_jnp(rng, collide):
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  from jax_sparseconv._src import lookup
  n, m, s = 300, 250, 9
  nbr = np.full((m, s), n)
  for sl in range(s):  # an injective map per slot, 200 of the 250 rows
    nbr[rng.permutation(m)[:200], sl] = rng.permutation(n)[:200]
  if collide:
    nbr[3, 4] = nbr[5, 4] = 17
  nbr = jnp.asarray(nbr, jnp.int32)
  inv, uniq = ffi.cpu_invert(nbr, n)
  inv_ref, uniq_ref = lookup.invert_jnp(nbr, n)
  assert bool(uniq) == bool(uniq_ref) == (not collide)
  if not collide:
    assert np.array_equal(np.asarray(inv), np.asarray(inv_ref))
  batched = jax.vmap(lambda a: ffi.cpu_invert(a, n))(jnp.stack([nbr, nbr[::-1]]))
  assert batched[0].shape == (2, n, s) and np.array_equal(np.asarray(batched[0][0]),
                                                          np.asarray(inv))
  assert list(np.asarray(batched[1])) == [not collide] * 2

