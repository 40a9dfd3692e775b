"""CPU benchmark: ``python bench/run.py`` (``--full`` adds N = 1M; ``--quick`` only 10k).

Workloads (surface voxel clouds from ``jax_sparseconv.scenes``, voxel 0.05, ~15
neighbours per voxel at K=3): K=3 submanifold (out = in), K=2 strided down-sampling,
K=2 transposed up-sampling; N = 10k / 100k (/ 1M); C = 32 / 64 (Cin = Cout).

Figures, each the median of ``--repeats`` runs after a warm-up, positions passed as
arguments (never jit constants) and gradients timed with ``value_and_grad``:
kernel-map build; forward with a reused map; forward + backward (feats and kernel)
with a reused map; whole layer (search + conv) forward and forward + backward; peak
memory of the compiled fwd+bwd layer (XLA's buffer assignment); useful GFLOP/s
(2 * pairs * Cin * Cout / time, pairs = neighbours that exist) and its ratio to this
machine's dense float32 matmul rate measured in the same run.

Baselines, measured in the same run and printed as ratios: a dense
``lax.conv_general_dilated`` on the bounding grid (where it fits in ``--dense-max-gb``),
and Open3D 0.20 (``bench/open3d_bench.py`` in its own Python 3.11 environment given by
``$OPEN3D_PYTHON``, default ``/tmp/o3d/bin/python``; skipped with a message if absent).
Results go to stdout and ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import scenes

HERE = pathlib.Path(__file__).parent
VS = 0.05


def median_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def matmul_gflops(repeats):
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  ms = median_ms(jax.jit(lambda a: a @ a), a, repeats=repeats)
  return 2 * n**3 / (ms * 1e-3) / 1e9


def workloads(n, seed=0):
  fine = scenes.surface_voxels(n, VS, seed)
  idx = np.floor(fine / VS).astype(np.int64)
  coarse = ((np.unique(idx // 2, axis=0) * 2 + 0.5) * VS).astype(np.float32)
  return {
      "subm K=3": dict(in_pos=fine, out_pos=fine, k=3, transpose=False),
      "down K=2": dict(in_pos=fine, out_pos=coarse, k=2, transpose=False),
      "up K=2 (transposed)": dict(in_pos=coarse, out_pos=fine, k=2, transpose=True),
  }


def peak_bytes(fn, *args):
  try:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    return peak or (stats.temp_size_in_bytes + stats.argument_size_in_bytes +
                    stats.output_size_in_bytes)
  except Exception:  # memory analysis is best-effort
    return float("nan")


def bench_jax(w, c, repeats):
  in_pos, out_pos, k, transpose = w["in_pos"], w["out_pos"], w["k"], w["transpose"]
  rng = np.random.default_rng(1)
  feats = jnp.asarray(rng.standard_normal((len(in_pos), c)), jnp.float32)
  params = {"kernel": jnp.asarray(rng.uniform(-0.05, 0.05, (k, k, k, c, c)), jnp.float32),
            "bias": jnp.zeros(c, jnp.float32)}
  ct = jnp.asarray(rng.standard_normal((len(out_pos), c)), jnp.float32)
  conv = sc.sparse_conv_transpose if transpose else sc.sparse_conv

  build = jax.jit(lambda a, b: sc.build_kernel_map(a, b, VS, k, transpose=transpose))
  km = build(in_pos, out_pos)
  pairs = int(jnp.sum(km.neighbors < km.num_in))

  fwd = jax.jit(lambda p, f, a, b, km: conv(p, f, a, b, VS, kernel_map=km))
  def loss_map(p, f, a, b, km):
    return jnp.sum(conv(p, f, a, b, VS, kernel_map=km) * ct)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_map, argnums=(0, 1)))
  layer = jax.jit(lambda p, f, a, b: conv(p, f, a, b, VS))
  def loss_layer(p, f, a, b):
    return jnp.sum(conv(p, f, a, b, VS) * ct)
  layer_fb = jax.jit(jax.value_and_grad(loss_layer, argnums=(0, 1)))

  r = dict(n_in=len(in_pos), n_out=len(out_pos), pairs=pairs)
  r["build"] = median_ms(build, in_pos, out_pos, repeats=repeats)
  r["fwd"] = median_ms(fwd, params, feats, in_pos, out_pos, km, repeats=repeats)
  r["fwd_bwd"] = median_ms(fwd_bwd, params, feats, in_pos, out_pos, km, repeats=repeats)
  r["layer_fwd"] = median_ms(layer, params, feats, in_pos, out_pos, repeats=repeats)
  r["layer_fwd_bwd"] = median_ms(layer_fb, params, feats, in_pos, out_pos, repeats=repeats)
  r["peak_mb"] = peak_bytes(jax.value_and_grad(loss_layer, argnums=(0, 1)), params, feats,
                            in_pos, out_pos) / 2**20
  base = 4 * (len(in_pos) * c + len(out_pos) * c + km.neighbors.size)
  r["base_mb"] = base / 2**20
  r["gflops"] = 2 * pairs * c * c / (r["fwd"] * 1e-3) / 1e9
  return r


def bench_dense(w, c, repeats, max_gb):
  if w["transpose"]:
    return None
  q = np.round(np.concatenate([w["in_pos"], w["out_pos"]]) / VS - 0.5).astype(np.int64)
  shape = tuple((q.max(0) - q.min(0) + 1 + w["k"])[::-1])
  if np.prod(shape) * c * 4 * 3 > max_gb * 2**30:
    return None
  grid = jnp.zeros(shape + (c,), jnp.float32)
  kernel = jnp.zeros((w["k"],) * 3 + (c, c), jnp.float32)
  f = jax.jit(lambda g, k: jax.lax.conv_general_dilated(
      g[None], k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
  return median_ms(f, grid, kernel, repeats=max(1, repeats // 2))


def bench_open3d(sizes, channels, repeats, threads):
  py = os.environ.get("OPEN3D_PYTHON", "/tmp/o3d/bin/python")
  if not pathlib.Path(py).exists():
    print(f"(Open3D baseline skipped: {py} not found; see bench/README.md)")
    return {}
  cmd = [py, str(HERE / "open3d_bench.py"), "--sizes", ",".join(map(str, sizes)),
         "--channels", ",".join(map(str, channels)), "--repeats", str(repeats),
         "--threads", str(threads), "--voxel-size", str(VS)]
  env = dict(os.environ, PYTHONPATH=str(HERE.parent))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode != 0:
    print("(Open3D baseline failed:)\n" + out.stderr[-2000:])
    return {}
  return {tuple(r["key"]): r for r in map(json.loads, out.stdout.strip().splitlines())}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--full", action="store_true", help="include N = 1M")
  ap.add_argument("--quick", action="store_true", help="only N = 10k")
  ap.add_argument("--channels", default="32,64")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dense-max-gb", type=float, default=4.0)
  ap.add_argument("--no-open3d", action="store_true")
  ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
  args = ap.parse_args(argv)
  sizes = [10_000] if args.quick else [10_000, 100_000] + ([1_000_000] if args.full else [])
  channels = [int(c) for c in args.channels.split(",")]
  threads = os.cpu_count()

  mm = matmul_gflops(args.repeats)
  o3d = {} if args.no_open3d else bench_open3d(sizes, channels, args.repeats, threads)
  load = os.getloadavg()
  head = (f"machine: {platform.processor() or platform.machine()}, {threads} cores, load "
          f"{load[0]:.2f}; jax {jax.__version__} (CPU); dense f32 matmul {mm:.1f} GFLOP/s; "
          f"kernel backend {sc.get_kernel_backend()!r} (auto: native CPU kernels for float32)")
  print(head)
  cols = ["workload", "N in", "N out", "C", "pairs/out", "map ms", "fwd ms", "fwd+bwd ms",
          "layer fwd ms", "layer f+b ms", "GFLOP/s (% matmul)", "peak MB (base)",
          "dense conv ms", "O3D search ms", "O3D fwd ms", "O3D f+b ms",
          "x O3D search", "x O3D fwd", "x O3D f+b"]
  rows = []
  for n in sizes:
    for name, w in workloads(n).items():
      for c in channels:
        r = bench_jax(w, c, args.repeats)
        dense = bench_dense(w, c, args.repeats, args.dense_max_gb)
        o = o3d.get((n, name, c), {})
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        row = [name, r["n_in"], r["n_out"], c, f"{r['pairs'] / r['n_out']:.1f}",
               f"{r['build']:.1f}", f"{r['fwd']:.1f}", f"{r['fwd_bwd']:.1f}",
               f"{r['layer_fwd']:.1f}", f"{r['layer_fwd_bwd']:.1f}",
               f"{r['gflops']:.1f} ({100 * r['gflops'] / mm:.0f}%)",
               f"{r['peak_mb']:.0f} ({r['base_mb']:.0f})",
               "-" if dense is None else f"{dense:.1f}",
               f"{o['search']:.1f}" if o else "-", f"{o['fwd']:.1f}" if o else "-",
               f"{o['fwd_bwd']:.1f}" if o else "-",
               ratio(o.get("search"), r["build"]), ratio(o.get("fwd"), r["layer_fwd"]),
               ratio(o.get("fwd_bwd"), r["layer_fwd_bwd"])]
        rows.append(row)
        print(" | ".join(map(str, row)), flush=True)
  table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  table += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  text = "\n".join(["# Benchmark results (latest run of `python bench/run.py`)", "", head, "",
                    "Times are medians in ms. `x O3D` = Open3D time / ours (higher is better; "
                    "search vs our kernel-map build, layer fwd, layer fwd+bwd). `base` = "
                    "features in + out + kernel map.", ""] + table) + "\n"
  pathlib.Path(args.output).write_text(text)
  print(f"written to {args.output}")


if __name__ == "__main__":
  main()
