"""Benchmark: Open3D-ML's ``SparseConvUnet`` in JAX (jax_sparseconv.models) against
Open3D-ML's own torch model, on the same 2-cloud batch, in the same run.

    .venv/bin/python bench/model_bench.py [--multiplier 16] [--repeats 10]

* Batch: the two pre-processed clouds of ``tests/data/unet/plain.npz`` (Open3D-ML's own
  ``preprocess`` output; 13,000 + 11,500 points, 7,708 + 6,298 level-0 voxels).
* Model: ``SparseConvUnet(multiplier=16)``, Open3D-ML's default configuration, seeded random
  weights (BatchNorm statistics included). Open3D-ML runs first
  (``bench/open3d_ml_model_bench.py`` in ``$OPEN3D_PYTHON``, default
  ``/work/o3d-venv/bin/python``; skipped with a message when absent) and hands over its
  weights, labels and outputs: the JAX model loads those weights with
  ``open3d_ml_variables`` and must reproduce the eval logits, the train-mode logits and the
  BatchNorm running statistics after one train-mode forward (checked) before it is timed.
* Forward (eval): ``jax.jit(model.apply)`` on the list of the two clouds, level capacities
  from ``unet_level_sizes`` (exact); Open3D-ML: ``model(batch)`` in ``eval()`` under
  ``torch.no_grad()``, with torch threads = 2 (the reference setting) and = 1 (on a busy
  shared box torch's two threads can be several times slower than one: both are shown, and
  the speed-up against the faster one).
* Train step: ``jax.jit(jax.value_and_grad(loss))``, cross-entropy over all points,
  train-mode BatchNorm (statistics over both clouds, updated running averages returned);
  Open3D-ML: ``model.train()``, forward, ``CrossEntropyLoss``, ``backward()``.
* ``--zoo``: the spconv zoo's networks instead (SECOND's ``VoxelBackBone8x``, CenterPoint's
  ``VoxelResBackBone8x``, Pointcept's ``SpUNet``; OpenPCDet's / Pointcept's default widths,
  ``--small`` for the reduced test widths) on the batches of ``tests/data/zoo`` against
  torch + spconv (``$SPCONV_PYTHON``, default ``/work/spconv-venv/bin/python``, running
  ``tests/data/zoo/spconv_bench.py``: the re-stated networks of ``make_cases.py`` there),
  the same weights (ours, random, handed over as a spconv 2.x state dict) and outputs
  checked first; spconv at one torch thread (its CPU build is wrong with more), ours at the
  process's threads (run under ``taskset -c 0`` for one).
* Times are medians and minima of wall-clock time over ``--repeats`` runs after warm-up, and
  the median process CPU time (all threads). The machine's load average is printed before
  and after: on a shared 2-core box other jobs distort wall times (CPU times less so).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparseconv.models import SparseConvUnet, open3d_ml_variables, unet_level_sizes

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "unet" / "plain.npz"


def timed(fn, repeats, warmup=2):
  """Wall-clock and process CPU times (ms) of ``repeats`` calls after ``warmup``."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append((time.perf_counter() - t) * 1e3)
    cpu.append((time.process_time() - c) * 1e3)
  return wall, cpu


