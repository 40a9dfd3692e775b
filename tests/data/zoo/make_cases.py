"""Reference cases for tests/models/test_zoo.py, made by torch 2.13 + spconv 2.3.8 (CPU).

Run in a Python 3.11 venv with ``pip install torch==2.13.0 spconv numpy``:

    /work/spconv-venv/bin/python tests/data/zoo/make_cases.py

The networks below are re-statements (written for this project, with the originals'
module names so that the state-dict keys are the originals') of OpenPCDet's
``VoxelBackBone8x`` / ``VoxelResBackBone8x`` + ``HeightCompression`` + ``MeanVFE`` (with
spconv's ``PointToVoxel`` as OpenPCDet's voxel generator) and Pointcept's ``SpUNet-v1m1``
(``SpUNetBase``), at reduced widths and grids so that the files stay small. Weights and
BatchNorm statistics are random and non-trivial. spconv's CPU quirks are respected: one
torch thread; convs with a bias stay in train mode (spconv's CPU build asserts on bias in
eval mode; convs have no train/eval difference), BatchNorm is switched alone.
"""

from __future__ import annotations

import collections
import json
import pathlib
from functools import partial

import numpy as np
import spconv
import spconv.pytorch as sp
import torch
from spconv.pytorch.utils import PointToVoxel
from torch import nn

torch.set_num_threads(1)
OUT = pathlib.Path(__file__).parent

# ----------------------------------------------------------------------------- OpenPCDet


def post_act_block(cin, cout, k, indice_key=None, stride=1, padding=0, conv_type="subm",
                   norm_fn=None):
  if conv_type == "subm":
    conv = sp.SubMConv3d(cin, cout, k, bias=False, indice_key=indice_key)
  else:
    conv = sp.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False,
                           indice_key=indice_key)
  return sp.SparseSequential(conv, norm_fn(cout), nn.ReLU())


class SparseBasicBlock(sp.SparseModule):
  def __init__(self, cin, cout, bias=None, norm_fn=None, indice_key=None):
    super().__init__()
    bias = True if bias is None else bias
    self.conv1 = sp.SubMConv3d(cin, cout, 3, stride=1, padding=1, bias=bias,
                               indice_key=indice_key)
    self.bn1 = norm_fn(cout)
    self.relu = nn.ReLU()
    self.conv2 = sp.SubMConv3d(cout, cout, 3, stride=1, padding=1, bias=bias,
                               indice_key=indice_key)
    self.bn2 = norm_fn(cout)

  def forward(self, x):
    out = self.conv1(x)
    out = out.replace_feature(self.relu(self.bn1(out.features)))
    out = self.conv2(out)
    out = out.replace_feature(self.bn2(out.features))
    return out.replace_feature(self.relu(out.features + x.features))


