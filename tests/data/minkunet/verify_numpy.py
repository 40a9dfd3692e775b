"""Recomputes every case from the LIBRARY-layout checkpoints with plain NumPy brute force.

  /work/spconv-venv/bin/python tests/data/minkunet/verify_numpy.py   (needs torch to read .pth)

A third implementation, independent of spconv: the ME nets from ``<net>.pth`` (ME keys,
``kernel (K^3, Cin, Cout)`` in ME's slot order) with layouts.me_conv_numpy on ME
coordinates ``(b, x, y, z)`` in tensor-stride units (negatives as they come); the SPVNAS net
from ``spvnas_minkunet.pth`` ``['model']`` (TorchSparse keys and slot order) with
layouts.ts_conv_numpy, once with TorchSparse 1.4 coordinates ``(x, y, z, b)`` (stride-
multiplied) and once with 2.1 coordinates ``(b, x, y, z)`` (level units). The architecture
is walked from the state-dict keys, as a port's loader would. Eval mode; float64. Compares
the per-point logits with the stored ones (tolerance 1e-4 absolute) and exits 1 on failure.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import layouts as L  # noqa: E402


def load_pth(path):
  import torch
  obj = torch.load(path, map_location="cpu")
  if "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  return {k: v.numpy().astype(np.float64) if v.is_floating_point() else v.numpy()
          for k, v in obj.items()}


def relu(x):
  return np.maximum(x, 0)


def ksize(kernel):
  return 1 if kernel.ndim == 2 else int(round(kernel.shape[0] ** (1 / 3)))


def bn(sd, p, x, eps=1e-5):
  return ((x - sd[p + ".running_mean"]) / np.sqrt(sd[p + ".running_var"] + eps)
          * sd[p + ".weight"] + sd[p + ".bias"])


# --------------------------------------------------------------------------- ME MinkUNet
class MENet:
  def __init__(self, sd):
    self.sd = sd

  def conv(self, p, c, x, ts, stride=1, transposed=False, out_coords=None):
    k = self.sd[p + ".kernel"]
    b = self.sd.get(p + ".bias")
    return L.me_conv_numpy(c, x, k, ksize(k), tensor_stride=ts, stride=stride,
                           transposed=transposed, out_coords=out_coords, bias=b)

  def bn(self, p, x):
    return bn(self.sd, p + ".bn", x)

  def layer(self, p, c, x, ts):
    i = 0
    while f"{p}.{i}.conv1.kernel" in self.sd:
      q = f"{p}.{i}"
      bottleneck = q + ".conv3.kernel" in self.sd
      out = relu(self.bn(q + ".norm1", self.conv(q + ".conv1", c, x, ts)[1]))
      out = self.bn(q + ".norm2", self.conv(q + ".conv2", c, out, ts)[1])
      if bottleneck:
        out = self.bn(q + ".norm3", self.conv(q + ".conv3", c, relu(out), ts)[1])
      res = x
      if q + ".downsample.0.kernel" in self.sd:
        res = self.bn(q + ".downsample.1", self.conv(q + ".downsample.0", c, x, ts)[1])
      x = relu(out + res)
      i += 1
    return x

  def forward(self, c1, x):
    sd = self
    out_p1 = relu(sd.bn("bn0", sd.conv("conv0p1s1", c1, x, 1)[1]))
    skips, c, out, ts = [(c1, out_p1)], c1, out_p1, 1
    for i, name in enumerate(["conv1p1s2", "conv2p2s2", "conv3p4s2", "conv4p8s2"]):
      c, out = sd.conv(name, c, out, ts, stride=2)
      ts *= 2
      out = relu(sd.bn(f"bn{i + 1}", out))
      out = sd.layer(f"block{i + 1}", c, out, ts)
      skips.append((c, out))
    skips.pop()  # the stride-16 output is not a skip
    for i, name in enumerate(["convtr4p16s2", "convtr5p8s2", "convtr6p4s2", "convtr7p2s2"]):
      cf, xf = skips.pop()
      _, out = sd.conv(name, c, out, ts, stride=2, transposed=True, out_coords=cf)
      ts //= 2
      out = relu(sd.bn(f"bntr{i + 4}", out))
      out = np.concatenate([out, xf], 1)  # ME.cat(up, skip)
      c = cf
      out = sd.layer(f"block{i + 5}", c, out, ts)
    return sd.conv("final", c, out, 1)[1]


# --------------------------------------------------------------------------- SPVNAS MinkUNet
class TSNet:
  def __init__(self, sd, version):
    self.sd, self.v = sd, version

  def conv(self, p, c, x, ts, stride=1, transposed=False, out_coords=None):
    k = self.sd[p + ".kernel"]
    return L.ts_conv_numpy(c, x, k, ksize(k), tensor_stride=ts, stride=stride,
                           transposed=transposed, out_coords=out_coords,
                           bias=self.sd.get(p + ".bias"), version=self.v)

  def res(self, p, c, x, ts):
    sd = self.sd
    out = relu(bn(sd, p + ".net.1", self.conv(p + ".net.0", c, x, ts)[1]))
    out = bn(sd, p + ".net.4", self.conv(p + ".net.3", c, out, ts)[1])
    if p + ".downsample.0.kernel" in sd:
      x = bn(sd, p + ".downsample.1", self.conv(p + ".downsample.0", c, x, ts)[1])
    return relu(out + x)

  def forward(self, c, x):
    sd = self.sd
    x = relu(bn(sd, "stem.1", self.conv("stem.0", c, x, 1)[1]))
    x = relu(bn(sd, "stem.4", self.conv("stem.3", c, x, 1)[1]))
    skips, ts = [(c, x)], 1
    for s in range(1, 5):
      c, x = self.conv(f"stage{s}.0.net.0", c, x, ts, stride=2)
      ts *= 2
      x = relu(bn(sd, f"stage{s}.0.net.1", x))
      x = self.res(f"stage{s}.1", c, x, ts)
      x = self.res(f"stage{s}.2", c, x, ts)
      skips.append((c, x))
    skips.pop()
    for u in range(1, 5):
      cf, xf = skips.pop()
      _, x = self.conv(f"up{u}.0.net.0", c, x, ts, stride=2, transposed=True, out_coords=cf)
      ts //= 2
      x = relu(bn(sd, f"up{u}.0.net.1", x))
      x = np.concatenate([x, xf], 1)  # torchsparse.cat([up, skip])
      c = cf
      x = self.res(f"up{u}.1.0", c, x, ts)
      x = self.res(f"up{u}.1.1", c, x, ts)
    return x @ sd["classifier.0.weight"].T + sd["classifier.0.bias"]


def main():
  import json
  manifest = json.load(open(os.path.join(HERE, "manifest.json")))
  bad = False
  for case, info in manifest["cases"].items():
    z = np.load(os.path.join(HERE, case + ".npz"))
    sd = load_pth(os.path.join(HERE, info["network"] + ".pth"))
    x = z["voxel_features"].astype(np.float64)
    runs = []
    if info["network"].startswith("me_"):
      runs.append(("ME", MENet(sd).forward(z["voxel_coords"].astype(np.int64), x)))
    else:
      runs.append(("TS 1.4", TSNet(sd, "1.4").forward(z["voxel_coords"].astype(np.int64), x)))
      runs.append(("TS 2.1", TSNet(sd, "2.1").forward(z["voxel_coords_bxyz"].astype(np.int64), x)))
    for tag, vlog in runs:
      err = float(np.abs(vlog[z["point_to_voxel"]] - z["point_logits"]).max())
      ok = err < 1e-4
      bad |= not ok
      print(f"{'ok  ' if ok else 'FAIL'} {case} [{tag} layout, NumPy float64] per-point max abs "
            f"diff {err:.2e} (|logits| <= {np.abs(z['point_logits']).max():.1f})")
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
