"""Points on a lattice (`_src/lattice.py`): key sorting (the native radix sort against NumPy).
"""

from __future__ import annotations
import os
import shutil
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax_sparseconv as sc
from jax_sparseconv._src import gather_matmul as gm
from jax_sparseconv._src import backend, ffi, lattice
from tests.helpers import lattice_cloud, rel_err, x64


@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_cpu_sort_keys_matches_numpy(rng, n):
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  hi = rng.integers(0, 2**30, n).astype(np.uint32)
  lo = rng.integers(0, 2**30, n).astype(np.uint32)
  if n > 10:
    hi[:5] = 0xFFFFFFFF  # padding sentinels: equal keys keep their order
    lo[:5] = 0xFFFFFFFF
    hi[7], lo[7] = hi[8], lo[8]  # a duplicated key
    hi[9:20] = 3  # keys that differ only in the low word
  order = np.lexsort((np.arange(n), lo, hi))
  for batched in (False, True):
    if batched:  # leading batch axes, as vmap gives them
      both = jax.vmap(ffi.cpu_sort_keys)(jnp.asarray(np.stack([hi, hi[::-1]])),
                                             jnp.asarray(np.stack([lo, lo[::-1]])))
      out = [o[0] for o in both]
      second = np.lexsort((np.arange(n), lo[::-1], hi[::-1]))
      assert np.array_equal(np.asarray(both[2][1]), second)
    else:
      out = ffi.cpu_sort_keys(jnp.asarray(hi), jnp.asarray(lo))
    assert np.array_equal(np.asarray(out[2]), order)
    assert np.array_equal(np.asarray(out[0]), hi[order])
    assert np.array_equal(np.asarray(out[1]), lo[order])


@pytest.mark.parametrize("n", [0, 5, 4000])
def test_cpu_sort_keys_three_words_matches_numpy(rng, n):
  """Packed batches sort by (cloud, hi, lo): the leading word's passes, stability, and a
  constant leading word (skipped passes)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  lo = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
  hi = rng.integers(0, 4, n).astype(np.uint32)  # many equal hi words
  for top in (rng.integers(0, 70000, n).astype(np.uint32), np.zeros(n, np.uint32),
              np.full(n, 0xFFFFFFFF, np.uint32)):
    if n > 10:
      top[3], hi[3], lo[3] = top[4], hi[4], lo[4]  # a duplicated key keeps its order
    order = np.lexsort((np.arange(n), lo, hi, top))
    out = ffi.cpu_sort_keys(jnp.asarray(top), jnp.asarray(hi), jnp.asarray(lo))
    assert len(out) == 4
    for got, want in zip(out, (top[order], hi[order], lo[order], order)):
      assert np.array_equal(np.asarray(got), want)
    with sc.kernel_backend("jnp"):
      by_lax = lattice.sort_keys([jnp.asarray(top), jnp.asarray(hi), jnp.asarray(lo)])
    for got, want in zip(by_lax, out):
      assert np.array_equal(np.asarray(got), np.asarray(want))



@pytest.mark.parametrize("widths", [(0, 0), (5, 0), (30, 0), (30, 2), (33, 0), (20, 12),
                                    (51, 0), (52, 0), (40, 12)])
def test_cpu_sort_keys_narrow_keys_match_numpy(rng, widths):
  """Keys whose varying bits and the 13 bits of a position fit in 64 (one cloud's Morton
  keys, a packed batch's few cloud bits) take the packed sort; (51, 0) just fits, (52, 0)
  and (40, 12) just miss it. Constant bits sit
  inside and outside the varying span, the span starts past bit 0 and crosses the
  hi/lo boundary, and ties keep their order."""
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  kw, tw = widths
  n = 5000
  shift = 7  # the span starts at bit 7 of the 64-bit (hi << 32 | lo) key
  base = np.uint64(0xA5A5_0000_0000_0000)  # constant high bits
  part = rng.integers(0, 2**kw, n, dtype=np.uint64) if kw else np.zeros(n, np.uint64)
  if kw > 4:
    part &= ~np.uint64(1 << 2)  # a constant bit inside the span
    part[:40] = part[40:80]  # ties
  key = base | (part << np.uint64(shift)) | np.uint64(0x15)  # constant low bits
  hi, lo = (key >> np.uint64(32)).astype(np.uint32), (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  top = (np.uint32(0x300) | (rng.integers(0, 2**tw, n).astype(np.uint32) << np.uint32(4))
         if tw else np.full(n, 9, np.uint32))
  order = np.lexsort((np.arange(n), lo, hi, top))
  out = ffi.cpu_sort_keys(jnp.asarray(top), jnp.asarray(hi), jnp.asarray(lo))
  for got, want in zip(out, (top[order], hi[order], lo[order], order)):
    assert np.array_equal(np.asarray(got), want)
  # Padding rows (lattice.keys: the sentinel in every word) sort last, in position order,
  # and do not widen the span: three words (a packed batch) and two (one cloud).
  ones, pad = np.uint32(0xFFFFFFFF), rng.random(n) < 0.2
  top, hi, lo = (np.where(pad, ones, w) for w in (top, hi, lo))
  for words in ((top, hi, lo), (hi, lo)):
    order = np.lexsort((np.arange(n), *words[::-1]))
    out = ffi.cpu_sort_keys(*map(jnp.asarray, words))
    for got, want in zip(out, (*(w[order] for w in words), order)):
      assert np.array_equal(np.asarray(got), want)
