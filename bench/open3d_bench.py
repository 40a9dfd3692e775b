"""Open3D 0.20 side of ``bench/run.py`` (runs in Open3D's own Python 3.11 environment).

Prints one JSON line per (cloud, N, workload, C): median ms of the radius search
(Open3D's FixedRadiusSearch with the L-inf metric and radius 0.51*K*vs, hash table
included), the layer forward and the layer forward + backward (feats and kernel), and
the fingerprint of the cloud it generated (``bench/run.py`` checks that both sides
measured the same clouds). The clouds come from ``jax_sparseconv/scenes/``, loaded by
file path (it does not import jax), with the same generator, seed and size.

``--channels`` is a list for every cloud (``32,64``) or per cloud
(``compact:32,64;spread:64;outdoor:64``).
"""

import argparse
import hashlib
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np
import open3d.ml.torch as ml3d
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
_pkg = ROOT / "jax_sparseconv" / "scenes"
_spec = importlib.util.spec_from_file_location("scenes", _pkg / "__init__.py",
                                               submodule_search_locations=[str(_pkg)])
scenes = importlib.util.module_from_spec(_spec)
sys.modules["scenes"] = scenes
_spec.loader.exec_module(scenes)  # the same scene generators, without importing jax


def median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def fingerprint(*arrays):  # as bench/run.py
  h = hashlib.sha1()
  for a in arrays:
    h.update(np.ascontiguousarray(a, np.float32).tobytes())
  return h.hexdigest()[:12]


def parse_channels(spec, clouds):
  if ":" not in spec:
    return {k: [int(c) for c in spec.split(",")] for k in clouds}
  out = {}
  for part in spec.split(";"):
    k, cs = part.split(":")
    out[k.strip()] = [int(c) for c in cs.split(",")]
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--clouds", default="compact")
  ap.add_argument("--sizes", default="10000")
  ap.add_argument("--channels", default="32,64")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--voxel-size", type=float, default=0.05)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  vs = args.voxel_size
  clouds = [c for c in args.clouds.split(",") if c]
  channels = parse_channels(args.channels, clouds)
  for kind in clouds:
    for n in map(int, args.sizes.split(",")):
      fine = scenes.CLOUDS[kind](n, vs, args.seed)
      idx = np.floor(fine / vs).astype(np.int64)
      coarse = ((np.unique(idx // 2, axis=0) * 2 + 0.5) * vs).astype(np.float32)
      fp = fingerprint(fine, coarse)
      work = [("subm K=3", fine, fine, 3, False), ("down K=2", fine, coarse, 2, False),
              ("up K=2 (transposed)", coarse, fine, 2, True)]
      for name, pin, pout, k, transpose in work:
        pin_t, pout_t = torch.from_numpy(pin), torch.from_numpy(pout)
        search = ml3d.layers.FixedRadiusSearch(metric="Linf", return_distances=False)
        offset = 0.0 if k % 2 else -0.5
        if transpose:
          def run_search():
            return search(pout_t, pin_t - offset * vs, 0.51 * k * vs)
        else:
          def run_search():
            return search(pin_t, pout_t - offset * vs, 0.51 * k * vs)
        with torch.no_grad():
          t_search = median_ms(run_search, args.repeats)
        for c in channels[kind]:
          cls = ml3d.layers.SparseConvTranspose if transpose else ml3d.layers.SparseConv
          layer = cls(in_channels=c, filters=c, kernel_size=[k, k, k])
          feats = torch.randn(len(pin), c, requires_grad=True)
          ct = torch.randn(len(pout), c)
          vs_t = torch.tensor(vs)

          def fwd():
            with torch.no_grad():
              return layer(feats, pin_t, pout_t, vs_t)

          def fwd_bwd():
            feats.grad = None
            layer.zero_grad()
            y = layer(feats, pin_t, pout_t, vs_t)
            (y * ct).sum().backward()

          rec = dict(key=[kind, n, name, c], cloud_fingerprint=fp, search=t_search,
                     fwd=median_ms(fwd, args.repeats), fwd_bwd=median_ms(fwd_bwd, args.repeats))
          print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
