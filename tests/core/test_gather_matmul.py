"""The conv's inner ops (`_src/gather_matmul.py` and the kernels behind it), op by op,
against NumPy loops.

"kernels" is ffi/conv_cuda.cu: on a CPU-only machine the host build of the CUDA source
(the shim), on a GPU the CUDA build. "cpu" is the native CPU kernel (ffi/conv_cpu.cc,
float32), "jnp" the jnp implementation. Sizes straddle the 64 x 64 tiles (and the CPU
kernel's 64-column and 8-column blocks), maps have absent entries, out-of-range entries
and slots with no neighbour in a whole tile (the skipped tiles).
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
from jax_sparseconv._src import backend, ffi
from tests.helpers import (TOLS, kernel_inputs as _inputs, lattice_cloud, loop_gather_matmul,
                           loop_weight_grad, random_map, rel_err, x64)





@pytest.fixture
def on_kernels():
  previous = backend.set_kernel_backend("host")
  yield
  backend.set_kernel_backend(previous)



def _jnp_gather_matmul(x, w, nbr, dtype):
  nbr = jnp.where((nbr < 0) | (nbr > x.shape[0]), x.shape[0], nbr)  # jnp wants the sentinel
  return gm.gather_matmul_jnp(x, w, nbr, dtype)



def _skip_unless_cpu_float32(dtype):
  assert dtype == jnp.float32
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")



def _cpu_gather_matmul(x, w, nbr, dtype):
  _skip_unless_cpu_float32(dtype)
  return ffi.cpu_gather_matmul(x, w, nbr)



IMPLS = {"kernels": ffi.gather_matmul, "cpu": _cpu_gather_matmul, "jnp": _jnp_gather_matmul}



def impl_dtype_params(impls, dtypes):
  """(impl, dtype) pairs: the native CPU kernels only in float32."""
  return [(i, d) for i in impls for d in dtypes if i != "cpu" or d == "float32"]



@pytest.mark.parametrize("impl,dtype",
                         impl_dtype_params(IMPLS, ["float32", "float64", "bfloat16", "float16"]))
@pytest.mark.parametrize("shape", [(150, 131, 5, 70, 90), (70, 65, 3, 33, 17), (40, 20, 27, 3, 4),
                                   (9, 64, 1, 1, 64), (30, 0, 8, 4, 5), (0, 12, 8, 4, 5),
                                   (2000, 1100, 7, 9, 133)],
                         ids=["tiles", "k_edge", "small", "one_slot", "no_outputs", "no_inputs",
                              "threads"])
def test_gather_matmul_matches_loop(rng, on_kernels, impl, dtype, shape):
  n, m, s, cin, cout = shape
  x, w = _inputs(rng, dtype, n, m, s, cin, cout)
  nbr = random_map(rng, n, m, s)
  with x64():
    out = IMPLS[impl](jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(nbr),
                      jnp.dtype(dtype))
    assert out.dtype == jnp.dtype(dtype) and out.shape == (m, cout)
    expect = loop_gather_matmul(x.astype(np.float64), w.astype(np.float64), nbr)
    assert rel_err(np.asarray(out, np.float64), expect) < TOLS[dtype]



def _cpu_weight_grad(x, ct, nbr, dtype):
  _skip_unless_cpu_float32(dtype)
  return ffi.cpu_weight_grad(x, ct, nbr)



def _jnp_weight_grad(x, ct, nbr, dtype):
  nbr = jnp.where((nbr < 0) | (nbr > x.shape[0]), x.shape[0], nbr)
  return gm.weight_grad_jnp(x, ct, nbr, dtype)



GRAD_IMPLS = {"kernels": ffi.weight_grad, "cpu": _cpu_weight_grad, "jnp": _jnp_weight_grad}



@pytest.mark.parametrize("impl,dtype",
                         impl_dtype_params(GRAD_IMPLS, ["float32", "float64", "bfloat16"]))
@pytest.mark.parametrize("shape,parts", [((90, 150, 4, 70, 66), 1), ((90, 150, 4, 70, 66), 3),
                                         ((300, 2100, 5, 7, 21), 1)],
                         ids=["tiles", "partitions", "threads"])
def test_weight_grad_matches_loop(rng, on_kernels, monkeypatch, impl, dtype, shape, parts):
  n, m, s, cin, cout = shape
  x = _inputs(rng, dtype, n, m, 1, cin, cout)[0]
  nbr = random_map(rng, n, m, s)
  monkeypatch.setattr(ffi, "num_partitions", lambda *a: parts)
  with x64():
    ct = np.asarray(jnp.asarray(rng.standard_normal((m, cout)), dtype), np.float64)
    dw = GRAD_IMPLS[impl](jnp.asarray(x, dtype), jnp.asarray(ct, dtype), jnp.asarray(nbr),
                          jnp.dtype(dtype))
    expect = loop_weight_grad(x.astype(np.float64), ct, nbr)
    assert dw.shape == (s, cin, cout)
    assert rel_err(np.asarray(dw, np.float64), expect) < TOLS[dtype] * (4 if parts > 1 else 1)



def test_partitions_depend_on_shapes_only():
  assert ffi.num_partitions(10, 27, 64, 64) == 1
  big = ffi.num_partitions(1_000_000, 27, 64, 64)
  assert big == ffi.num_partitions(1_000_000, 27, 64, 64) > 1
  assert big * 27 * 64 * 64 <= ffi.PARTIAL_ELEMS
  assert ffi.num_partitions(10**7, 125, 256, 256) >= 1



def test_results_are_bitwise_reproducible(rng, on_kernels):
  n, m, s, cin, cout = 2000, 1800, 27, 32, 48
  x, w = _inputs(rng, "float32", n, m, s, cin, cout)
  nbr = jnp.asarray(random_map(rng, n, m, s))
  ct = jnp.asarray(rng.standard_normal((m, cout)), jnp.float32)
  native = jax.default_backend() == "cpu"
  f = jax.jit(lambda x, w: (ffi.gather_matmul(x, w, nbr, jnp.float32),
                            ffi.weight_grad(x, ct, nbr, jnp.float32),
                            *((ffi.cpu_gather_matmul(x, w, nbr),
                               ffi.cpu_weight_grad(x, ct, nbr)) if native else ())))
  first = f(jnp.asarray(x), jnp.asarray(w))
  for _ in range(2):
    again = f(jnp.asarray(x), jnp.asarray(w))
    for a, b in zip(first, again):
      assert np.array_equal(np.asarray(a), np.asarray(b))



def test_primitive_grads_through_kernels_match_jnp(rng):
  """value, jvp and vjp of the primitives: kernels and jnp agree (float64)."""
  n, m, s, cin, cout = 60, 50, 8, 5, 6
  with x64():
    x = jnp.asarray(rng.standard_normal((n, cin)))
    w = jnp.asarray(rng.standard_normal((s, cin, cout)))
    nbr_np = random_map(rng, n, m, s)
    nbr_np[(nbr_np < 0) | (nbr_np > n)] = n
    nbr = jnp.asarray(nbr_np)
    inv = jnp.full((n, s), m, jnp.int32)  # not an inverse: the scatter fallback
    uniq = jnp.asarray(False)

    def f(x, w):
      y = gm.gather_matmul(x, w, nbr, inv, uniq, jnp.float64)
      return jnp.sum(jnp.sin(y)) + jnp.sum(gm.weight_grad(x, y, nbr, inv, uniq, jnp.float64)**2)

    results = {}
    for name in ("jnp", "host"):
      previous = backend.set_kernel_backend(name)
      try:
        val, grads = jax.value_and_grad(f, argnums=(0, 1))(x, w)
        _, tan = jax.jvp(f, (x, w), (jnp.ones_like(x), jnp.ones_like(w)))
        results[name] = (val, *grads, tan)
      finally:
        backend.set_kernel_backend(previous)
    for a, b in zip(results["host"], results["jnp"]):
      assert rel_err(a, b) < 1e-10



def test_handler_checks_declared_result_shape(on_kernels):
  """XLA does not check the result shape an ffi_call declares; the handler does."""
  x = jnp.ones((4, 3), jnp.float32)
  w = jnp.ones((2, 3, 5), jnp.float32)
  nbr = jnp.zeros((6, 2), jnp.int32)
  bad = jax.ffi.ffi_call("jsc_gather_matmul", jax.ShapeDtypeStruct((6, 4), jnp.float32))
  with pytest.raises(Exception, match="inconsistent shapes"):
    jax.block_until_ready(bad(x, w, nbr))
  mixed = jax.ffi.ffi_call("jsc_gather_matmul", jax.ShapeDtypeStruct((6, 5), jnp.float32))
  with pytest.raises(Exception, match="share one dtype"):
    jax.block_until_ready(mixed(x, w.astype(jnp.float16), nbr))



_ONE_THREAD = """
import sys, numpy as np, jax.numpy as jnp
from jax_sparseconv._src import ffi
d = np.load(sys.argv[1])
x, w, ct, nbr = (jnp.asarray(d[k]) for k in ("x", "w", "ct", "nbr"))
np.savez(sys.argv[2], y=ffi.cpu_gather_matmul(x, w, nbr), dw=ffi.cpu_weight_grad(x, ct, nbr))
"""



@pytest.mark.parametrize("env", [{"JAX_SPARSECONV_CPU_THREADS": "1"},
                                 {"JAX_SPARSECONV_NO_AVX512": "1"}], ids=["one thread", "avx2"])
def test_cpu_kernels_do_not_depend_on_the_thread_count(rng, tmp_path, env):
  """Bitwise the same with every thread available and with JAX_SPARSECONV_CPU_THREADS=1,
  and with the AVX-512 micro-kernels and without (JAX_SPARSECONV_NO_AVX512: AVX2 only;
  Cout = 92 takes the 64-, 16- and 8-column blocks and a scalar tail of 4)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  import subprocess
  import sys
  n, m, s, cin, cout = 3000, 3000, 27, 16, 92
  x, w = _inputs(rng, "float32", n, m, s, cin, cout)
  ct = rng.standard_normal((m, cout)).astype(np.float32)
  nbr = random_map(rng, n, m, s)
  np.savez(tmp_path / "in.npz", x=x, w=w, ct=ct, nbr=nbr)
  subprocess.run([sys.executable, "-c", _ONE_THREAD, str(tmp_path / "in.npz"),
                  str(tmp_path / "out.npz")], check=True,
                 env={**os.environ, **env})
  one = np.load(tmp_path / "out.npz")
  y = ffi.cpu_gather_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(nbr))
  dw = ffi.cpu_weight_grad(jnp.asarray(x), jnp.asarray(ct), jnp.asarray(nbr))
  assert np.array_equal(np.asarray(y), one["y"]) and np.array_equal(np.asarray(dw), one["dw"])

