"""The lookup (`_src/lookup.py`): both implementations against a brute force, at any extent.
"""

from __future__ import annotations
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import jax_sparseconv as sc
from jax_sparseconv import reference
from jax_sparseconv import ErrorCode
from tests.helpers import lattice_cloud, map_as_sets


@pytest.mark.parametrize("extent", [12, 100, 300, 2**20 - 8],
                         ids=["dense", "sparse", "wide", "whole-range"])
def test_block_table_lookup_matches_brute_force_at_any_extent(rng, extent):
  """The jnp lookup (hashed 4x4x2 blocks) from a dense cube to the whole coordinate range;
  the native one must give the same table."""
  n = 400
  idx = rng.integers(0, extent, size=(4 * n, 3))
  idx = np.unique(idx, axis=0)[:n]
  idx = idx[rng.permutation(len(idx))]
  pos = ((idx + 0.5) * 0.1).astype(np.float32)
  expect = [sorted(int(i) for i in e)
            for e in reference.brute_force_neighbors(pos, pos[:300], 0.1, (3, 3, 3))]
  for backend in ("jnp", "auto"):
    previous = sc.set_kernel_backend(backend)
    try:
      km = sc.build_kernel_map(pos, pos[:300], 0.1, 3)
    finally:
      sc.set_kernel_backend(previous)
    assert map_as_sets(km) == expect, backend



# ------------------------------------------------------------------ the CUDA search, the jnp one


def _kernel_deltas(k):
  lo = -((k - 1) // 2)
  r = np.arange(lo, lo + k)
  z, y, x = np.meshgrid(r, r, r, indexing="ij")
  return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.int32)


def _random_cloud(rng, n, m, extent, clouds, pad):
  """Distinct voxels per cloud (packed when clouds > 1), `pad` of inputs and outputs padding
  (with junk coordinates), outputs near the inputs."""
  from jax_sparseconv._src.morton import MAX_COORD
  flat = np.concatenate([rng.choice(extent**3, size=n // clouds, replace=False)
                         for _ in range(clouds)])
  c_in = np.stack(np.unravel_index(flat, (extent,) * 3), 1).astype(np.int32)
  c_in += rng.integers(0, MAX_COORD - extent, size=3).astype(np.int32)  # anywhere
  b_in = np.repeat(np.arange(clouds, dtype=np.int32), n // clouds)
  pick = rng.integers(0, len(c_in), size=m)
  c_out = (c_in[pick] + rng.integers(-2, 3, size=(m, 3))).astype(np.int32)
  b_out = b_in[pick]
  in_mask = rng.random(len(c_in)) >= pad
  out_mask = rng.random(m) >= pad
  c_in[~in_mask] = rng.integers(-5, 2**22, size=(int((~in_mask).sum()), 3))  # padding: junk
  return c_in, in_mask, b_in, c_out, out_mask, b_out


@pytest.mark.parametrize("k,clouds,pad", [(3, 1, 0.0), (3, 3, 0.25), (2, 2, 0.1), (5, 1, 0.2)],
                         ids=["k3", "k3-packed-padded", "k2-packed", "k5-padded"])
def test_cuda_search_matches_the_jnp_search_bitwise(rng, k, clouds, pad):
  """lookup.neighbors with backend "host" runs the CUDA search (ffi/search_cuda.cu through
  the host shim, the cuda_fn of backend.dispatch); its table and duplicate flag are the jnp
  search's, bit for bit, and the lowered program names jsc_neighbors."""
  from jax_sparseconv._src import ffi, lookup
  if ("jsc_neighbors", "cpu") not in ffi.targets:
    pytest.skip("no host build of the CUDA search")
  c_in, in_mask, b_in, c_out, out_mask, b_out = _random_cloud(rng, 600, 450, 14, clouds, pad)
  deltas = _kernel_deltas(k)
  batch = (b_in, b_out) if clouds > 1 else (None, None)

  def search(c_in, in_mask, c_out, out_mask, b_in, b_out):
    return lookup.neighbors(c_in, in_mask, b_in, c_out, out_mask, b_out, deltas)

  args = (c_in, in_mask, c_out, out_mask, *batch)
  out = {}
  for name in ("host", "jnp"):
    with sc.kernel_backend(name):
      f = jax.jit(search)
      text = f.lower(*args).as_text()
      assert ("jsc_neighbors" in text) == (name == "host"), name
      out[name] = jax.device_get(f(*args))
  np.testing.assert_array_equal(out["host"][0], out["jnp"][0])
  assert bool(out["host"][1]) == bool(out["jnp"][1]) is False
  assert np.any(out["host"][0] < len(c_in))


def test_jnp_search_candidate_blocks():
  """Defect 7 of issue 22: an output's window of a 3x3x3 kernel touches at most 2 blocks per
  axis (4 x 4 x 2 blocks): 8 candidates, not 12; 12 for 5x5x5, not 36. And every slot of
  every phase falls in one of them (the phase table's candidate index < the count)."""
  from jax_sparseconv._src import lookup
  for k, want in ((2, [2, 2, 2]), (3, [2, 2, 2]), (5, [2, 2, 3]), (7, [3, 3, 4])):
    deltas = _kernel_deltas(k)
    reach = lookup._reach(deltas)
    assert reach == want, (k, reach)
    code = lookup._phase_table(tuple(map(tuple, deltas.tolist())), tuple(reach))
    assert code.min() >= 0 and (code >> 5).max() < np.prod(reach), k
    # Tight: some phase needs the last candidate on each axis.
    assert (code >> 5).max() == np.prod(reach) - 1, k
