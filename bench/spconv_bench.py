"""CPU benchmark against spconv 2.3.8's CPU wheel: ``python bench/spconv_bench.py`` (one
command; spconv runs in its own Python 3.11 environment, ``$SPCONV_PYTHON``, default
``/work/spconv-venv/bin/python``; ``bench/spconv_side.py`` is its side).

Clouds: the four bench clouds of ``bench/run.py`` (``jax_sparseconv.scenes``, voxel 0.05,
seed 0) at N voxels (default 100k), as spconv ``indices [0, z, y, x]`` on their bounding
grid; C = 64 in and out. Rows (spconv's layers, random weights, no bias):

* ``subm k3``: ``SubMConv3d(k=3)``;
* ``conv k3 s2 p1``: ``SparseConv3d(k=3, stride=2, padding=1)`` (OpenPCDet's down conv);
* ``conv k3 s1 p1``: the regular stride-1 conv (the output set grows);
* ``subm k3 d2``: the dilated ``SubMConv3d``;
* ``subm k3 dw``: depthwise (``groups = C``; spconv has no groups: no spconv figure).

Figure: forward + backward (features and weights) of the whole layer, index building
included on both sides (spconv builds its indice pairs in every forward; here the map is
built inside the timed function), median of ``--repeats`` after a warm-up. spconv runs
with one torch thread (its CPU results are wrong with more) pinned to one core; ours is
timed pinned to one core (``taskset``, one XLA and one kernel thread) and on two cores.
Printed: ms, the ratios spconv / ours, and ours' useful GFLOP/s (2 * pairs * Cin * Cout,
three products for forward + backward) over this machine's one-core dense float32 matmul
rate measured in the same run. Results are appended to ``bench/RESULTS.md``
(``--output``) under the heading "spconv 2.3.8 CPU".
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
VS = 0.05
SEED = 0
C = 64
ROWS = {  # name: (kind, kernel_size, stride, padding, dilation, groups)
    "subm k3": ("subm", 3, 1, 0, 1, 1),
    "conv k3 s2 p1": ("conv", 3, 2, 1, 1, 1),
    "conv k3 s1 p1": ("conv", 3, 1, 1, 1, 1),
    "subm k3 d2": ("subm", 3, 1, 0, 2, 1),
    "subm k3 dw": ("subm", 3, 1, 0, 1, C),
}
ONE_CORE = {"JAX_SPARSECONV_CPU_THREADS": "1",
            "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


def make_clouds(kinds, n, path):
  """Writes ``{kind}_indices`` (int32 (n, 4) [0, z, y, x]) and ``{kind}_shape`` to ``path``."""
  import numpy as np

  from jax_sparseconv import scenes
  out = {}
  for kind in kinds:
    pts = scenes.CLOUDS[kind](n, VS, SEED)
    idx = np.floor(pts / VS).astype(np.int64)
    idx -= idx.min(0)
    out[f"{kind}_indices"] = np.c_[np.zeros(len(idx), np.int64), idx[:, ::-1]].astype(np.int32)
    out[f"{kind}_shape"] = (idx.max(0)[::-1] + 1).astype(np.int32)
  np.savez(path, **out)


def ours(path, kinds, repeats):
  """Our side (this process): {kind: {row: {"ms": ..., "pairs": ...}}}, and the dense rate."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jax_sparseconv as sc
  from jax_sparseconv import linen

  def median_ms(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))

  a = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)
  gflops_dense = 2 * 1024**3 / (median_ms(jax.jit(lambda a: a @ a), a) * 1e-3) / 1e9
  data = np.load(path)
  rng = np.random.default_rng(1)
  res = {}
  for kind in kinds:
    idx, shape = data[f"{kind}_indices"], tuple(int(s) for s in data[f"{kind}_shape"])
    feats = jnp.asarray(rng.standard_normal((len(idx), C)), jnp.float32)
    res[kind] = {}
    for row, (op, k, s, p, d, g) in ROWS.items():
      cls = linen.SubMConv3d if op == "subm" else linen.SparseConv3d
      layer = cls(C, C, k, stride=s, padding=p, dilation=d, groups=g, bias=False)
      t = sc.SparseTensor.from_indices(jnp.asarray(idx), feats, shape, 1)
      out = layer.apply(layer.init(jax.random.key(0), t), t)
      cap = out.feats.shape[0]
      layer = cls(C, C, k, stride=s, padding=p, dilation=d, groups=g, bias=False,
                  **({"capacity": cap} if op == "conv" else {}))
      params = layer.init(jax.random.key(0), t)
      (link_or_map,) = out.maps.values()
      km = getattr(link_or_map, "kernel_map", link_or_map)
      pairs = int(jnp.sum(km.neighbors < km.num_in))

      def loss(params, f, idx):
        x = sc.SparseTensor.from_indices(idx, f, shape, 1)
        return jnp.sum(layer.apply(params, x).feats ** 2)

      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      ms = median_ms(step, params, feats, jnp.asarray(idx))
      res[kind][row] = {"ms": ms, "pairs": pairs, "groups": g}
  return {"rows": res, "dense_gflops": gflops_dense}


