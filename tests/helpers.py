"""Shared test helpers: paths, random lattice clouds, the x64 context, tolerances, the
per-run seed, the kernel backends the conv modules run under, random kernel maps and the
NumPy loops the kernels are checked against. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "tests" / "data"
SCRIPTS_DIR = ROOT / "tests" / "scripts"
GOLDEN_DIR = DATA_DIR / "golden"

# Fresh random inputs on every run; rerun a failure with JSC_TEST_SEED=<the seed in the header>.
SEED = int(os.environ.get("JSC_TEST_SEED", secrets.randbits(32)))

# The conv modules run under two backends. On the CPU: "auto" (what users get: the native
# CPU kernel for float32, jnp for the other dtypes) and "host" (the CUDA kernels' source
# compiled for the host). On a GPU: "jnp" and "auto" (the CUDA kernels).
KERNEL_BACKENDS = ["jnp", "auto"] if jax.default_backend() == "gpu" else ["auto", "host"]

#: Tolerances of the kernels against float64 loops, by dtype.
TOLS = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 1.5e-2, "float16": 2e-3}


def x64():
  """Context manager enabling float64 (``jax.enable_x64`` or the older experimental one)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # older jax
  return enable_x64()


def lattice_cloud(rng, n, extent=8, voxel_size=0.3, centres=True, origin=0.0):
  """``n`` distinct random points of an ``extent**3`` grid, on centres or corners."""
  n = min(n, extent**3)
  flat = rng.choice(extent**3, size=n, replace=False)
  idx = np.stack(np.unravel_index(flat, (extent,) * 3), axis=1).astype(np.float64)
  pos = (idx + (0.5 if centres else 0.0)) * voxel_size + origin
  return pos.astype(np.float32)


def rel_err(a, b):
  """Largest absolute difference relative to the largest magnitude of ``b``."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30))


def map_as_sets(km):
  """A kernel map's neighbour table as sorted input lists per output."""
  nbr = np.asarray(km.neighbors)
  return [sorted(int(i) for i in row if i < km.num_in) for row in nbr]


@contextlib.contextmanager
def small_chunks(monkeypatch, rows):
  """Forces the chunked (``lax.map``) conv path with ``rows`` outputs per chunk."""
  from jax_sparseconv._src import gather_matmul as conv
  monkeypatch.setattr(conv, "MIN_CHUNK_ROWS", rows)
  monkeypatch.setattr(conv, "MAX_CHUNK_ROWS", rows)
  jax.clear_caches()  # compiled programs baked in the old chunk size
  yield
  jax.clear_caches()


def random_map(rng, n, m, s, absent=0.5):
  """A random neighbour table with absent, out-of-range and whole-tile-empty entries."""
  nbr = rng.integers(0, max(n, 1), size=(m, s))  # n == 0: every entry absent
  nbr[rng.random((m, s)) < absent] = n  # the sentinel
  nbr[rng.random((m, s)) < 0.05] = -3   # out of range: also "no neighbour"
  nbr[rng.random((m, s)) < 0.05] = n + 7
  if m > 70 and s > 2:
    nbr[:70, 1] = n  # slot 1 empty for the first 64-row tile: skipped
  return nbr.astype(np.int32)


def loop_gather_matmul(x, w, nbr):
  """``y[m] = sum_s x[nbr[m, s]] @ w[s]`` over in-range entries, a plain loop."""
  n = x.shape[0]
  y = np.zeros((nbr.shape[0], w.shape[2]))
  for m in range(nbr.shape[0]):
    for s in range(nbr.shape[1]):
      j = nbr[m, s]
      if 0 <= j < n:
        y[m] += x[j] @ w[s]
  return y


def loop_weight_grad(x, ct, nbr):
  """``dw[s] = sum_m x[nbr[m, s]]^T ct[m]``, a plain loop."""
  n = x.shape[0]
  dw = np.zeros((nbr.shape[1], x.shape[1], ct.shape[1]))
  for m in range(nbr.shape[0]):
    for s in range(nbr.shape[1]):
      j = nbr[m, s]
      if 0 <= j < n:
        dw[s] += np.outer(x[j], ct[m])
  return dw


def kernel_inputs(rng, dtype, n, m, s, cin, cout):
  """Random ``x (n, cin)`` and ``w (s, cin, cout)``, rounded as the kernel sees them."""
  x = rng.standard_normal((n, cin)).astype(np.float32)
  w = rng.standard_normal((s, cin, cout)).astype(np.float32)
  if dtype in ("bfloat16", "float16"):
    x = np.asarray(jnp.asarray(x, dtype), np.float32)
    w = np.asarray(jnp.asarray(w, dtype), np.float32)
  return x, w
