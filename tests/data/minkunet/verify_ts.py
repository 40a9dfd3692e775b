"""Runs SPVNAS's OWN MinkUNet on a live TorchSparse 1.4.0 CPU build, on the SPVNAS case.

  OMP_NUM_THREADS=1 PYTHONPATH=<torchsparse 1.4 build dir> /work/me-venv/bin/python \
      tests/data/minkunet/verify_ts.py [--spvnas-src DIR]

(here the build dir is /work/me-build/ts14, ``python setup.py build_ext --inplace`` of the
v1.4.0 tag; SPVNAS's ``core/`` extracted to /work/me-build/spvnas). The model file
``core/models/semantic_kitti/minkunet.py`` is loaded by path (the package ``__init__``
imports SPVNAS's NAS modules).

Checks:
* op level, every slot a different weight: live ``spnn.Conv3d`` K=3 / K=2 s2 /
  transposed K=2 / K=1 == layouts.ts_conv_numpy (TS 1.4 rule) on the same kernel;
* ``sparse_quantize`` (torchsparse.utils) == make_cases.spvnas_quantize (voxels, first-point
  indices, inverse map);
* the network: ``load_state_dict(strict=True)`` of ``spvnas_minkunet.pth['model']``, eval
  voxel and per-point logits vs the stored ones, and one train-mode forward (logits and the
  updated running stats).
Writes ts_verification.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import layouts as L  # noqa: E402


def absd(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def rel(a, b):
  return absd(a, b) / max(float(np.abs(np.asarray(b, np.float64)).max()), 1e-30)


def main():
  src = "/work/me-build/spvnas"
  if "--spvnas-src" in sys.argv:
    src = sys.argv[sys.argv.index("--spvnas-src") + 1]
  import torchsparse
  import torchsparse.nn as spnn
  from torchsparse import SparseTensor
  from torchsparse.utils.quantize import sparse_quantize
  out = {"torchsparse": torchsparse.__version__, "ops": {}, "cases": {}}
  bad = False

  # ---- ops
  rng = np.random.default_rng(7)
  c = np.unique(np.c_[rng.integers(0, 20, (700, 3)), rng.integers(0, 2, 700)], axis=0)
  c = c[rng.permutation(len(c))]
  x = rng.standard_normal((len(c), 3)).astype(np.float32)
  torch.manual_seed(0)

  def st(coords, feats, stride=1):
    return SparseTensor(torch.from_numpy(feats), torch.from_numpy(coords.astype(np.int32)), stride)

  for K in (3, 5, 1):
    conv = spnn.Conv3d(3, 4, kernel_size=K)
    with torch.no_grad():
      conv.kernel.normal_()
      y = conv(st(c, x)).F.numpy()
    _, yb = L.ts_conv_numpy(c, x, conv.kernel.detach().numpy(), K, version="1.4")
    out["ops"][f"K={K} stride 1"] = e = rel(y, yb)
    bad |= e > 1e-5
  for ts in (1, 2):
    ci = c.copy()
    ci[:, :3] *= ts
    down = spnn.Conv3d(3, 4, kernel_size=2, stride=2)
    up = spnn.Conv3d(4, 5, kernel_size=2, stride=2, transposed=True)
    with torch.no_grad():
      down.kernel.normal_()
      up.kernel.normal_()
      s = st(ci, x, ts)
      d = down(s)
      u = up(d)
    co, yb = L.ts_conv_numpy(ci, x, down.kernel.detach().numpy(), 2, tensor_stride=ts,
                             stride=2, version="1.4")
    dc = d.C.numpy().astype(np.int64)
    j = L._index(co[:, [3, 0, 1, 2]], dc[:, [3, 0, 1, 2]])
    ok_c = len(dc) == len(co) and (j >= 0).all()
    out["ops"][f"k2 s2 ts={ts} coords"] = bool(ok_c)
    out["ops"][f"k2 s2 ts={ts}"] = e1 = rel(d.F.numpy(), yb[j])
    _, ybu = L.ts_conv_numpy(dc, d.F.numpy(), up.kernel.detach().numpy(), 2,
                             tensor_stride=2 * ts, stride=2, out_coords=ci, transposed=True,
                             version="1.4")
    out["ops"][f"k2 s2 transposed ts={ts} (rows = the fine input rows)"] = e2 = rel(u.F.numpy(), ybu)
    # the same kernel read in ME's (x fastest) order must NOT match
    _, ywrong = L.ts_conv_numpy(ci, x, down.kernel.detach().numpy()[[0, 4, 2, 6, 1, 5, 3, 7]],
                                2, tensor_stride=ts, stride=2, version="1.4")
    out["ops"][f"k2 s2 ts={ts} with ME's slot order (must differ)"] = e3 = rel(d.F.numpy(), ywrong[j])
    bad |= (not ok_c) or e1 > 1e-5 or e2 > 1e-5 or e3 < 1e-2
  print(json.dumps(out["ops"], indent=1))

  # ---- network
  spec = importlib.util.spec_from_file_location(
      "spvnas_minkunet", os.path.join(src, "core/models/semantic_kitti/minkunet.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  manifest = json.load(open(os.path.join(HERE, "manifest.json")))
  import make_cases as MC
  for case, info in manifest["cases"].items():
    if info["network"] != "spvnas_minkunet":
      continue
    cfg = manifest["networks"]["spvnas_minkunet"]
    net = mod.MinkUNet(num_classes=cfg["num_classes"], cr=cfg["cr"])
    ck = torch.load(os.path.join(HERE, "spvnas_minkunet.pth"), map_location="cpu")
    net.load_state_dict(ck["model"], strict=True)
    z = np.load(os.path.join(HERE, case + ".npz"))
    r = {}
    # quantisation with torchsparse's own sparse_quantize, per cloud as SPVNAS does
    vs = float(z["voxel_size"])
    coords, feats, invs, off = [], [], [], 0
    for b in range(int(z["point_batch"].max()) + 1):
      block = z["point_features"][z["point_batch"] == b]
      pc_ = np.round(block[:, :3] / vs).astype(np.int32)
      pc_ -= pc_.min(0, keepdims=1)
      _, inds, inv = sparse_quantize(pc_, return_index=True, return_inverse=True)
      coords.append(np.c_[pc_[inds], np.full(len(inds), b)])
      feats.append(block[inds])
      invs.append(inv + off)
      off += len(inds)
    coords, feats, invs = np.concatenate(coords), np.concatenate(feats), np.concatenate(invs)
    r["voxels_equal"] = bool(np.array_equal(coords, z["voxel_coords"]))
    r["features_equal"] = bool(np.array_equal(feats, z["voxel_features"]))
    r["inverse_map_equal"] = bool(np.array_equal(invs, z["point_to_voxel"]))

    def run(train):
      net.train(train)
      with torch.no_grad():
        y = net(SparseTensor(torch.from_numpy(feats), torch.from_numpy(coords.astype(np.int32))))
      return y.numpy()

    import copy
    state0 = copy.deepcopy(net.state_dict())
    y = run(False)
    r["eval_voxel_logits_maxabs"] = absd(y, z["voxel_logits"])
    r["eval_point_logits_maxabs"] = absd(y[invs], z["point_logits"])
    r["eval_point_logits_rel"] = rel(y[invs], z["point_logits"])
    if "train_voxel_logits" in z.files:
      yt = run(True)
      r["train_voxel_logits_maxabs"] = absd(yt, z["train_voxel_logits"])
      sd = net.state_dict()
      r["train_running_stats_maxabs"] = max(
          absd(sd[k.split("/", 1)[1]].numpy(), z[k]) for k in z.files if k.startswith("train_state/"))
      net.load_state_dict(state0)
    ok = (r["voxels_equal"] and r["features_equal"] and r["inverse_map_equal"]
          and r["eval_point_logits_rel"] < 2e-5 and r.get("train_voxel_logits_maxabs", 0) < 1e-4
          and r.get("train_running_stats_maxabs", 0) < 1e-4)
    r["ok"] = bool(ok)
    bad |= not ok
    out["cases"][case] = r
    print(case, r)
  with open(os.path.join(HERE, "ts_verification.json"), "w") as f:
    json.dump(out, f, indent=1)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