def run_side(cmd, env_extra, pin):
  env = dict(os.environ, **env_extra)
  if pin and shutil.which("taskset"):
    cmd = ["taskset", "-c", "0", *cmd]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    return None, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), ""


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=100_000)
  ap.add_argument("--clouds", default="compact,spread,outdoor,indoor")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
  ap.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)
  ap.add_argument("--data", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  kinds = args.clouds.split(",")
  if args.side == "ours":
    print(json.dumps(ours(args.data, kinds, args.repeats)))
    return
  tmp = pathlib.Path(tempfile.mkdtemp()) / "clouds.npz"
  make_clouds(kinds, args.n, tmp)
  me = [sys.executable, __file__, "--side", "ours", "--data", str(tmp), "--clouds", args.clouds,
        "--repeats", str(args.repeats)]
  one, err1 = run_side(me, ONE_CORE, pin=True)
  two, err2 = run_side(me, {}, pin=False)
  py = os.environ.get("SPCONV_PYTHON", "/work/spconv-venv/bin/python")
  spc, err3 = (None, f"no spconv environment at {py}")
  if pathlib.Path(py).exists():
    spc, err3 = run_side([py, str(HERE / "spconv_side.py"), str(tmp), args.clouds, str(C),
                          str(args.repeats), json.dumps(ROWS)], {"OMP_NUM_THREADS": "1"},
                         pin=True)
  for name, e in (("ours 1 core", err1), ("ours 2 cores", err2), ("spconv", err3)):
    if e:
      print(f"{name}: failed\n{e}", file=sys.stderr)
  if one is None or two is None:
    sys.exit(1)
  head = (f"spconv 2.3.8 CPU, N = {args.n}, C = {C}, fwd+bwd ms (search included); machine "
          f"{platform.machine()}, {os.cpu_count()} cores; one-core dense f32 matmul "
          f"{one['dense_gflops']:.0f} GFLOP/s")
  lines = [f"### {head}", "",
           "| cloud | row | pairs | spconv 1 core | ours 1 core | ours 2 cores | x spconv (1 core)"
           " | x spconv (ours 2 cores) | ours 1 core, % of dense rate |",
           "|---|---|---|---|---|---|---|---|---|"]
  for kind in kinds:
    for row in ROWS:
      r1, r2 = one["rows"][kind][row], two["rows"][kind][row]
      s = None if spc is None else spc.get(kind, {}).get(row)
      flops = 3 * 2 * r1["pairs"] * C * C / r1["groups"]
      eff = flops / (r1["ms"] * 1e-3) / 1e9 / one["dense_gflops"]
      fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
      ratio = lambda a, b: "-" if a is None else f"{a / b:.2f}"  # noqa: E731
      lines.append(f"| {kind} | {row} | {r1['pairs']} | {fmt(s)} | {r1['ms']:.1f} | "
                   f"{r2['ms']:.1f} | {ratio(s, r1['ms'])} | {ratio(s, r2['ms'])} | "
                   f"{100 * eff:.0f}% |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.output:
    with open(args.output, "a") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  main()
