"""The host shim (ffi/cuda_host_shim.h) on tiny kernels compiled here with the C++ compiler:
block barriers, __syncthreads_or, shared memory per block, and the abort on a divergent
barrier (the GPU bug the shim must turn into a failure, not a silent pass)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

FFI = pathlib.Path(__file__).resolve().parents[2] / "ffi"
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

PROGRAM = r"""
#include "cuda_host_shim.h"
#include <cstdio>

// Reverses each block's slice through shared memory: wrong without the barrier.
__global__ void reverse(const int* in, int* out, int* any_odd) {
  __shared__ int tile[64];
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  tile[t] = in[base + t];
  __syncthreads();
  out[base + t] = tile[blockDim.x - 1 - t];
  const int odd = __syncthreads_or(in[base + t] % 2 != 0);
  if (t == 0) any_odd[blockIdx.x] = odd;
}

// Thread 0 leaves before the barrier the others wait at.
__global__ void divergent(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

int main(int argc, char**) {
  int in[128], out[128], odd[2], bad = 0;
  for (int i = 0; i < 128; ++i) in[i] = i < 64 ? 2 * i : i;
  JSC_LAUNCH(reverse, dim3(2), dim3(64), 0, in, out, odd);
  for (int i = 0; i < 128; ++i) bad += out[i] != in[(i / 64) * 64 + 63 - i % 64];
  std::printf("mismatches %d any_odd %d %d\n", bad, odd[0], odd[1]);
  if (argc > 1) JSC_LAUNCH(divergent, dim3(1), dim3(32), 0, out);
  return bad;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
  d = tmp_path_factory.mktemp("shim")
  (d / "main.cc").write_text(PROGRAM)
  exe = d / "main"
  subprocess.run([CXX, "-std=c++17", "-O1", f"-I{FFI}", str(d / "main.cc"), "-o", str(exe)],
                 check=True, capture_output=True, text=True)
  return exe


def test_barriers_shared_memory_and_syncthreads_or(program):
  run = subprocess.run([str(program)], capture_output=True, text=True)
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stdout.strip() == "mismatches 0 any_odd 0 1"


def test_divergent_barrier_aborts(program):
  run = subprocess.run([str(program), "divergent"], capture_output=True, text=True)
  assert run.returncode != 0
  assert "divergent __syncthreads" in run.stderr


# ------------------------------------------------------------------ kernel paths
# Shapes that tests/core/test_gather_matmul.py does not reach: more slots than one shared-memory
# neighbour block holds (32: the gather-matmul reads them in chunks), with whole chunks
# empty for a tile, through the host build of ffi/conv_cuda.cu.


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("s", [33, 70])
def test_gather_matmul_kernel_over_several_neighbour_blocks(rng, dtype, s):
  import jax.numpy as jnp
  import numpy as np

  from jax_sparseconv._src import backend, ffi
  from tests.helpers import rel_err, x64
  from tests.helpers import TOLS, kernel_inputs as _inputs, loop_gather_matmul, random_map
  if ffi.host is None:
    pytest.skip("no host build")
  n, m, cin, cout = 90, 140, 20, 70
  x, w = _inputs(rng, dtype, n, m, s, cin, cout)
  nbr = random_map(rng, n, m, s, absent=0.8)
  nbr[:64, 32:64] = n  # the first tile: the whole second block of slots empty
  nbr[64:128, :32] = -1  # the second tile: the whole first block empty
  previous = backend.set_kernel_backend("host")
  try:
    with x64():
      out = ffi.gather_matmul(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(nbr),
                              jnp.dtype(dtype))
      expect = loop_gather_matmul(x.astype(np.float64), w.astype(np.float64), nbr)
      assert rel_err(np.asarray(out, np.float64), expect) < TOLS[dtype]
  finally:
    backend.set_kernel_backend(previous)


# Row lengths that take each copy of the tensor-core kernels: 16-byte loads of x's rows
# (Cin % 8 == 0) and of w's / the cotangent's (Cout % 8 == 0), both, or neither (2-byte
# loads); 72 = a whole number of 16-byte pieces but not of 64-wide tiles. The shim aborts on
# a 16-byte load from an address that is not 16-byte aligned, so a wrong copy choice fails.
# At compute capability 9.0 both half types take the tensor cores; at 7.5 bfloat16 takes the
# CUDA cores (issue 22: the tensor-core weight gradient, 16-byte loads where Cin % 8 == 0).
@pytest.mark.parametrize("cc", ["90", "75"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cin,cout", [(64, 64), (72, 40), (16, 70), (70, 24), (5, 9)],
                         ids=["vec-both", "vec-both-72", "vec-x", "vec-w", "none"])
def test_half_kernels_on_every_copy_path(rng, monkeypatch, cc, dtype, cin, cout):
  import jax.numpy as jnp
  import numpy as np

  from jax_sparseconv._src import backend, ffi
  from tests.helpers import kernel_inputs, loop_gather_matmul, loop_weight_grad, random_map
  from tests.helpers import rel_err
  if ffi.host is None:
    pytest.skip("no host build")
  if cc == "75" and dtype == "float16":
    pytest.skip("float16 takes the tensor cores at any compute capability")
  monkeypatch.setenv("JSC_SHIM_CC", cc)
  n, m, s = 100, 130, 5
  x, w = kernel_inputs(rng, dtype, n, m, s, cin, cout)
  ct = np.asarray(jnp.asarray(rng.standard_normal((m, cout)), dtype), np.float32)
  nbr = random_map(rng, n, m, s)
  tol = 1.5e-2 if dtype == "bfloat16" else 2e-3
  previous = backend.set_kernel_backend("host")
  try:
    y = ffi.gather_matmul(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(nbr),
                          jnp.dtype(dtype))
    dw = ffi.weight_grad(jnp.asarray(x, dtype), jnp.asarray(ct, dtype), jnp.asarray(nbr),
                         jnp.dtype(dtype))
  finally:
    backend.set_kernel_backend(previous)
  f64 = lambda a: np.asarray(a, np.float64)
  assert rel_err(f64(y), loop_gather_matmul(f64(x), f64(w), nbr)) < tol
  assert rel_err(f64(dw), loop_weight_grad(f64(x), f64(ct), nbr)) < tol
