"""Runs MinkowskiEngine's OWN example MinkUNets (live ME 0.5.4, CPU) on the ME cases.

  OMP_NUM_THREADS=1 /work/me-venv/bin/python tests/data/minkunet/verify_me.py [--me-src DIR]

Needs a MinkowskiEngine 0.5.4 build and its source tree (``examples/minkunet.py``; default
/work/me-build). The example imports ``examples/resnet.py``, which imports open3d and
downloads ``1.ply`` at import time: a stub open3d module and an empty ``1.ply`` in a
temporary working directory stand in (neither is used by MinkUNet).

For each ME case: builds the example class with the reduced PLANES / INIT_DIM (a subclass
that overrides the two class attributes), ``load_state_dict(strict=True)`` of our ``.pth``,
then from the raw points: ``TensorField(features, batched_coordinates([p / vs]))`` (default
UNWEIGHTED_AVERAGE) -> ``.sparse()`` -> net -> ``.slice(field).F`` and compares
* ME's voxels / point->voxel map with ours (make_cases.me_quantize);
* per-point and per-voxel logits (eval) with the stored ones;
* train-mode logits and the running stats after that forward, where the case has them.
Writes me_verification.json next to the cases.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def absd(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def main():
  src = "/work/me-build"
  if "--me-src" in sys.argv:
    src = sys.argv[sys.argv.index("--me-src") + 1]
  import MinkowskiEngine as ME
  sys.modules.setdefault("open3d", types.ModuleType("open3d"))
  sys.path.insert(0, src)
  cwd = os.getcwd()
  tmp = tempfile.mkdtemp()
  open(os.path.join(tmp, "1.ply"), "w").close()
  os.chdir(tmp)
  try:
    import examples.minkunet as EM
  finally:
    os.chdir(cwd)

  manifest = json.load(open(os.path.join(HERE, "manifest.json")))
  results = {"MinkowskiEngine": ME.__version__, "torch": torch.__version__, "cases": {}}
  bad = False
  for case, info in manifest["cases"].items():
    net_name = info["network"]
    if not net_name.startswith("me_"):
      continue
    cfg = manifest["networks"][net_name]
    base = getattr(EM, cfg["cls"])
    cls = type(cfg["cls"] + "Reduced", (base,), {"PLANES": tuple(cfg["planes"]),
                                                 "INIT_DIM": cfg["init_dim"]})
    assert tuple(base.LAYERS) == tuple(cfg["layers"])
    net = cls(cfg["in_channels"], cfg["out_channels"], D=3)
    sd = torch.load(os.path.join(HERE, net_name + ".pth"), map_location="cpu")
    missing = net.load_state_dict(sd, strict=True)
    assert [tuple(v.shape) for v in net.state_dict().values()] == [tuple(v.shape) for v in sd.values()]
    z = np.load(os.path.join(HERE, case + ".npz"))
    vs = float(z["voxel_size"])
    P, F, B = z["points"], z["point_features"], z["point_batch"]
    nb = int(B.max()) + 1

    def run(train, dtype=torch.float32):
      net.to(dtype)
      net.train(train)
      coords = ME.utils.batched_coordinates(
          [torch.from_numpy(P[B == b] / np.float32(vs)) for b in range(nb)], dtype=torch.float32)
      field = ME.TensorField(features=torch.from_numpy(F).to(dtype), coordinates=coords)
      sin = field.sparse()
      with torch.no_grad():
        out = net(sin)
        pf = out.slice(field).F.numpy()
      net.float()
      return field, sin, out, pf

    import copy
    state0 = copy.deepcopy(net.state_dict())
    field, sin, out, pf = run(False)
    r = {}
    # quantisation: ME's voxels and inverse map vs ours
    C = sin.C.numpy().astype(np.int64)
    ours = z["voxel_coords"].astype(np.int64)
    order = np.lexsort(C.T[::-1])
    r["voxels_equal"] = bool(len(C) == len(ours) and np.array_equal(C[order], ours))
    inv = field.inverse_mapping(sin.coordinate_map_key).numpy().astype(np.int64)
    rank = np.empty(len(C), np.int64)
    rank[order] = np.arange(len(C))  # ME row -> our row
    r["point_to_voxel_equal"] = bool(np.array_equal(rank[inv], z["point_to_voxel"]))
    feat_me = sin.F.numpy()[order]
    r["voxel_features_maxabs"] = absd(feat_me, z["voxel_features"])
    oc = out.C.numpy().astype(np.int64)
    oo = np.lexsort(oc.T[::-1])
    r["out_rows_equal_input_rows"] = bool(np.array_equal(oc[oo], ours))
    r["eval_point_logits_maxabs"] = absd(pf, z["point_logits"])
    r["eval_point_logits_rel"] = rel(pf, z["point_logits"])
    r["eval_voxel_logits_maxabs"] = absd(out.F.numpy()[oo], z["voxel_logits"])
    # the same in float64 (ME's CPU kernels take double): what is left is the storage rounding
    _, _, _, pf64 = run(False, torch.float64)
    r["eval_point_logits_maxabs_float64"] = absd(pf64, z["point_logits"])
    net.load_state_dict(state0)
    if "train_voxel_logits" in z.files:
      _, _, tout, _ = run(True)
      to = np.lexsort(tout.C.numpy().astype(np.int64).T[::-1])
      r["train_voxel_logits_maxabs"] = absd(tout.F.numpy()[to], z["train_voxel_logits"])
      r["train_voxel_logits_rel"] = rel(tout.F.numpy()[to], z["train_voxel_logits"])
      sd_after = net.state_dict()
      errs = [absd(sd_after[k.split("/", 1)[1]].numpy(), z[k]) for k in z.files
              if k.startswith("train_state/")]
      r["train_running_stats_maxabs"] = max(errs)
      net.load_state_dict(state0)
    ok = (r["voxels_equal"] and r["point_to_voxel_equal"] and r["out_rows_equal_input_rows"]
          and r["voxel_features_maxabs"] < 1e-6 and r["eval_point_logits_rel"] < 2e-5
          and r["eval_point_logits_maxabs_float64"] < 1e-5
          and r.get("train_voxel_logits_rel", 0) < 2e-5
          and r.get("train_running_stats_maxabs", 0) < 1e-4)
    r["ok"] = bool(ok)
    bad |= not ok
    results["cases"][case] = r
    print(case, r)
  with open(os.path.join(HERE, "me_verification.json"), "w") as f:
    json.dump(results, f, indent=1)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
