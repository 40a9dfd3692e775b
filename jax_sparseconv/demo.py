"""Main demo: ``python -m jax_sparseconv.demo``.

Generates a synthetic scanned scene (floor, spheres, a box; no downloads),
voxelises it, builds the kernel maps of a small sparse U-Net (K=3 submanifold
convs, a K=2 strided down-sampling, a K=3 conv at the coarse level, a K=2
transposed up-sampling, a skip connection and a K=1 head), checks the first layer
against a dense ``lax.conv_general_dilated`` on the voxel grid, and prints
neighbour statistics and timings.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import reference, scenes
from jax_sparseconv.linen import SparseConv, SparseConvTranspose


class TinyUNet(nn.Module):
  """Two levels, one skip connection; every layer reuses a precomputed kernel map."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, feats, fine, coarse, voxel_size, maps):
    relu = nn.relu
    x = SparseConv(16, 3, activation=relu, name="conv_in")(feats, fine, fine, voxel_size,
                                                            kernel_map=maps["fine"])
    x = SparseConv(16, 3, activation=relu)(x, fine, fine, voxel_size, kernel_map=maps["fine"])
    d = SparseConv(32, 2, activation=relu)(x, fine, coarse, voxel_size, kernel_map=maps["down"])
    d = SparseConv(32, 3, activation=relu)(d, coarse, coarse, 2 * voxel_size,
                                           kernel_map=maps["coarse"])
    u = SparseConvTranspose(16, 2, activation=relu)(d, coarse, fine, voxel_size,
                                                    kernel_map=maps["up"])
    x = jnp.concatenate([x, u], axis=-1)
    return SparseConv(self.num_classes, 1)(x, fine, fine, voxel_size, kernel_map=maps["head"])


def build_maps(fine, coarse, voxel_size):
  """All kernel maps of :class:`TinyUNet` (positions are arguments, not constants)."""
  return {
      "fine": sc.build_kernel_map(fine, fine, voxel_size, 3),
      "down": sc.build_kernel_map(fine, coarse, voxel_size, 2),
      "coarse": sc.build_kernel_map(coarse, coarse, 2 * voxel_size, 3),
      "up": sc.build_kernel_map(coarse, fine, voxel_size, 2, transpose=True),
      "head": sc.build_kernel_map(fine, fine, voxel_size, 1),
  }


def _median_ms(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t) * 1e3)
  return float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--voxels", type=int, default=20000, help="approximate scene size")
  parser.add_argument("--voxel-size", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  vs = args.voxel_size

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; jax_sparseconv {sc.__version__}")
  points, colors = scenes.surface_points(args.voxels, vs, args.seed)
  feats_in = np.concatenate([colors, np.ones((len(points), 1), np.float32)], axis=1)
  fine, feats, count = jax.jit(sc.voxelize)(points, feats_in, vs)
  count = int(count)
  fine, feats = fine[:count], feats[:count]  # exact sizes; padding+count also works under jit
  coarse, ccount = jax.jit(sc.downsample)(fine, vs)
  coarse = coarse[:int(ccount)]
  print(f"scene: {len(points)} points -> {count} voxels at {vs} -> {len(coarse)} coarse voxels")

  build = jax.jit(build_maps)
  maps = build(fine, coarse, vs)
  print("kernel maps (neighbours per output: mean / min / max, of slots):")
  for name, km in maps.items():
    c = np.asarray(km.neighbor_counts())
    print(f"  {name:7s} K={km.kernel_size[0]} {'transposed ' if km.transpose else ''}"
          f"{km.num_in:6d} -> {km.num_out:6d}: {c.mean():5.2f} / {c.min()} / {c.max()} "
          f"of {km.num_slots}")

  model = TinyUNet()
  params = model.init(jax.random.key(args.seed), feats, fine, coarse, vs, maps)
  forward = jax.jit(model.apply)
  logits = forward(params, feats, fine, coarse, vs, maps)

  # First layer against a dense conv on the voxel grid.
  p0 = params["params"]["conv_in"]
  sparse = sc.sparse_conv(p0, feats, fine, fine, vs, kernel_map=maps["fine"])
  dense = reference.dense_sparse_conv(p0["kernel"], p0["bias"], feats, fine, fine, vs)
  err = float(jnp.max(jnp.abs(sparse - dense)) / jnp.max(jnp.abs(dense)))
  print(f"first layer vs dense lax.conv_general_dilated: max rel. error {err:.2e} "
        f"({'OK' if err < 1e-5 else 'MISMATCH'})")

  def loss(p, feats, fine, coarse):
    out = model.apply(p, feats, fine, coarse, vs, build_maps(fine, coarse, vs))
    return jnp.mean(jax.nn.logsumexp(out, axis=-1) - out[:, 0])

  grad_fn = jax.jit(jax.value_and_grad(loss))
  value, grads = grad_fn(params, feats, fine, coarse)
  gnorm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
  print(f"output {logits.shape}, loss {float(value):.4f}, grad norm {gnorm:.4f}")
  print("timings (median of 5, jit, ms): "
        f"kernel maps {_median_ms(build, fine, coarse, vs):.1f}, "
        f"forward with maps {_median_ms(forward, params, feats, fine, coarse, vs, maps):.1f}, "
        f"search + forward + backward {_median_ms(grad_fn, params, feats, fine, coarse):.1f}")
  return 0 if err < 1e-5 else 1


if __name__ == "__main__":
  raise SystemExit(main())
