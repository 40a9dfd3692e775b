"""CPU benchmark: ``python bench/run.py`` (``--full`` adds N = 1M; ``--quick`` only 10k).

Clouds (``--clouds``, default all four; generators in ``jax_sparseconv.scenes``, voxel
0.05, seed 0), each printed with its extent (voxels per axis) and occupied K=3
neighbours per voxel:

* ``compact``: ``scenes.surface_voxels``, a floor, two spheres and a box shell (~15.5
  neighbours; 164 x 164 x 82 voxels at 100k);
* ``spread``: ``scenes.spread_voxels``, small shapes spread out in a 400 x 400 x 360
  volume (~12 neighbours);
* ``outdoor``: ``scenes.lidar_voxels``, a street scanned by a simulated 64-beam
  spinning LiDAR (~5 neighbours, thin surfaces, ~3400 x 2700 x 120 at 100k);
* ``indoor``: ``scenes.room_voxels``, an office floor of furnished rooms (walls, floor,
  tables, chairs, balls, columns; ~15 neighbours, ~300 x 100 x 50 at 100k).

Workloads per cloud: K=3 submanifold (out = in), K=2 strided down-sampling, K=2
transposed up-sampling; N = 10k / 100k (/ 1M, ``--sizes`` to choose). Channels
(Cin = Cout): by default 32 and 64 on ``compact`` and 64 only on the other clouds (to
keep the run short); ``--channels 32,64`` applies to every cloud.

Figures, each the median of ``--repeats`` runs after a warm-up, positions passed as
arguments (never jit constants) and gradients timed with ``value_and_grad``:
kernel-map build (with the inverse map); forward with a reused map; forward + backward
(feats and kernel) with a reused map; whole layer (search + conv) forward and
forward + backward; peak memory of the compiled fwd+bwd layer (XLA's buffer
assignment: arguments + outputs + temporaries, as ``sc.compile_checked``); useful GFLOP/s (2 * pairs * Cin * Cout / time, pairs = neighbours that
exist) and its ratio to this machine's dense float32 matmul rate measured in the same run.

Baselines, measured in the same run and printed as ratios: a dense
``lax.conv_general_dilated`` on the bounding grid (where it fits in ``--dense-max-gb``),
and Open3D 0.20 (``bench/open3d_bench.py`` in its own Python 3.11 environment given by
``$OPEN3D_PYTHON``, default ``/work/o3d-venv/bin/python`` if it exists, else
``/tmp/o3d/bin/python``; skipped with a message if absent). Open3D generates the same
clouds (same generator, seed and size); their fingerprints are compared, and a cloud
that differs gets no Open3D ratios. ``x O3D search`` = Open3D's ``FixedRadiusSearch``
(L-inf, radius 0.51*K*vs) / our map build; ``x O3D fwd`` and ``x O3D f+b`` = Open3D's
layer / ours (layer forward; layer ``value_and_grad``, search included).

Batched maps (issue 14): the same total number of voxels (``compact``, 100k; 10k with
``--quick``) as one cloud, as ``jax.vmap`` over 16 clouds padded to a common capacity
(``in_valid``/``out_valid`` counts) and as the 16 clouds packed with ``in_batch`` /
``out_batch`` ids; K=3 submanifold map build, ms per 1k valid voxels and the ratios to
one cloud.

Results go to stdout and ``bench/RESULTS.md`` (``--output``). Hand-written notes in
that file below a line ``<!-- notes -->`` are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import scenes
from jax_sparseconv._src.memory import predicted_peak_bytes

HERE = pathlib.Path(__file__).parent
VS = 0.05
SEED = 0
CLOUDS = tuple(scenes.CLOUDS)  # compact, spread, outdoor, indoor
DEFAULT_CHANNELS = {"compact": (32, 64), "spread": (64,), "outdoor": (64,),
                    "indoor": (64,)}
NOTES_MARK = "<!-- notes -->"


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


def fingerprint(*arrays):
  h = hashlib.sha1()
  for a in arrays:
    h.update(np.ascontiguousarray(a, np.float32).tobytes())
  return h.hexdigest()[:12]


def cloud(kind, n, seed=SEED):
  """The fine cloud of ``kind`` and its coarse (factor 2) lattice, as open3d_bench.py."""
  fine = scenes.CLOUDS[kind](n, VS, seed)
  idx = np.floor(fine / VS).astype(np.int64)
  coarse = ((np.unique(idx // 2, axis=0) * 2 + 0.5) * VS).astype(np.float32)
  return fine, coarse


def workloads(fine, coarse):
  return {
      "subm K=3": dict(in_pos=fine, out_pos=fine, k=3, transpose=False),
      "down K=2": dict(in_pos=fine, out_pos=coarse, k=2, transpose=False),
      "up K=2 (transposed)": dict(in_pos=coarse, out_pos=fine, k=2, transpose=True),
  }


def peak_bytes(fn, *args):
  """XLA's predicted peak of the compiled ``fn`` (what ``sc.compile_checked`` checks)."""
  peak = predicted_peak_bytes(jax.jit(fn).lower(*args).compile())
  return float("nan") if peak is None else peak


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
  if np.prod(shape, dtype=np.float64) * c * 4 * 3 > max_gb * 2**30:
    return None
  grid = jnp.zeros(shape + (c,), jnp.float32)
  kernel = jnp.zeros((w["k"],) * 3 + (c, c), jnp.float32)
  f = jax.jit(lambda g, k: jax.lax.conv_general_dilated(
      g[None], k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
  return median_ms(f, grid, kernel, repeats=max(1, repeats // 2))


def open3d_python():
  if "OPEN3D_PYTHON" in os.environ:
    return os.environ["OPEN3D_PYTHON"]
  for py in ("/work/o3d-venv/bin/python", "/tmp/o3d/bin/python"):
    if pathlib.Path(py).exists():
      return py
  return "/tmp/o3d/bin/python"


def bench_open3d(clouds, sizes, channels, repeats, threads):
  """Open3D's records keyed ``(cloud, N, workload, C)``, and its clouds' fingerprints."""
  py = open3d_python()
  if not pathlib.Path(py).exists():
    print(f"(Open3D baseline skipped: {py} not found; see the README's Benchmarks section)")
    return {}, {}
  spec = ";".join(f"{k}:{','.join(map(str, channels[k]))}" for k in clouds)
  cmd = [py, str(HERE / "open3d_bench.py"), "--clouds", ",".join(clouds),
         "--sizes", ",".join(map(str, sizes)), "--channels", spec,
         "--repeats", str(repeats), "--threads", str(threads), "--voxel-size", str(VS),
         "--seed", str(SEED)]
  print("Open3D:", " ".join(cmd[1:]), flush=True)
  env = dict(os.environ, PYTHONPATH=str(HERE.parent))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode != 0:
    print("(Open3D baseline failed:)\n" + out.stderr[-2000:])
    return {}, {}
  recs, prints = {}, {}
  for r in map(json.loads, out.stdout.strip().splitlines()):
    recs[tuple(r["key"])] = r
    prints[tuple(r["key"][:2])] = r["cloud_fingerprint"]
  return recs, prints


def bench_batched(total, repeats, num_clouds=16):
  """Map build (K=3 submanifold) of ``total`` compact voxels: one cloud, vmapped padded
  clouds, packed clouds."""
  one = scenes.surface_voxels(total, VS, SEED)
  parts = [scenes.surface_voxels(total // num_clouds, VS, SEED + 1 + i) for i in range(num_clouds)]
  counts = np.array([len(p) for p in parts], np.int32)
  cap = int(counts.max())
  padded = np.full((num_clouds, cap, 3), np.nan, np.float32)  # NaN rows, as voxelize pads
  for i, p in enumerate(parts):
    padded[i, :len(p)] = p
  packed = np.concatenate(parts)
  batch = np.repeat(np.arange(num_clouds, dtype=np.int32), counts)

  def pairs(km):
    return int(jnp.sum(km.neighbors < km.num_in))

  f_one = jax.jit(lambda p: sc.build_kernel_map(p, p, VS, 3))
  f_vmap = jax.jit(jax.vmap(
      lambda p, n: sc.build_kernel_map(p, p, VS, 3, in_valid=n, out_valid=n)))
  f_pack = jax.jit(lambda p, b: sc.build_kernel_map(p, p, VS, 3, in_batch=b, out_batch=b))
  rows = []
  for mode, fn, args, n, rows_in in (
      ("one cloud", f_one, (one,), len(one), len(one)),
      (f"vmap, {num_clouds} padded clouds", f_vmap, (padded, counts), int(counts.sum()),
       num_clouds * cap),
      (f"packed, {num_clouds} clouds + batch ids", f_pack, (packed, batch), len(packed),
       len(packed))):
    km = fn(*args)
    rows.append(dict(mode=mode, voxels=n, rows=rows_in, pairs=pairs(km) / n,
                     ms=median_ms(fn, *args, repeats=repeats)))
  for r in rows:
    r["per_1k"] = r["ms"] / (r["voxels"] / 1e3)
    r["ratio"] = r["per_1k"] / rows[0]["per_1k"]
  return rows


def bench_search_backends(data, repeats, shift=3000):
  """K=3 submanifold map build on the native CPU search and on the jnp one (the path on
  GPUs without the CUDA build), per cloud, plus each compact cloud with the half of
  larger x moved ``shift`` voxels along x (the same neighbours but those across the cut,
  over a much wider extent)."""
  clouds = []
  for (kind, n), (fine, _, st, _) in data.items():
    clouds.append((kind, fine, st))
    if kind == "compact":
      moved = fine.copy()
      half = moved[:, 0] > np.median(moved[:, 0])
      moved[half, 0] += shift * VS
      clouds.append((f"compact, half moved {shift} along x", moved,
                     scenes.cloud_stats(moved, VS)))
  rows = []
  for name, pos, st in clouds:
    ms = {}
    for backend in ("auto", "jnp"):
      previous = sc.set_kernel_backend(backend)
      try:
        build = jax.jit(lambda p: sc.build_kernel_map(p, p, VS, 3))
        ms[backend] = median_ms(build, pos, repeats=repeats)
      finally:
        sc.set_kernel_backend(previous)
    rows.append([name, st["n"], "x".join(map(str, st["extent"])), f"{st['neighbours']:.2f}",
                 f"{ms['auto']:.1f}", f"{ms['jnp']:.1f}", f"{ms['jnp'] / ms['auto']:.2f}"])
  return rows


def md_table(cols, rows):
  return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
          ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--full", action="store_true", help="include N = 1M")
  ap.add_argument("--quick", action="store_true", help="only N = 10k")
  ap.add_argument("--sizes", help="comma-separated N (overrides --quick/--full)")
  ap.add_argument("--clouds", default=",".join(CLOUDS),
                  help=f"comma-separated, of {', '.join(CLOUDS)}")
  ap.add_argument("--channels", help="comma-separated C for every cloud (default: 32,64 on "
                  "compact, 64 on the others)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dense-max-gb", type=float, default=4.0)
  ap.add_argument("--no-open3d", action="store_true")
  ap.add_argument("--no-batched", action="store_true", help="skip the batched-maps section")
  ap.add_argument("--no-search-backends", action="store_true",
                  help="skip the native-vs-jnp search section")
  ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
  args = ap.parse_args(argv)
  load_before = os.getloadavg()
  if args.sizes:
    sizes = [int(s) for s in args.sizes.split(",")]
  else:
    sizes = [10_000] if args.quick else [10_000, 100_000] + ([1_000_000] if args.full else [])
  clouds = [c.strip() for c in args.clouds.split(",") if c.strip()]
  unknown = set(clouds) - set(CLOUDS)
  if unknown:
    ap.error(f"unknown clouds {sorted(unknown)}; choose from {', '.join(CLOUDS)}")
  if args.channels:
    channels = {k: tuple(int(c) for c in args.channels.split(",")) for k in clouds}
  else:
    channels = {k: DEFAULT_CHANNELS[k] for k in clouds}
  threads = os.cpu_count()
  command = " ".join(["python bench/run.py"] + (argv if argv is not None else sys.argv[1:]))

  mm = matmul_gflops(args.repeats)
  o3d, o3d_prints = ({}, {}) if args.no_open3d else bench_open3d(
      clouds, sizes, channels, args.repeats, threads)
  head = (f"machine: {platform.processor() or platform.machine()}, {threads} cores; "
          f"jax {jax.__version__} (CPU); dense f32 matmul {mm:.1f} GFLOP/s; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
  print(head, flush=True)

  # The clouds.
  cloud_rows, data = [], {}
  for kind in clouds:
    for n in sizes:
      fine, coarse = cloud(kind, n)
      st = scenes.cloud_stats(fine, VS)
      fp = fingerprint(fine, coarse)
      theirs = o3d_prints.get((kind, n))
      same = "-" if theirs is None else ("same" if theirs == fp else f"DIFFERS ({theirs})")
      data[kind, n] = (fine, coarse, st, theirs is None or theirs == fp)
      ext = "x".join(map(str, st["extent"]))
      cloud_rows.append([kind, scenes.CLOUDS[kind].__name__, st["n"], len(coarse), ext,
                         f"{st['neighbours']:.2f}", fp, same])
      print(f"cloud {kind} ({scenes.CLOUDS[kind].__name__}, N={n}): {st['n']} voxels "
            f"({len(coarse)} coarse), extent {ext} voxels, {st['neighbours']:.2f} "
            f"neighbours/voxel at K=3; fingerprint {fp}, Open3D's: {same}", flush=True)
      if theirs is not None and theirs != fp:
        print(f"  WARNING: Open3D generated a different {kind} cloud: no Open3D ratios for it")

  # The layers.
  cols = ["cloud", "extent", "workload", "N in", "N out", "C", "pairs/out", "map ms", "fwd ms",
          "fwd+bwd ms", "layer fwd ms", "layer f+b ms", "GFLOP/s (% matmul)", "peak MB (base)",
          "dense conv ms", "O3D search ms", "O3D fwd ms", "O3D f+b ms",
          "x O3D search", "x O3D fwd", "x O3D f+b"]
  rows = []
  for kind in clouds:
    for n in sizes:
      fine, coarse, st, same = data[kind, n]
      ext = "x".join(map(str, st["extent"]))
      for name, w in workloads(fine, coarse).items():
        for c in channels[kind]:
          r = bench_jax(w, c, args.repeats)
          dense = bench_dense(w, c, args.repeats, args.dense_max_gb)
          o = o3d.get((kind, n, name, c), {}) if same else {}
          ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
          row = [kind, ext, name, r["n_in"], r["n_out"], c, f"{r['pairs'] / r['n_out']:.1f}",
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

  # Batched maps.
  batched = []
  if not args.no_batched:
    total = 10_000 if args.quick else 100_000
    for r in bench_batched(total, args.repeats):
      row = [r["mode"], r["voxels"], r["rows"], f"{r['pairs']:.1f}", f"{r['ms']:.1f}",
             f"{r['per_1k']:.3f}", f"{r['ratio']:.2f}"]
      batched.append(row)
      print("batched maps | " + " | ".join(map(str, row)), flush=True)

  # The search on both backends.
  searches = []
  if not args.no_search_backends:
    for row in bench_search_backends(data, args.repeats):
      searches.append(row)
      print("search backends | " + " | ".join(map(str, row)), flush=True)

  load_after = os.getloadavg()
  fmt = lambda l: "/".join(f"{x:.2f}" for x in l)
  run_line = (f"kernel backend {sc.get_kernel_backend()!r} (auto: native CPU kernels for "
              f"float32; builds {sc.kernel_builds()}); error mode {sc.get_error_mode()!r}; "
              f"load average (1/5/15 min) {fmt(load_before)} before the run, "
              f"{fmt(load_after)} after")
  print(run_line)
  text = ["# Benchmark results (latest run of `" + command + "`)", "", head, "", run_line, "",
          "## Clouds", "",
          f"Voxel size {VS}, seed {SEED}; extent in voxels per axis; neighbours = occupied "
          "cells of the 27 at K=3 (self included) = pairs per output of the submanifold map; "
          "`Open3D` = whether Open3D's run generated the same clouds (fingerprint of the "
          "fine and coarse positions).", ""]
  text += md_table(["cloud", "generator", "N", "N coarse", "extent", "neighbours/voxel",
                    "fingerprint", "Open3D"], cloud_rows)
  text += ["", "## Layers", "",
           "Times are medians in ms. `x O3D` = Open3D time / ours (higher is better; "
           "search vs our kernel-map build with its inverse, layer fwd, layer fwd+bwd "
           "(`value_and_grad`, search included)). `base` = features in + out + kernel map.",
           ""]
  text += md_table(cols, rows)
  if batched:
    text += ["", "## Batched maps", "",
             "K=3 submanifold map build (`jax.jit`), the same compact voxels as one cloud, "
             "as `jax.vmap` over 16 clouds padded to a common capacity (NaN rows, "
             "`in_valid`/`out_valid` counts) and as the 16 clouds packed with `in_batch`/"
             "`out_batch` ids. `ms per 1k` counts valid voxels; `x one cloud` = its ms per 1k "
             "/ one cloud's (lower is better, 1.0 = as fast per voxel).", ""]
    text += md_table(["mode", "voxels", "rows (with padding)", "pairs/voxel", "map ms",
                      "ms per 1k voxels", "x one cloud"], batched)
  if searches:
    text += ["", "## Search backends", "",
             "K=3 submanifold kernel-map build (with the inverse, `jax.jit`, ms) on the native "
             "CPU search (what the table above uses) and on the jnp search (the path on GPUs "
             "without the CUDA build, measured here on the CPU); `compact, half moved` = the "
             "compact cloud with its half of larger x moved 3000 voxels along x: the same "
             "neighbours but those across the cut, over a much wider extent.", ""]
    text += md_table(["cloud", "N", "extent", "neighbours/voxel", "native ms", "jnp ms",
                      "jnp / native"], searches)
  out = pathlib.Path(args.output)
  if out.exists() and NOTES_MARK in out.read_text():
    text += ["", NOTES_MARK + out.read_text().split(NOTES_MARK, 1)[1].rstrip("\n")]
  out.write_text("\n".join(text) + "\n")
  print(f"written to {out}")


if __name__ == "__main__":
  main()
