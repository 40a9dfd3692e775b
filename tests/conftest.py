"""Fixtures shared by every test folder; helpers are in ``tests/helpers.py``."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tests.helpers import KERNEL_BACKENDS, SEED


def pytest_report_header(config):
  return f"jax_sparseconv random seed: JSC_TEST_SEED={SEED}"


@pytest.fixture
def rng(request):
  return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(scope="module", params=KERNEL_BACKENDS)
def kernel_backend(request):
  """Runs a module's tests once per backend of ``KERNEL_BACKENDS``."""
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
