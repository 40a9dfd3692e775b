"""Morton keys (`_src/morton.py`): round trip and Z-order.
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
from tests.helpers import lattice_cloud


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 2**20 - 1)] * 3), min_size=1, max_size=40))
def test_morton_round_trip(coords):
  c = jnp.asarray(np.array(coords, np.int64).astype(np.int32))
  np.testing.assert_array_equal(sc.morton_decode(*sc.morton_encode(c)), c)



def test_morton_order_is_z_order(rng):
  c = rng.integers(0, 2**20, size=(500, 3))
  hi, lo = map(np.asarray, sc.morton_encode(jnp.asarray(c, jnp.int32)))
  code = (hi.astype(np.uint64) << np.uint64(30)) | lo.astype(np.uint64)
  expect = np.zeros(len(c), np.uint64)
  for bit in range(20):
    for axis in range(3):
      expect |= ((c[:, axis].astype(np.uint64) >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
  np.testing.assert_array_equal(code, expect)