class Backbone(nn.Module):
  """VoxelBackBone8x (res=False) / VoxelResBackBone8x (res=True) with widths ``ch``:
  (conv_input, conv1, conv2, conv3, conv4, conv_out) channels."""

  def __init__(self, input_channels, grid_size, ch, res):
    super().__init__()
    norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
    self.sparse_shape = list(np.array(grid_size[::-1]) + [1, 0, 0])
    self.conv_input = sp.SparseSequential(
        sp.SubMConv3d(input_channels, ch[0], 3, padding=1, bias=False, indice_key="subm1"),
        norm_fn(ch[0]), nn.ReLU())
    block = post_act_block
    if res:
      self.conv1 = sp.SparseSequential(
          SparseBasicBlock(ch[0], ch[1], norm_fn=norm_fn, indice_key="res1"),
          SparseBasicBlock(ch[1], ch[1], norm_fn=norm_fn, indice_key="res1"))
    else:
      self.conv1 = sp.SparseSequential(block(ch[0], ch[1], 3, norm_fn=norm_fn, padding=1,
                                             indice_key="subm1"))
    for s, (a, b, pad) in enumerate([(ch[1], ch[2], 1), (ch[2], ch[3], 1),
                                     (ch[3], ch[4], (0, 1, 1))], start=2):
      mods = [block(a, b, 3, norm_fn=norm_fn, stride=2, padding=pad, indice_key=f"spconv{s}",
                    conv_type="spconv")]
      for _ in range(2):
        mods.append(SparseBasicBlock(b, b, norm_fn=norm_fn, indice_key=f"res{s}") if res else
                    block(b, b, 3, norm_fn=norm_fn, padding=1, indice_key=f"subm{s}"))
      setattr(self, f"conv{s}", sp.SparseSequential(*mods))
    self.conv_out = sp.SparseSequential(
        sp.SparseConv3d(ch[4], ch[5], (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                        indice_key="spconv_down2"),
        norm_fn(ch[5]), nn.ReLU())

  def forward(self, feats, coords, batch_size):
    x = sp.SparseConvTensor(feats, coords.int(), self.sparse_shape, batch_size)
    x = self.conv_input(x)
    outs = {}
    for name in ("conv1", "conv2", "conv3", "conv4"):
      x = getattr(self, name)(x)
      outs["x_" + name] = x
    out = self.conv_out(x)
    dense = out.dense()
    n, c, d, h, w = dense.shape
    outs["encoded_spconv_tensor"] = out
    outs["spatial_features"] = dense.view(n, c * d, h, w)
    return outs


def simulated_scan(rng, n_ground=1500, n_objects=4, pc_range=(0, -12.8, -3, 25.6, 12.8, 1)):
  """A LiDAR-like scan: ground returns on rings around a sensor at 1.7 m, a few boxes
  (cars) and a wall, with intensity; some points outside the range (cropped later)."""
  r = np.sqrt(rng.uniform(1, 35**2, n_ground))
  th = rng.uniform(-np.pi / 2, np.pi / 2, n_ground)
  ground = np.stack([r * np.cos(th), r * np.sin(th), -1.7 + rng.normal(0, 0.03, n_ground)], 1)
  parts = [ground]
  for _ in range(n_objects):
    cx, cy = rng.uniform(3, 24), rng.uniform(-11, 11)
    m = 200
    face = rng.integers(0, 3, m)
    u, v = rng.uniform(-1, 1, m), rng.uniform(0, 1.5, m)
    x = np.where(face == 0, cx - 2.0, cx + 2.0 * u)
    y = np.where(face == 1, cy - 0.9, np.where(face == 2, cy + 0.9, cy + 0.9 * u))
    parts.append(np.stack([x, y, -1.7 + v], 1))
  wall = np.stack([rng.uniform(0, 26, 300), np.full(300, 11.5) + rng.normal(0, 0.05, 300),
                   rng.uniform(-1.7, 0.8, 300)], 1)
  parts.append(wall)
  xyz = np.concatenate(parts).astype(np.float32)
  inten = rng.uniform(0, 1, (len(xyz), 1)).astype(np.float32)
  pts = np.concatenate([xyz, inten], 1)
  return pts[rng.permutation(len(pts))]


def mean_vfe(points, pc_range, vsize, max_points, max_voxels):
  gen = PointToVoxel(vsize_xyz=list(vsize), coors_range_xyz=list(pc_range),
                     num_point_features=points.shape[1], max_num_voxels=max_voxels,
                     max_num_points_per_voxel=max_points, device=torch.device("cpu"))
  voxels, coords, num = gen(torch.from_numpy(points))
  feats = voxels.sum(1) / torch.clamp_min(num.view(-1, 1).float(), 1.0)
  return feats, coords, num


# ----------------------------------------------------------------------------- Pointcept


class BasicBlock(sp.SparseModule):
  def __init__(self, cin, cout, norm_fn=None, indice_key=None, bias=False):
    super().__init__()
    if cin == cout:
      self.proj = sp.SparseSequential(nn.Identity())
    else:
      self.proj = sp.SparseSequential(sp.SubMConv3d(cin, cout, kernel_size=1, bias=False),
                                      norm_fn(cout))
    self.conv1 = sp.SubMConv3d(cin, cout, kernel_size=3, stride=1, padding=1, bias=bias,
                               indice_key=indice_key)
    self.bn1 = norm_fn(cout)
    self.relu = nn.ReLU()
    self.conv2 = sp.SubMConv3d(cout, cout, kernel_size=3, stride=1, padding=1, bias=bias,
                               indice_key=indice_key)
    self.bn2 = norm_fn(cout)

  def forward(self, x):
    out = self.conv1(x)
    out = out.replace_feature(self.relu(self.bn1(out.features)))
    out = self.conv2(out)
    out = out.replace_feature(self.bn2(out.features))
    out = out.replace_feature(out.features + self.proj(x).features)
    return out.replace_feature(self.relu(out.features))


class SpUNetBase(nn.Module):
  def __init__(self, in_channels, num_classes, base_channels, channels, layers):
    super().__init__()
    self.num_stages = len(layers) // 2
    norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
    self.conv_input = sp.SparseSequential(
        sp.SubMConv3d(in_channels, base_channels, kernel_size=5, padding=1, bias=False,
                      indice_key="stem"),
        norm_fn(base_channels), nn.ReLU())
    enc_ch, dec_ch = base_channels, channels[-1]
    self.down, self.up, self.enc, self.dec = (nn.ModuleList() for _ in range(4))
    for s in range(self.num_stages):
      self.down.append(sp.SparseSequential(
          sp.SparseConv3d(enc_ch, channels[s], kernel_size=2, stride=2, bias=False,
                          indice_key=f"spconv{s + 1}"),
          norm_fn(channels[s]), nn.ReLU()))
      self.enc.append(sp.SparseSequential(collections.OrderedDict(
          (f"block{i}", BasicBlock(channels[s], channels[s], norm_fn=norm_fn,
                                   indice_key=f"subm{s + 1}")) for i in range(layers[s]))))
      self.up.append(sp.SparseSequential(
          sp.SparseInverseConv3d(channels[len(channels) - s - 2], dec_ch, kernel_size=2,
                                 bias=False, indice_key=f"spconv{s + 1}"),
          norm_fn(dec_ch), nn.ReLU()))
      self.dec.append(sp.SparseSequential(collections.OrderedDict(
          (f"block{i}", BasicBlock(dec_ch + enc_ch if i == 0 else dec_ch, dec_ch,
                                   norm_fn=norm_fn, indice_key=f"subm{s}"))
          for i in range(layers[len(channels) - s - 1]))))
      enc_ch = channels[s]
      dec_ch = channels[len(channels) - s - 2]
    self.final = sp.SubMConv3d(channels[-1], num_classes, kernel_size=1, padding=1, bias=True)

  def forward(self, grid_coord, feat, offset):
    batch = torch.repeat_interleave(torch.arange(len(offset)),
                                    torch.diff(offset, prepend=torch.zeros(1, dtype=offset.dtype)))
    sparse_shape = torch.add(torch.max(grid_coord, dim=0).values, 96).tolist()
    x = sp.SparseConvTensor(feat, torch.cat([batch[:, None].int(), grid_coord.int()], 1)
                            .contiguous(), sparse_shape, int(batch[-1]) + 1)
    x = self.conv_input(x)
    skips, stages = [x], {"conv_input": x.features}
    for s in range(self.num_stages):
      x = self.down[s](x)
      x = self.enc[s](x)
      skips.append(x)
      stages[f"enc{s}"] = x
    x = skips.pop(-1)
    for s in reversed(range(self.num_stages)):
      x = self.up[s](x)
      skip = skips.pop(-1)
      x = x.replace_feature(torch.cat((x.features, skip.features), dim=1))
      x = self.dec[s](x)
      stages[f"dec{s}"] = x.features
    x = self.final(x)
    return x.features, stages


def room(rng, n=3000, size=(5.0, 4.0, 2.6), voxel=0.1):
  """An indoor room: floor, walls, ceiling and a few boxes (furniture); colour + normal
  features (6 channels, Pointcept's ScanNet input)."""
  sx, sy, sz = size
  parts = []
  k = n // 6
  parts.append(np.stack([rng.uniform(0, sx, k), rng.uniform(0, sy, k), np.zeros(k)], 1))
  parts.append(np.stack([rng.uniform(0, sx, k), rng.uniform(0, sy, k), np.full(k, sz)], 1))
  parts.append(np.stack([np.zeros(k), rng.uniform(0, sy, k), rng.uniform(0, sz, k)], 1))
  parts.append(np.stack([rng.uniform(0, sx, k), np.full(k, sy), rng.uniform(0, sz, k)], 1))
  for _ in range(4):
    c = rng.uniform([0.5, 0.5, 0], [sx - 0.5, sy - 0.5, 0])
    e = rng.uniform([0.3, 0.3, 0.4], [1.0, 0.8, 1.0])
    m = k // 2
    p = c + rng.uniform(-1, 1, (m, 3)) * e * [1, 1, 0] + [0, 0, 1] * rng.uniform(0, 1, (m, 1)) * e
    parts.append(p)
  xyz = np.concatenate(parts) + rng.normal(0, 0.01, (sum(map(len, parts)), 3))
  grid = np.floor((xyz - xyz.min(0)) / voxel).astype(np.int64)
  _, first = np.unique(grid, axis=0, return_index=True)  # one point per voxel (GridSample)
  first = np.sort(first)
  grid = grid[first]
  feat = np.concatenate([rng.uniform(-1, 1, (len(first), 3)),
                         rng.normal(0, 1, (len(first), 3))], 1).astype(np.float32)
  perm = rng.permutation(len(first))
  return grid[perm].astype(np.int32), feat[perm]


# ----------------------------------------------------------------------------- helpers


def randomize(model, rng):
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if name.endswith("num_batches_tracked"):
        p.fill_(int(rng.integers(1, 100)))
      elif name.endswith("running_mean"):
        p.copy_(torch.from_numpy(rng.uniform(-0.3, 0.3, p.shape).astype(np.float32)))
      elif name.endswith("running_var"):
        p.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, p.shape).astype(np.float32)))
      elif p.ndim == 1:  # BN weight/bias and conv biases
        lo, hi = (0.5, 1.5) if name.endswith("weight") else (-0.2, 0.2)
        p.copy_(torch.from_numpy(rng.uniform(lo, hi, p.shape).astype(np.float32)))
      else:  # conv weights (Cout, k0, k1, k2, Cin): fan-in scaled
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.from_numpy((rng.uniform(-1, 1, p.shape) * 1.7 / np.sqrt(fan_in))
                                 .astype(np.float32)))