def run_open3d(args, out_path, threads):
  py = os.environ.get("OPEN3D_PYTHON", "/work/o3d-venv/bin/python")
  if not os.path.exists(py):
    print(f"Open3D-ML: skipped ({py} not found; set OPEN3D_PYTHON)")
    return None
  cmd = [py, str(ROOT / "bench" / "open3d_ml_model_bench.py"), "--data", str(DATA), "--out",
         out_path, "--multiplier", str(args.multiplier), "--repeats", str(args.o3d_repeats),
         "--threads", str(threads)]
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode != 0:
    print("Open3D-ML: failed\n" + res.stdout[-2000:] + res.stderr[-4000:])
    return None
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--multiplier", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--o3d-repeats", type=int, default=5)
  ap.add_argument("--o3d-threads", default="2,1",
                  help="torch thread counts to run Open3D-ML with (the first is the reference)")
  ap.add_argument("--zoo", action="store_true", help="the spconv zoo models against spconv")
  ap.add_argument("--small", action="store_true", help="--zoo: the reduced test widths")
  args = ap.parse_args(argv)
  if args.zoo:
    return zoo_main(args)

  load0 = os.getloadavg()[0]
  d = np.load(DATA)
  points = [d["points_b0"], d["points_b1"]]
  feats = [d["feats_b0"], d["feats_b1"]]
  model = SparseConvUnet(multiplier=args.multiplier)
  caps = tuple(max(c) for c in zip(*unet_level_sizes(points)))

  with tempfile.TemporaryDirectory() as tmp:
    o3d_runs = {}
    for th in [int(t) for t in args.o3d_threads.split(",") if t]:
      res = run_open3d(args, os.path.join(tmp, "o3d.npz"), th)
      if res is None:
        break
      o3d_runs[th] = res
    o3d = next(iter(o3d_runs.values()), None)
    if o3d is not None:
      ref = np.load(os.path.join(tmp, "o3d.npz"))
      variables = open3d_ml_variables({k[3:]: ref[k] for k in ref.files if k.startswith("sd/")})
      labels = jnp.asarray(ref["labels"])
      ref_logits = ref["logits"]
      ref_train = ref["train_logits"]
      after = {k[3:]: ref[k] for k in ref.files if k.startswith("sd/")}
      after.update({k[6:]: ref[k] for k in ref.files if k.startswith("after/")})
      ref_stats = open3d_ml_variables(after)["batch_stats"]
    else:
      variables = model.init(jax.random.key(0), points, feats, capacities=caps)
      labels = jnp.asarray(np.random.default_rng(1).integers(0, 20, sum(map(len, points))))
      ref_logits = None

  forward = jax.jit(functools.partial(model.apply, capacities=caps))
  t0 = time.perf_counter()
  logits = jax.block_until_ready(forward(variables, points, feats))
  compile_fwd = time.perf_counter() - t0
  err = None
  if ref_logits is not None:
    err = float(np.abs(np.asarray(logits) - ref_logits).max() / np.abs(ref_logits).max())

  def loss_fn(params, stats):
    out, upd = model.apply({"params": params, "batch_stats": stats}, points, feats, train=True,
                           mutable=["batch_stats"], capacities=caps)
    logp = jax.nn.log_softmax(out)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], -1)), (upd, out)

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  t0 = time.perf_counter()
  (_, (upd, train_logits)), _ = jax.block_until_ready(
      step(variables["params"], variables["batch_stats"]))
  compile_step = time.perf_counter() - t0
  train_err = stats_err = None
  if ref_logits is not None:  # train mode: batch statistics over both clouds, as Open3D-ML
    train_err = float(np.abs(np.asarray(train_logits) - ref_train).max()
                      / np.abs(ref_train).max())
    stats_err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max())
                    for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]),
                                    jax.tree_util.tree_leaves(ref_stats)))

  fwd, fwd_cpu = timed(lambda: forward(variables, points, feats), args.repeats)
  trn, trn_cpu = timed(lambda: step(variables["params"], variables["batch_stats"]), args.repeats)
  load1 = os.getloadavg()[0]

  print(f"SparseConvUnet(multiplier={args.multiplier}) on {DATA.name}: clouds of "
        f"{[len(p) for p in points]} points, level sizes {caps} (max over the 2 clouds); "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"load {load0:.2f} -> {load1:.2f}")
  print(f"compile: forward {compile_fwd:.1f} s, train step {compile_step:.1f} s")
  if err is not None:
    print(f"vs Open3D-ML (same weights), max |diff| / max |ref|: eval logits {err:.2e}; "
          f"train-mode logits {train_err:.2e}; BatchNorm running statistics after one "
          f"train-mode forward {stats_err:.2e}")
  print("\n| | JAX ms: median / min (CPU) | Open3D-ML ms: median / min (CPU) | speed-up: "
        "median / min (CPU) |")
  print("|---|---|---|---|")
  for name, ours, ours_cpu, key in (("forward (eval)", fwd, fwd_cpu, "forward"),
                                    ("train step (fwd+bwd)", trn, trn_cpu, "train_step")):
    a = f"{np.median(ours):.1f} / {np.min(ours):.1f} ({np.median(ours_cpu):.1f})"
    if not o3d_runs:
      print(f"| {name} | {a} | - | - |")
    for th, run in o3d_runs.items():
      theirs, theirs_cpu = run[key + "_runs_ms"], run[key + "_cpu_ms"]
      b = (f"{np.median(theirs):.1f} / {np.min(theirs):.1f} ({np.median(theirs_cpu):.1f}), "
           f"{th} torch thread{'s' if th > 1 else ''}")
      r = (f"{np.median(theirs) / np.median(ours):.2f}x / {np.min(theirs) / np.min(ours):.2f}x "
           f"({np.median(theirs_cpu) / np.median(ours_cpu):.2f}x)")
      print(f"| {name} | {a} | {b} | {r} |")
  if o3d_runs:
    best = min(np.median(r["forward_runs_ms"]) for r in o3d_runs.values())
    print(f"\nforward speed-up against Open3D-ML's fastest thread setting (medians): "
          f"{best / np.median(fwd):.2f}x")
    print(f"Open3D-ML: torch {o3d['torch']}, open3d {o3d['open3d']}, level-0 voxels "
          f"{o3d['level0_voxels']}")
  return 0 if err is None or max(err, train_err, stats_err) < 1e-4 else 1


# ----------------------------------------------------------------------------- --zoo

ZOO = ROOT / "tests" / "data" / "zoo"
ZOO_SMALL = {"second": (4, 4, 8, 16, 16, 16), "centerpoint": (4, 4, 8, 8, 16, 16),
             "spunet": (4, (4, 8, 8, 16, 8, 8, 8, 8), (1, 1, 2, 1, 1, 1, 1, 1))}


def _zoo_inputs(name):
  d = np.load(ZOO / ("spunet.npz" if name == "spunet" else f"{name}.npz"))
  if name == "spunet":
    return d["grid_coord"], d["feat"], d["offset"]
  return d["voxel_features"], d["voxel_coords"], tuple(int(g) for g in d["config/grid_size"])


