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