def set_mode(model, train_bn):
  model.train()  # convs: train mode always (spconv CPU: no bias in eval)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm1d):
      m.train(train_bn)


def sparse_out(prefix, t, out):
  out[prefix + "/indices"] = t.indices.numpy().astype(np.int32)
  out[prefix + "/feats"] = t.features.detach().numpy()


def to_v1(sd):
  """spconv 1.x layout: weight (k0, k1, k2, Cin, Cout) from 2.x (Cout, k0, k1, k2, Cin)."""
  return collections.OrderedDict((k, v.permute(1, 2, 3, 4, 0).contiguous() if v.ndim == 5
                                  else v) for k, v in sd.items())


def openpcdet_case(name, res, seed):
  rng = np.random.default_rng(seed)
  torch.manual_seed(seed)
  pc_range = (0.0, -12.8, -3.0, 25.6, 12.8, 1.0)
  vsize = (0.4, 0.4, 0.1)
  grid = [int(round((pc_range[3 + a] - pc_range[a]) / vsize[a])) for a in range(3)]
  ch = (4, 4, 8, 16, 16, 16) if not res else (4, 4, 8, 8, 16, 16)
  model = Backbone(4, grid, ch, res)
  randomize(model, rng)
  max_points, max_voxels = 5, 2500
  out = {"config/grid_size": np.array(grid), "config/channels": np.array(ch),
         "config/pc_range": np.array(pc_range, np.float32),
         "config/voxel_size": np.array(vsize, np.float32),
         "config/max_points": np.array(max_points), "config/max_voxels": np.array(max_voxels)}
  feats, coords = [], []
  for b in range(2):
    pts = simulated_scan(rng)
    f, c, num = mean_vfe(pts, pc_range, vsize, max_points, max_voxels)
    out[f"points_b{b}"] = pts
    out[f"vfe_feats_b{b}"] = f.numpy()
    out[f"vfe_coords_b{b}"] = c.numpy().astype(np.int32)  # [z, y, x]
    out[f"vfe_num_b{b}"] = num.numpy().astype(np.int32)
    feats.append(f)
    coords.append(torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), c.int()], 1))
  # a second voxelisation with a small max_voxels: the first voxels in point order are kept
  f, c, num = mean_vfe(out["points_b0"], pc_range, vsize, 3, 500)
  out["vfe_small/feats"], out["vfe_small/coords"] = f.numpy(), c.numpy().astype(np.int32)
  out["vfe_small/num"] = num.numpy().astype(np.int32)
  feats, coords = torch.cat(feats), torch.cat(coords)
  out["voxel_features"], out["voxel_coords"] = feats.numpy(), coords.numpy()
  for mode in ("eval", "train"):
    set_mode(model, mode == "train")
    with torch.no_grad():
      res_ = model(feats, coords, 2)
    for k in ("x_conv1", "x_conv2", "x_conv3", "x_conv4", "encoded_spconv_tensor"):
      sparse_out(f"{mode}/{k}", res_[k], out)
    out[f"{mode}/spatial_features"] = res_["spatial_features"].numpy()
  # train mode also updated the running statistics
  sd = model.state_dict()
  out["train/conv_out.1.running_mean"] = sd["conv_out.1.running_mean"].numpy()
  out["train/conv_out.1.running_var"] = sd["conv_out.1.running_var"].numpy()
  # the checkpoint holds the statistics before the train-mode step
  model2 = Backbone(4, grid, ch, res)
  randomize(model2, np.random.default_rng(seed))
  state = collections.OrderedDict(("backbone_3d." + k, v) for k, v in model2.state_dict().items())
  state["dense_head.conv_cls.weight"] = torch.zeros(2, 4, 1, 1)  # a head key to skip
  for layout, sd_ in (("2", state), ("1", to_v1(state))):
    ckpt = {"epoch": 80, "it": 1234, "model_state": sd_, "optimizer_state": None,
            "version": "pcdet+0.6.0"}
    torch.save(ckpt, OUT / f"{name}_spconv{layout}.pth", _use_new_zipfile_serialization=False)
  np.savez_compressed(OUT / f"{name}.npz", **out)
  return out


