"""Shared test helpers: random lattice clouds, x64 context, tolerances, the per-test seed, the
kernel-backend and error-mode fixtures, and where the golden cases lie."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import zlib

import jax
import numpy as np
import pytest

GOLDEN_DIR = pathlib.Path(__file__).parent / "data" / "golden"


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
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30))


# Fresh random inputs on every run; rerun a failure with JSC_TEST_SEED=<the seed in the header>.
SEED = int(os.environ.get("JSC_TEST_SEED", secrets.randbits(32)))


def pytest_report_header(config):
  return f"jax_sparseconv random seed: JSC_TEST_SEED={SEED}"


@pytest.fixture
def rng(request):
  return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])


@contextlib.contextmanager
def small_chunks(monkeypatch, rows):
  """Forces the chunked (``lax.map``) conv path with ``rows`` outputs per chunk."""
  from jax_sparseconv._src import gather_matmul as conv
  monkeypatch.setattr(conv, "MIN_CHUNK_ROWS", rows)
  monkeypatch.setattr(conv, "MAX_CHUNK_ROWS", rows)
  jax.clear_caches()  # compiled programs baked in the old chunk size
  yield
  jax.clear_caches()


# The conv modules run under two backends. On the CPU: "auto" (what users get: the native
# CPU kernel for float32, jnp for the other dtypes) and "host" (the CUDA kernels' source
# compiled for the host). On a GPU: "jnp" and "auto" (the CUDA kernels).
KERNEL_BACKENDS = ["jnp", "auto"] if jax.default_backend() == "gpu" else ["auto", "host"]


@pytest.fixture(scope="module", params=KERNEL_BACKENDS)
def kernel_backend(request):
  """Runs a module's tests once per backend of ``KERNEL_BACKENDS``. Module scope: one
  cache clear per switch."""
  import jax_sparseconv as sc
  previous = sc.set_kernel_backend(request.param)
  yield request.param
  sc.set_kernel_backend(previous)


@pytest.fixture
def flag_errors():
  """Error mode "flag" (no raising host callback under jit): flags and NaN poison only."""
  import jax_sparseconv as sc
  previous = sc.set_error_mode("flag")
  yield
  sc.set_error_mode(previous)
