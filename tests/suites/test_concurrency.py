"""Concurrency: Python threads calling jitted and eager functions at once (the native
kernels start their own threads per call) give the sequential results bitwise; a native
kernel called from inside a ``jax.pure_callback``, or from two jitted programs running at
once, does not deadlock (``tests/scripts/conc_nested.py`` in a subprocess with a timeout,
so a deadlock fails the test instead of hanging CI)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc

from tests.helpers import lattice_cloud

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "conc_nested.py"


@pytest.mark.parametrize("backend", ["auto", "jnp"])
def test_threads_match_sequential_calls(backend):
  rng = np.random.default_rng(3)
  clouds = [lattice_cloud(rng, 1200, extent=14, voxel_size=0.5) for _ in range(3)]
  feats = [rng.standard_normal((len(p), 4)).astype(np.float32) for p in clouds]
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 4)), jnp.float32)
  grad = jax.jit(jax.grad(lambda k, f, p: jnp.sum(
      sc.sparse_conv({"kernel": k}, f, p, p, 0.5) ** 2), argnums=(0, 1)))

  def work(i):
    km = sc.build_kernel_map(clouds[i], clouds[i], 0.5, 3)  # eager
    y = sc.sparse_conv({"kernel": kernel}, feats[i], clouds[i], clouds[i], 0.5, kernel_map=km)
    dk, df = grad(kernel, feats[i], clouds[i])  # jitted
    return [np.asarray(a) for a in (km.neighbors, y, dk, df)]

  previous = sc.set_kernel_backend(backend)
  try:
    want = [work(i) for i in range(3)]
    with cf.ThreadPoolExecutor(6) as pool:
      futures = [pool.submit(work, i % 3) for i in range(12)]
      got = [f.result(timeout=240) for f in futures]
  finally:
    sc.set_kernel_backend(previous)
  for k, g in enumerate(got):
    for a, b in zip(g, want[k % 3]):
      assert np.array_equal(a, b)


def test_no_deadlock_in_callbacks_or_concurrent_programs():
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                        timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
      (proc.stdout + proc.stderr)[-3000:]
