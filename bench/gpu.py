"""GPU benchmark of the CUDA kernels: ``python3 bench/gpu.py`` (one command).

Steps (each can be skipped): (1) install this checkout without network access
(``pip install --no-build-isolation --no-deps -e .`` with ``JSC_CUDA=ON``: the CUDA
kernels must build); (2) run the test suite, whose conv modules run through both the jnp
path and the CUDA kernels; (3) time, for surface voxel clouds of N = 100k and 1M
(K = 3 submanifold, ~15 neighbours per voxel), C = 32 / 64 / 128 (Cin = Cout), float32
and bfloat16:

* forward ``y = sum_s x[nbr[:, s]] @ W[s]`` with a reused kernel map, and backward
  (feature gradient through the inverse map + kernel gradient), in milliseconds;
* useful TFLOP/s (2 * pairs * Cin * Cout per product; backward does two) and the bytes
  that must move (features in and out, kernel, map) in GB/s;
* the roofline bound ``max(flops / matmul rate, bytes / copy bandwidth)`` from a dense
  matmul and a device copy measured in the same run, and the kernel's time over it;
* the jnp path on the same device, and the ratio.

Medians over ``--repeats`` after a warm-up; timing synchronises with
``block_until_ready``. On a machine without a GPU, ``--sizes 2000 --skip-install
--skip-tests`` runs the same code through the host build of the kernels (a smoke test of
this script, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def install():
  import jaxlib
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
         "-e", str(ROOT), "-C", "cmake.define.JSC_CUDA=ON"]
  if tuple(int(v) for v in jaxlib.__version__.split(".")[:3]) > (0, 11, 2):
    # Headers of this jaxlib only (no network for 0.11.2's): fine for use on this machine.
    cmd += ["-C", "cmake.define.JSC_ALLOW_NEWER_FFI=ON"]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def run_tests():
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "4", str(ROOT / "tests")]
  print("+", " ".join(cmd), flush=True)
  return subprocess.run(cmd, cwd=ROOT).returncode


def rooflines(repeats):
  """Dense matmul rate (float32 and bfloat16) and device-copy bandwidth, measured."""
  from run import median_ms
  rates = {}
  n = 8192 if jax.default_backend() == "gpu" else 512
  for dt in (jnp.float32, jnp.bfloat16):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    ms = median_ms(jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32)), a,
                   repeats=repeats)
    rates[jnp.dtype(dt).name] = 2 * n**3 / (ms * 1e-3)
  size = 2**28 if jax.default_backend() == "gpu" else 2**22
  x = jax.random.normal(jax.random.key(1), (size,), jnp.float32)
  ms = median_ms(jax.jit(lambda x: x * 1.0001), x, repeats=repeats)
  return rates, 2 * 4 * size / (ms * 1e-3)


def case(n_vox, c, dtype, backend, repeats, km):
  from run import median_ms
  import jax_sparseconv as sc
  from jax_sparseconv._src import gather_matmul as gm
  sc.set_kernel_backend(backend)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((km.num_in, c)), dtype)
  w = jnp.asarray(rng.standard_normal((km.neighbors.shape[1], c, c)) / np.sqrt(27 * c), dtype)
  ct = jnp.asarray(rng.standard_normal((km.neighbors.shape[0], c)), dtype)
  maps = (km.neighbors, km.inverse, km.out_unique)  # arguments, never jit constants

  def conv(x, w, maps):
    return gm.gather_matmul(x, w, *maps, dtype)

  fwd = jax.jit(conv)

  @jax.jit
  def bwd(x, w, ct, maps):
    return jax.vjp(lambda x, w: conv(x, w, maps), x, w)[1](ct)

  y = fwd(x, w, maps)
  return (y, median_ms(fwd, x, w, maps, repeats=repeats),
          median_ms(bwd, x, w, ct, maps, repeats=repeats))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
  ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--skip-install", action="store_true")
  ap.add_argument("--skip-tests", action="store_true")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args()
  if not args.skip_install:
    install()
  if not args.skip_tests and run_tests() != 0:
    sys.exit("tests failed: no timings")

  import jax_sparseconv as sc
  from jax_sparseconv import scenes
  on_gpu = jax.default_backend() == "gpu"
  kernels_backend = "auto" if on_gpu else "host"
  builds = sc.kernel_builds()
  if on_gpu and not builds["cuda"]:
    sys.exit("no CUDA build of the kernels: install with nvcc (JSC_CUDA=ON)")
  device = jax.devices()[0].device_kind
  rates, bw = rooflines(max(5, args.repeats // 2))
  lines = [f"device: {device} ({jax.default_backend()}); kernels: "
           f"{'CUDA' if on_gpu else 'host build (smoke test, not a measurement)'}; "
           f"jax {jax.__version__}",
           f"rooflines measured here: matmul float32 {rates['float32'] / 1e12:.1f} TFLOP/s, "
           f"bfloat16 {rates['bfloat16'] / 1e12:.1f} TFLOP/s; copy {bw / 1e9:.0f} GB/s", "",
           "| N | C | dtype | pairs | fwd ms | fwd TFLOP/s | fwd GB/s | fwd / roofline | "
           "bwd ms | bwd TFLOP/s | jnp fwd ms | jnp bwd ms | fwd speed-up | bwd speed-up |",
           "|" + "---|" * 14]
  print("\n".join(lines), flush=True)
  for n_vox in args.sizes:
    pos = scenes.surface_voxels(n_vox, 0.05, 0)
    km = sc.build_kernel_map(pos, pos, 0.05, 3)
    pairs = int(jnp.sum(km.neighbors < km.num_in))
    for c in args.channels:
      for dtype in (jnp.float32, jnp.bfloat16):
        item = jnp.dtype(dtype).itemsize
        y_k, fwd_ms, bwd_ms = case(n_vox, c, dtype, kernels_backend, args.repeats, km)
        y_j, jfwd_ms, jbwd_ms = case(n_vox, c, dtype, "jnp", args.repeats, km)
        err = float(jnp.linalg.norm((y_k - y_j).astype(jnp.float32)) /
                    jnp.linalg.norm(y_j.astype(jnp.float32)))
        if not err < (1e-5 if dtype == jnp.float32 else 2e-2):
          sys.exit(f"kernel and jnp results differ: rel. error {err:.2e}")
        flops = 2.0 * pairs * c * c
        nbytes = (km.num_in + len(pos)) * c * item + 27 * c * c * item + km.neighbors.size * 4
        bound = max(flops / rates[jnp.dtype(dtype).name], nbytes / bw)
        row = (f"| {len(pos)} | {c} | {jnp.dtype(dtype).name} | {pairs} | {fwd_ms:.3f} | "
               f"{flops / fwd_ms / 1e9:.1f} | {nbytes / fwd_ms / 1e6:.0f} | "
               f"{fwd_ms * 1e-3 / bound:.1f}x | {bwd_ms:.3f} | {2 * flops / bwd_ms / 1e9:.1f} | "
               f"{jfwd_ms:.3f} | {jbwd_ms:.3f} | {jfwd_ms / fwd_ms:.1f}x | "
               f"{jbwd_ms / bwd_ms:.1f}x |")
        lines.append(row)
        print(row, flush=True)
  sc.set_kernel_backend("auto")
  out = pathlib.Path(args.out) / "gpu_results.md"
  out.write_text("\n".join(lines) + "\n")
  print(f"table written to {out}")


if __name__ == "__main__":
  main()
