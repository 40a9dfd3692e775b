"""What tests/test_determinism.py compares: one fixed problem's kernel map, conv forward and
gradients, under a kernel backend, computed several ways (jit, eager, vmap vs a loop, the
scatter fallback of duplicated outputs).

``python det_compute.py OUT.npz BACKEND...`` writes every backend's results (the test runs it
with another ``$JAX_SPARSECONV_CPU_THREADS``, which the native kernels read once a process).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc

CIN, COUT, VS = 8, 8, 0.5
# >= 1024 rows, so that the native kernels use 2+ threads; smaller where threads do not matter
N = {"auto": 1400, "jnp": 400, "host": 400}


def problem(n=N["auto"]):
  rng = np.random.default_rng(12)
  ext = 16
  flat = rng.choice(ext**3, n, replace=False)
  pos = ((np.stack(np.unravel_index(flat, (ext,) * 3), 1) + 0.5) * VS).astype(np.float32)
  feats = rng.standard_normal((n, CIN)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 3, CIN, COUT)).astype(np.float32)
  ct = rng.standard_normal((n, COUT)).astype(np.float32)
  # duplicated outputs: the feature gradient's scatter-add fallback
  dup_out = np.concatenate([pos[:200], pos[:200]])
  ct_dup = rng.standard_normal((400, COUT)).astype(np.float32)
  return pos, feats, kernel, ct, dup_out, ct_dup


def _loss(kernel, feats, pos, out, ct):
  y = sc.sparse_conv({"kernel": kernel}, feats, pos, out, VS, normalize=True)
  return jnp.sum(y * ct), y


_grad = jax.grad(_loss, argnums=(0, 1), has_aux=True)


def run(backend: str) -> dict[str, np.ndarray]:
  """Everything for one backend, keyed ``how/what``."""
  n = N[backend]
  pos, feats, kernel, ct, dup_out, ct_dup = problem(n)
  previous = sc.set_kernel_backend(backend)
  try:
    out = {}
    km = jax.jit(lambda p: sc.build_kernel_map(p, p, VS, 3))(pos)
    out["map/neighbors"], out["map/inverse"] = np.asarray(km.neighbors), np.asarray(km.inverse)
    km_e = sc.build_kernel_map(pos, pos, VS, 3)
    out["map_eager/neighbors"] = np.asarray(km_e.neighbors)
    for how, g in (("jit", jax.jit(_grad, static_argnums=())), ("eager", _grad)):
      (dk, dx), y = g(kernel, feats, pos, pos, ct)
      out[f"{how}/y"], out[f"{how}/dkernel"], out[f"{how}/dfeats"] = map(np.asarray, (y, dk, dx))
    (dk, dx), y = jax.jit(_grad)(kernel, feats, pos, dup_out, ct_dup)
    out["scatter/y"], out["scatter/dkernel"], out["scatter/dfeats"] = map(np.asarray, (y, dk, dx))
    # vmap over two clouds vs a loop (the second: the first shifted by one voxel, reordered)
    perm = np.random.default_rng(1).permutation(n)
    pos2 = np.stack([pos, pos[perm] + VS])
    feats2, ct2 = np.stack([feats, feats[perm]]), np.stack([ct, ct[perm]])
    (dk, dx), y = jax.jit(jax.vmap(_grad, in_axes=(None, 0, 0, 0, 0)))(kernel, feats2, pos2,
                                                                       pos2, ct2)
    out["vmap/y"], out["vmap/dkernel"], out["vmap/dfeats"] = map(np.asarray, (y, dk, dx))
    loop = [jax.jit(_grad)(kernel, feats2[i], pos2[i], pos2[i], ct2[i]) for i in range(2)]
    out["loop/y"] = np.stack([np.asarray(l[1]) for l in loop])
    out["loop/dkernel"] = np.stack([np.asarray(l[0][0]) for l in loop])
    out["loop/dfeats"] = np.stack([np.asarray(l[0][1]) for l in loop])
    return out
  finally:
    sc.set_kernel_backend(previous)


if __name__ == "__main__":
  results = {}
  for name in sys.argv[2:]:
    results.update({f"{name}:{k}": v for k, v in run(name).items()})
  np.savez(sys.argv[1], **results)