def zoo_main(args):
  from jax_sparseconv.models import (SpUNet, VoxelBackBone8x,  # noqa: PLC0415
                                     VoxelResBackBone8x, to_spconv_state_dict)
  py = os.environ.get("SPCONV_PYTHON", "/work/spconv-venv/bin/python")
  rows = []
  for name in ("second", "centerpoint", "spunet"):
    x0, x1, x2 = _zoo_inputs(name)
    if name == "spunet":
      base, ch, layers = ZOO_SMALL["spunet"] if args.small else (
          32, (32, 64, 128, 256, 256, 128, 96, 96), (2, 3, 4, 6, 2, 2, 2, 2))
      model = SpUNet(6, 5, base_channels=base, channels=ch, layers=layers)
      model = model.clone(capacities=model.level_sizes(x0, x2))
      cfg = {"base": base, "channels": list(ch), "layers": list(layers)}
      call = lambda v, train: model.apply(v, x0, x1, x2, train=train,  # noqa: E731
                                          mutable=["batch_stats"] if train else False)
    else:
      cls = VoxelBackBone8x if name == "second" else VoxelResBackBone8x
      ch = ZOO_SMALL[name] if args.small else cls.channels
      model = cls(4, x2, channels=ch)
      model = model.clone(capacities=model.level_sizes(x1, 2))
      cfg = {"channels": list(ch)}
      call = lambda v, train: (  # noqa: E731
          model.apply(v, x0, x1, 2, train=True, mutable=["batch_stats"])[0]["spatial_features"]
          if train else model.apply(v, x0, x1, 2)["spatial_features"])
    init_args = (x0, x1, x2) if name == "spunet" else (x0, x1, 2)
    # seeded random weights of the model's shapes (eval_shape: no compilation of init)
    shapes = jax.eval_shape(lambda k, m=model, a=init_args: m.init(k, *a), jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(path, s):
      leaf = jax.tree_util.keystr(path)
      if "kernel" in leaf:
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.uniform(-1, 1, s.shape) * 1.7 / np.sqrt(fan_in), s.dtype)
      lo, hi = (0.5, 1.5) if ("scale" in leaf or "var" in leaf) else (-0.2, 0.2)
      return jnp.asarray(rng.uniform(lo, hi, s.shape), s.dtype)
    v = jax.tree_util.tree_map_with_path(fill, shapes)
    forward = jax.jit(lambda v: call(v, False) if name != "spunet" else call(v, False))
    loss = lambda p, s: jnp.mean(jnp.square(  # noqa: E731
        call({"params": p, "batch_stats": s}, True)[0] if name == "spunet"
        else call({"params": p, "batch_stats": s}, True)))
    step = jax.jit(jax.value_and_grad(loss))
    ours = np.asarray(jax.block_until_ready(forward(v)))
    jax.block_until_ready(step(v["params"], v["batch_stats"]))
    fwd = timed(lambda: forward(v), args.repeats)
    trn = timed(lambda: step(v["params"], v["batch_stats"]), args.repeats)
    theirs, err = None, None
    if os.path.exists(py):
      with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "w.npz"), **to_spconv_state_dict(v, "2"))
        cmd = [py, str(ZOO / "spconv_bench.py"), "--name", name, "--config", json.dumps(cfg),
               "--weights", os.path.join(tmp, "w.npz"), "--out", os.path.join(tmp, "o.npy"),
               "--repeats", str(args.o3d_repeats)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode == 0:
          theirs = json.loads(res.stdout.strip().splitlines()[-1])
          ref = np.load(os.path.join(tmp, "o.npy"))
          err = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
        else:
          print(f"spconv side failed for {name}:\n{res.stderr[-3000:]}")
    rows.append((name, fwd, trn, theirs, err))
  print(f"spconv zoo models ({'test' if args.small else 'default'} widths) on tests/data/zoo "
        f"batches; jax {jax.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
  print("\n| model | step | JAX ms: median / min (CPU) | spconv 1 thread ms: median / min (CPU) "
        "| speed-up (median) | max rel diff |")
  print("|---|---|---|---|---|---|")
  for name, fwd, trn, theirs, err in rows:
    for label, (w, c), key in (("forward", fwd, "forward"), ("train step", trn, "train_step")):
      a = f"{np.median(w):.1f} / {np.min(w):.1f} ({np.median(c):.1f})"
      if theirs is None:
        print(f"| {name} | {label} | {a} | - | - | - |")
        continue
      tw, tc = theirs[key + "_runs_ms"], theirs[key + "_cpu_ms"]
      b = f"{np.median(tw):.1f} / {np.min(tw):.1f} ({np.median(tc):.1f})"
      print(f"| {name} | {label} | {a} | {b} | {np.median(tw) / np.median(w):.2f}x | "
            f"{err:.1e} |")
  errs = [r[4] for r in rows if r[4] is not None]
  return 0 if all(e < 1e-4 for e in errs) else 1


if __name__ == "__main__":
  raise SystemExit(main())