def pointcept_case(seed):
  rng = np.random.default_rng(seed)
  base, channels, layers = 4, (4, 8, 8, 16, 8, 8, 8, 8), (1, 1, 2, 1, 1, 1, 1, 1)
  model = SpUNetBase(6, 5, base, channels, layers)
  rng_w = np.random.default_rng(seed + 1)
  randomize(model, rng_w)
  g0, f0 = room(rng)
  g1, f1 = room(rng, n=2000, size=(4.0, 3.0, 2.4))
  grid = np.concatenate([g0, g1])
  feat = np.concatenate([f0, f1])
  offset = np.array([len(g0), len(g0) + len(g1)])
  out = {"config/base_channels": np.array(base), "config/channels": np.array(channels),
         "config/layers": np.array(layers), "grid_coord": grid, "feat": feat,
         "offset": offset}
  for mode in ("eval", "train"):
    set_mode(model, mode == "train")
    with torch.no_grad():
      logits, stages = model(torch.from_numpy(grid), torch.from_numpy(feat),
                             torch.from_numpy(offset))
    out[f"{mode}/logits"] = logits.numpy()
    for k, v in stages.items():
      if isinstance(v, torch.Tensor):
        out[f"{mode}/{k}"] = v.numpy()
      else:
        sparse_out(f"{mode}/{k}", v, out)
  model2 = SpUNetBase(6, 5, base, channels, layers)
  randomize(model2, np.random.default_rng(seed + 1))
  sd = collections.OrderedDict(("module.backbone." + k, v) for k, v in model2.state_dict().items())
  torch.save({"epoch": 100, "state_dict": sd, "optimizer": None, "scheduler": None},
             OUT / "spunet.pth")
  np.savez_compressed(OUT / "spunet.npz", **out)
  return out


if __name__ == "__main__":
  prov = {"torch": torch.__version__, "spconv": spconv.__version__, "threads": 1}
  for name, res, seed in (("second", False, 1), ("centerpoint", True, 2)):
    o = openpcdet_case(name, res, seed)
    prov[name] = {"voxels": int(len(o["voxel_coords"])),
                  "x_conv4": int(len(o["eval/x_conv4/indices"]))}
  o = pointcept_case(3)
  prov["spunet"] = {"voxels": int(len(o["grid_coord"]))}
  (OUT / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
  print(json.dumps(prov))
