"""Memory limits: ``python bench/memory.py`` (``--quick``: 1M only, no largest-N search).

For a K=3 submanifold layer's forward+backward (``jax.value_and_grad``, the neighbour search
included, as in ``bench/run.py``), C = 32 and 64, each size in a fresh process:

* ``XLA peak``: XLA's prediction before running (``compile().memory_analysis()``: arguments,
  outputs, temporaries) -- what ``sc.compile_checked`` compares with the machine's memory;
* ``RSS peak``: the process's measured peak resident memory (``ru_maxrss``), everything
  included (Python, JAX, the inputs, the native kernels' own buffers);
* ``RSS - before``: the peak minus the resident memory just before the step ran.

Then, for each C, the largest N that runs: from the 4M bytes per voxel, the size that should
use ~90% of the machine's memory is run for real; the next size up (+15%) must be refused
by ``compile_checked`` with ``ResourceLimitError`` before anything is allocated.

Clouds: copies of the compact 1M-voxel cloud (``scenes.surface_voxels``) side by side along
x, so density and neighbours per voxel do not change with N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

VS = 0.05
K = 3
BASE = 1_000_000
CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "jsc_bench_memory_base.npy")


def base_cloud():
  from jax_sparseconv import scenes
  if os.path.exists(CACHE):
    return np.load(CACHE)
  pos = scenes.surface_voxels(BASE, VS, 0)
  np.save(CACHE, pos)
  return pos


def tiled(n):
  """n voxels: copies of the base cloud shifted along x by its extent plus a gap."""
  base = base_cloud()
  width = float(base[:, 0].max() - base[:, 0].min()) + 4 * VS
  copies = -(-n // len(base))
  pos = np.concatenate([base + np.float32([i * width, 0, 0]) for i in range(copies)])
  return np.ascontiguousarray(pos[:n])


def rss_bytes():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def child(n, c, limit):
  import jax
  import jax.numpy as jnp
  import jax_sparseconv as sc
  from jax_sparseconv._src.memory import predicted_peak_bytes

  pos = jnp.asarray(tiled(n))
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.standard_normal((n, c), np.float32))
  params = {"kernel": jnp.asarray(rng.uniform(-0.05, 0.05, (K, K, K, c, c)), jnp.float32),
            "bias": jnp.zeros(c, jnp.float32)}

  def loss(p, f, x):
    return jnp.sum(sc.sparse_conv(p, f, x, x, VS) ** 2)

  step = jax.value_and_grad(loss, argnums=(0, 1))
  out = dict(n=n, c=c)
  t0 = time.perf_counter()
  try:
    compiled = sc.compile_checked(step, params, feats, pos, limit_bytes=limit)
  except sc.ResourceLimitError as e:
    out.update(refused=str(e), predicted=None)
    print(json.dumps(out))
    return
  out["predicted"] = predicted_peak_bytes(compiled)
  out["compile_s"] = time.perf_counter() - t0
  before = rss_bytes()
  t0 = time.perf_counter()
  value, grads = compiled(params, feats, pos)
  jax.block_until_ready(grads)
  out["step_s"] = time.perf_counter() - t0
  out["finite"] = bool(np.isfinite(float(value)))
  out["before"] = before
  out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out))


def run_child(n, c, limit):
  cmd = [sys.executable, __file__, "--child", str(n), str(c), str(limit)]
  r = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
  if r.returncode != 0 or not lines:
    return dict(n=n, c=c, error=f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
  return json.loads(lines[-1])


def gib(x):
  return "-" if x is None else f"{x / 2**30:.2f}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  ap.add_argument("--quick", action="store_true", help="1M only, no largest-N search")
  ap.add_argument("--channels", default="32,64")
  args = ap.parse_args(argv)
  if args.child:
    n, c, limit = (int(v) for v in args.child)
    child(n, c, limit)
    return

  from jax_sparseconv._src.memory import available_bytes
  limit = available_bytes()
  channels = [int(v) for v in args.channels.split(",")]
  sizes = [1_000_000] if args.quick else [1_000_000, 2_000_000, 4_000_000]
  base_cloud()  # generate the cache once
  print(f"# Memory (`python bench/memory.py`)\n\nmachine: {platform.machine()}, "
        f"{os.cpu_count()} cores, memory limit {gib(limit)} GiB; "
        f"{time.strftime('%Y-%m-%d %H:%M')}\n")
  print("K=3 submanifold layer, `value_and_grad` of the layer (search included), float32.\n")
  print("| N | C | XLA peak GiB | RSS peak GiB | RSS - before GiB | bytes/voxel (RSS - before) "
        "| step s |")
  print("|---|---|---|---|---|---|---|")
  per_voxel = {}
  for c in channels:
    for n in sizes:
      r = run_child(n, c, limit)
      if "error" in r or r.get("refused"):
        print(f"| {n:,} | {c} | {r.get('error') or r.get('refused')} |||||", flush=True)
        continue
      bpv = (r["peak"] - r["before"]) / n
      per_voxel[c] = r["peak"] / n
      print(f"| {n:,} | {c} | {gib(r['predicted'])} | {gib(r['peak'])} | "
            f"{gib(r['peak'] - r['before'])} | {bpv:.0f} | {r['step_s']:.1f} |", flush=True)
  if args.quick:
    return
  print("\nLargest N: start from the size whose measured RSS (bytes per voxel at 4M) would be "
        "~90% of the limit; `compile_checked` (XLA's prediction, before allocating) refuses "
        "or the step runs; on a refusal, 10% smaller, until one runs. Then +15%, which must "
        "be refused.\n")
  print("| C | N | outcome | XLA peak GiB | RSS peak GiB | step s |")
  print("|---|---|---|---|---|---|")

  def row(c, size):
    r = run_child(size, c, limit)
    if "error" in r:
      outcome, pred, peak, step = r["error"], None, None, None
    elif r.get("refused"):
      outcome, pred, peak, step = "refused before allocating (ResourceLimitError)", None, None, None
    else:
      outcome = "ran" + ("" if r["finite"] else " (non-finite loss!)")
      pred, peak, step = r["predicted"], r["peak"], r["step_s"]
    print(f"| {c} | {size:,} | {outcome} | {gib(pred)} | {gib(peak)} | "
          f"{'-' if step is None else f'{step:.1f}'} |", flush=True)
    return outcome.startswith("ran")

  for c in channels:
    if c not in per_voxel:
      continue
    size = int(0.9 * limit / per_voxel[c]) // 100_000 * 100_000
    while size > 0 and not row(c, size):
      size = int(size * 0.9) // 100_000 * 100_000
    if size > 0:
      row(c, int(size * 1.15) // 100_000 * 100_000)


if __name__ == "__main__":
  main()
