"""The CUDA neighbour search and inverse map (``jsc_neighbors``, ``jsc_invert``,
ffi/search_cuda.cu), run on the CPU through the host shim (the same source nvcc compiles):
against the NumPy brute force and the native CPU kernels of test_search_cpu.py, bitwise, on
compact and wide clouds, padding, packed batches, every kernel shape, the range's edges,
duplicates (the smallest index wins), empty inputs and outputs, leading axes and vmap, and
malformed calls. ``test_search_tests_pass_interleaved`` reruns them with the shim's
interleave mode (threads switch at every atomic), where a racy insertion would show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparseconv._src import ffi
from tests.kernels.test_search_cpu import (DELTAS, LIMIT, _args, brute, compact_cloud,
                                           wide_cloud, with_queries)
from tests.kernels.test_search_cpu import neighbors as cpu_neighbors

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or ("jsc_neighbors", "cpu") not in ffi.targets,
    reason="the host build of the CUDA search runs on the CPU")


def neighbors(in_coords, in_batch, in_valid, out_coords, out_batch, out_valid, deltas):
  """The FFI call, through ffi.cuda_neighbors (the table size is its policy)."""
  return ffi.cuda_neighbors(*_args(in_coords, in_batch, in_valid, out_coords, out_batch,
                                   out_valid, deltas))


def check(cloud, deltas):
  """The CUDA search against the brute force and the native CPU search: the same table,
  bitwise, duplicates included (both keep the smallest index of a voxel's inputs)."""
  got, dup = neighbors(*cloud, deltas)
  got = np.asarray(got)
  want, want_dup = brute(*cloud, deltas)
  assert bool(dup) == want_dup
  np.testing.assert_array_equal(got, want)
  if not want_dup:  # the CPU kernel leaves which copy unspecified
    cpu, cpu_dup = cpu_neighbors(*cloud, deltas)
    np.testing.assert_array_equal(got, np.asarray(cpu))
    assert bool(cpu_dup) == bool(dup)
  again, _ = neighbors(*cloud, deltas)
  np.testing.assert_array_equal(np.asarray(again), got)  # deterministic
  return got


@pytest.mark.parametrize("kernel", sorted(DELTAS))
@pytest.mark.parametrize("pad", [0.0, 0.3])
def test_compact(rng, kernel, pad):
  coords, batch = compact_cloud(rng, 700, extent=12)
  in_valid = rng.random(len(coords)) >= pad
  check((coords, batch, in_valid, *with_queries(rng, coords, batch, 500, pad=pad)),
        DELTAS[kernel])


def test_wide(rng):
  coords = wide_cloud(rng, 40, 20)
  batch = np.zeros(len(coords), np.int32)
  check((coords, batch, np.ones(len(coords), bool),
         *with_queries(rng, coords, batch, 400, spread=3)), DELTAS["3x3x3"])


def test_packed_batches_share_coordinates(rng):
  coords, batch = compact_cloud(rng, 300, extent=10, clouds=3)
  valid = rng.random(len(coords)) >= 0.2
  got = check((coords, batch, valid, *with_queries(rng, coords, batch, 400, pad=0.2)),
              DELTAS["3x3x3"])
  assert np.any(got < len(coords))


def test_edges_of_the_range_do_not_wrap():
  top = LIMIT - 1
  coords = np.array([[0, 0, 0], [top, top, top], [top, 0, 0], [0, top, 0], [0, 0, top],
                     [1, 1, 1], [top - 1, top, top]], np.int32)
  batch = np.zeros(len(coords), np.int32)
  ones = np.ones(len(coords), bool)
  got = check((coords, batch, ones, coords, batch, ones), DELTAS["3x3x3"])
  assert got[0, 13] == 0 and got[1, 13] == 1  # the centre slot finds itself
  # Inputs off the range are never found.
  off = np.array([[-1, 0, 0], [LIMIT, 0, 0], [0, 0, 0]], np.int32)
  nbr, dup = neighbors(off, np.zeros(3, np.int32), np.ones(3, bool), off[2:],
                       np.zeros(1, np.int32), np.ones(1, bool), DELTAS["3x3x3"])
  assert not bool(dup) and np.asarray(nbr)[0, 13] == 2 and np.asarray(nbr)[0, 12] == 3


def test_duplicates_keep_the_smallest_index(rng):
  coords, batch = compact_cloud(rng, 200, extent=8)
  dup_coords = np.concatenate([coords, coords[::-1], coords[:50]])
  dup_batch = np.concatenate([batch, batch, batch[:50]])
  valid = rng.random(len(dup_coords)) >= 0.3
  out = with_queries(rng, coords, batch, 300, pad=0.1)
  got = check((dup_coords, dup_batch, valid, *out), DELTAS["3x3x3"])
  assert np.any(got < len(dup_coords))
  # Two clouds at one voxel, or a padded copy, are no duplicate.
  other = np.concatenate([batch, batch + 1])
  _, dup = neighbors(np.concatenate([coords, coords]), other, np.ones(400, bool), *out,
                     DELTAS["3x3x3"])
  assert not bool(dup)


def test_empty_inputs_and_outputs(rng):
  coords, batch = compact_cloud(rng, 50, extent=6)
  valid = np.ones(50, bool)
  none = (np.zeros((0, 3), np.int32), np.zeros(0, np.int32), np.zeros(0, bool))
  got, dup = neighbors(*none, coords, batch, valid, DELTAS["3x3x3"])  # n = 0
  assert np.all(np.asarray(got) == 0) and not bool(dup)
  got, dup = neighbors(coords, batch, valid, *none, DELTAS["3x3x3"])  # m = 0
  assert np.asarray(got).shape == (0, 27)
  got, _ = neighbors(coords, batch, valid, coords, batch, valid, np.zeros((0, 3), np.int32))
  assert np.asarray(got).shape == (50, 0)
  got, _ = neighbors(coords, batch, np.zeros(50, bool), coords, batch, valid, DELTAS["3x3x3"])
  assert np.all(np.asarray(got) == 50)


def _stacked(rng, entries, n=200, m=150):
  out = []
  for _ in range(entries):
    coords, batch = compact_cloud(rng, n, extent=9)
    valid = rng.random(n) >= 0.2
    out.append((coords, batch, valid, *with_queries(rng, coords, batch, m, pad=0.2)))
  return [np.stack(a) for a in zip(*out)]


def test_leading_axes_and_vmap_match_a_loop(rng):
  stacked = _stacked(rng, 4)
  deltas = DELTAS["custom"]
  got, dup = jax.vmap(lambda *a: neighbors(*a, deltas))(*stacked)
  for e in range(4):
    want, want_dup = brute(*[a[e] for a in stacked], deltas)
    np.testing.assert_array_equal(np.asarray(got[e]), want)
    assert bool(dup[e]) == want_dup
  lead, lead_dup = ffi.cuda_neighbors(*_args(*[a.reshape(2, 2, *a.shape[1:]) for a in stacked],
                                             deltas))
  np.testing.assert_array_equal(np.asarray(lead).reshape(np.shape(got)), np.asarray(got))


def test_invert_matches_the_cpu_kernel(rng):
  n, m, s = 120, 200, 27
  nbr = rng.integers(0, n + 30, size=(m, s)).astype(np.int32)  # collisions and misses
  nbr[rng.random((m, s)) < 0.5] = n
  inv, unique = ffi.cuda_invert(jnp.asarray(nbr), n)
  cpu_inv, cpu_unique = ffi.cpu_invert(jnp.asarray(nbr), n)
  np.testing.assert_array_equal(np.asarray(inv), np.asarray(cpu_inv))
  assert bool(unique) == bool(cpu_unique) is False
  exact = np.full((m, s), n, np.int32)  # an injective map: exact inverse
  for k in range(s):
    rows = rng.choice(m, size=min(n, m), replace=False)[: n // 2]
    exact[rows, k] = rng.choice(n, size=len(rows), replace=False)
  inv, unique = ffi.cuda_invert(jnp.asarray(exact), n)
  assert bool(unique)
  np.testing.assert_array_equal(np.asarray(inv), np.asarray(ffi.cpu_invert(exact, n)[0]))
  # Leading axes.
  both = np.stack([nbr, exact])
  inv2, uniq2 = ffi.cuda_invert(jnp.asarray(both), n)
  np.testing.assert_array_equal(np.asarray(inv2), np.asarray(ffi.cpu_invert(both, n)[0]))
  assert list(np.asarray(uniq2)) == [False, True]


def _raw(results, *args):
  call = jax.ffi.ffi_call("jsc_neighbors", tuple(jax.ShapeDtypeStruct(*r) for r in results))
  return jax.block_until_ready(call(*args))


def test_malformed_calls_raise(rng):
  coords, batch = compact_cloud(rng, 50, extent=6)
  valid = np.ones(50, bool)
  good = list(_args(coords, batch, valid, coords[:40], batch[:40], valid[:40], DELTAS["3x3x3"]))
  res = [((40, 27), jnp.int32), ((), jnp.bool_), ((128, 4), jnp.int32)]
  _raw(res, *good)
  for table in ((50, 4), (96, 4), (128, 3)):  # not above N, not a power of two, not 4 words
    with pytest.raises(Exception, match="power of two|inconsistent shapes"):
      _raw([*res[:2], (table, jnp.int32)], *good)
  args = list(good)
  args[0] = jnp.zeros((50, 2), jnp.int32)
  with pytest.raises(Exception, match="inconsistent shapes"):
    _raw(res, *args)
  with pytest.raises(Exception, match="inconsistent shapes"):
    _raw([((40, 26), jnp.int32), *res[1:]], *good)


_RERUN = """
import sys
import pytest
from jax_sparseconv._src import ffi
assert ffi.host.shim_mode() == "interleave", ffi.host.shim_mode()
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-x", "-k", "not interleaved",
                      sys.argv[1]]))
"""


def test_search_tests_pass_interleaved():
  """This file's tests in a fresh process with JSC_SHIM_MODE=interleave: every thread
  steps aside before and after each atomic, so the insertions of a block interleave
  (claims racing for an entry, a voxel's copies meeting an entry whose key is not yet
  written) and the tables must still be exact."""
  env = {**os.environ, "JSC_SHIM_MODE": "interleave"}
  env.pop("PYTEST_XDIST_WORKER", None)
  result = subprocess.run([sys.executable, "-c", _RERUN, __file__], cwd=os.getcwd(), env=env,
                          capture_output=True, text=True, timeout=900)
  tail = (result.stdout + result.stderr)[-3000:]
  assert result.returncode == 0, tail
  assert int(re.search(r"(\d+) passed", result.stdout).group(1)) >= 12, tail
