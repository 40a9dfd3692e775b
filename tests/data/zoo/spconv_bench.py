"""The torch + spconv side of ``bench/model_bench.py --zoo`` (run in the spconv venv):
the re-stated networks of ``make_cases.py`` with the weights the JAX side hands over
(a spconv 2.x state dict, ``.npz``), one torch thread; saves the eval output (BEV map or
logits) and prints the forward and train-step times as JSON."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import make_cases as mc  # noqa: E402

ZOO = pathlib.Path(__file__).parent


def _zoo_inputs(name):
  d = np.load(ZOO / ("spunet.npz" if name == "spunet" else f"{name}.npz"))
  if name == "spunet":
    return d["grid_coord"], d["feat"], d["offset"]
  return d["voxel_features"], d["voxel_coords"], tuple(int(g) for g in d["config/grid_size"])


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--name")
  ap.add_argument("--config")
  ap.add_argument("--weights")
  ap.add_argument("--out")
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  torch.set_num_threads(1)
  import spconv.pytorch.ops as ops  # noqa: PLC0415
  ops.get_current_stream = lambda: 0  # the CPU backward asks for a CUDA stream
  cfg = json.loads(a.config)
  x0, x1, x2 = _zoo_inputs(a.name)
  if a.name == "spunet":
    model = mc.SpUNetBase(6, 5, cfg["base"], tuple(cfg["channels"]), tuple(cfg["layers"]))
    args = (torch.from_numpy(x0), torch.from_numpy(x1), torch.from_numpy(x2))
    run = lambda: model(*args)[0]  # noqa: E731
  else:
    model = mc.Backbone(4, list(x2), tuple(cfg["channels"]), a.name == "centerpoint")
    args = (torch.from_numpy(x0), torch.from_numpy(x1), 2)
    run = lambda: model(*args)["spatial_features"]  # noqa: E731
  w = np.load(a.weights)
  model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files}, strict=False)
  mc.set_mode(model, False)
  with torch.no_grad():
    out = run().numpy()
  res = {}
  for key, train in (("forward", False), ("train_step", True)):
    mc.set_mode(model, train)
    walls, cpus = [], []
    for i in range(a.repeats + 1):
      t, c = time.perf_counter(), time.process_time()
      if train:
        model.zero_grad()
        y = run()
        (y ** 2).mean().backward()
      else:
        with torch.no_grad():
          run()
      if i:
        walls.append((time.perf_counter() - t) * 1e3)
        cpus.append((time.process_time() - c) * 1e3)
    res[key + "_runs_ms"], res[key + "_cpu_ms"] = walls, cpus
  np.save(a.out, out)
  print(json.dumps(res))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
