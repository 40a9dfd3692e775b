"""Memory limits (issue 12): a kernel map that cannot fit, or a compiled step whose
predicted peak exceeds the limit, is a ResourceLimitError before anything is allocated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv._src import memory


def _cloud(n=50, seed=0):
  idx = np.random.default_rng(seed).choice(20**3, n, replace=False)
  ijk = np.stack(np.unravel_index(idx, (20, 20, 20)), -1)
  return jnp.asarray((ijk + 0.5) * 0.1, jnp.float32)


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("100", 100), ("1.5G", 1.5e9),
                                           ("3mb", 3e6), ("2 KiB", 2048), ("7B", 7)])
def test_parse_bytes(text, expected):
  assert memory._parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text", ["lots", "12 parsecs", ""])
def test_parse_bytes_rejects(text):
  with pytest.raises(ValueError, match="JAX_SPARSECONV_MEMORY_LIMIT"):
    memory._parse_bytes(text)


def test_available_bytes_is_the_machine_or_the_override(monkeypatch):
  monkeypatch.delenv("JAX_SPARSECONV_MEMORY_LIMIT", raising=False)
  total = memory.available_bytes()
  assert total is not None and total > 2**28  # the CPU's memory, at least 256 MiB
  monkeypatch.setenv("JAX_SPARSECONV_MEMORY_LIMIT", "3MiB")
  assert memory.available_bytes() == 3 * 2**20


def test_kernel_map_too_large_is_refused_at_trace_time(monkeypatch):
  pos = _cloud()
  km = sc.build_kernel_map(pos, pos, 0.1, 3)  # fits: no error without a limit
  assert km.neighbors.shape == (50, 27)
  need = memory.kernel_map_bytes(50, 50, 27)
  monkeypatch.setenv("JAX_SPARSECONV_MEMORY_LIMIT", str(need - 1))
  with pytest.raises(sc.ResourceLimitError, match=r"build_kernel_map: a map of 50 outputs x 27 slots over 50 inputs"):
    sc.build_kernel_map(pos, pos, 0.1, 3)
  # Under jit the error comes from tracing (lower), before anything runs or is allocated.
  with pytest.raises(sc.ResourceLimitError):
    jax.jit(lambda p: sc.sparse_conv({"kernel": jnp.ones((3, 3, 3, 1, 1))}, jnp.ones((50, 1)),
                                     p, p, 0.1)).lower(pos)
  monkeypatch.setenv("JAX_SPARSECONV_MEMORY_LIMIT", str(need))
  assert sc.build_kernel_map(pos, pos, 0.1, 3).neighbors.shape == (50, 27)  # exactly fits
  assert issubclass(sc.ResourceLimitError, MemoryError)


def test_compile_checked_refuses_a_step_predicted_too_large():
  pos, feats = _cloud(), jnp.ones((50, 8))
  params = {"kernel": jnp.full((3, 3, 3, 8, 8), 0.01), "bias": jnp.zeros(8)}
  step = jax.value_and_grad(lambda p, f, x: jnp.sum(sc.sparse_conv(p, f, x, x, 0.1) ** 2))
  compiled = sc.compile_checked(step, params, feats, pos)
  value, grads = compiled(params, feats, pos)
  ref_value, ref_grads = jax.jit(step)(params, feats, pos)
  np.testing.assert_array_equal(value, ref_value)
  np.testing.assert_array_equal(grads["kernel"], ref_grads["kernel"])
  peak = memory.predicted_peak_bytes(compiled)
  # At least the arguments and the outputs (the features, the kernel and its gradient).
  assert peak >= 4 * (50 * 8 + 2 * 27 * 64 + 50 * 3)
  with pytest.raises(sc.ResourceLimitError, match="XLA predicts a peak of"):
    sc.compile_checked(step, params, feats, pos, limit_bytes=peak - 1)
  assert sc.compile_checked(jax.jit(step), params, feats, pos, limit_bytes=peak) is not None
