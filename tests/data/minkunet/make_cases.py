"""Writes the MinkUNet reference cases (deterministic; about a minute on one core).

  /work/spconv-venv/bin/python tests/data/minkunet/make_cases.py

Reference: reference_nets.py (torch 2.13 + spconv 2.3.8, CPU, one thread); checked against
the live MinkowskiEngine 0.5.4 by verify_me.py. See README.md for the file keys.

Per case ``<name>.npz`` (inputs, quantisation, eval logits per voxel and per point, one
train-mode forward) and per network ``<net>.pth`` (the library's own checkpoint layout) plus
``<net>_spconv.npz`` (the same weights in the spconv layout of reference_nets.py).
"""

from __future__ import annotations

import importlib.util
import copy
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
import layouts as L  # noqa: E402
import reference_nets as R  # noqa: E402


# --------------------------------------------------------------------------- scenes
def load_scenes():
  """jax_sparseconv.scenes by file path (the package __init__ imports jax)."""
  base = os.path.join(ROOT, "jax_sparseconv")
  pkg = os.path.join(base, "scenes")
  if os.path.isdir(pkg):
    spec = importlib.util.spec_from_file_location(
        "_mu_scenes", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
  else:
    spec = importlib.util.spec_from_file_location("_mu_scenes", os.path.join(base, "scenes.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules["_mu_scenes"] = mod
  spec.loader.exec_module(mod)
  return mod


def intensity(points, seed):
  """A synthetic LiDAR remission in [0, 1) (the scenes have none): smooth in space plus
  noise, deterministic in the seed."""
  rng = np.random.default_rng([seed, 77])
  p = points.astype(np.float64)
  v = 0.5 + 0.25 * np.sin(0.7 * p[:, 0]) * np.cos(0.5 * p[:, 1]) + 0.1 * p[:, 2] / 4
  return np.clip(v + 0.1 * rng.standard_normal(len(p)), 0, 0.999).astype(np.float32)


# --------------------------------------------------------------------------- quantisation
def me_quantize(points_list, feats_list, voxel_size):
  """ME: batched_coordinates([p / vs]) -> TensorField(UNWEIGHTED_AVERAGE).sparse().

  Voxel (b, floor(p / vs)) (float32 division, floor, negatives allowed); features averaged
  over the points of a voxel. Rows here are sorted by (b, x, y, z) (ME's own row order is
  its hash-map order: compare by coordinates). Returns coords (V, 4) int32, feats (V, C)
  float32, point_to_voxel (P,) int32.
  """
  c = np.concatenate([
      np.c_[np.full((len(p), 1), b), np.floor(p.astype(np.float32) / np.float32(voxel_size))]
      for b, p in enumerate(points_list)]).astype(np.int64)
  f = np.concatenate(feats_list).astype(np.float64)
  coords, inv = np.unique(c, axis=0, return_inverse=True)
  inv = inv.reshape(-1)
  s = np.zeros((len(coords), f.shape[1]))
  np.add.at(s, inv, f)
  n = np.bincount(inv, minlength=len(coords))
  return coords.astype(np.int32), (s / n[:, None]).astype(np.float32), inv.astype(np.int32)


def spvnas_quantize(blocks, voxel_size):
  """SPVNAS core/datasets/semantic_kitti.py + torchsparse sparse_quantize / sparse_collate.

  Per cloud: pc_ = round(xyz / vs) (np.round: half to even), pc_ -= pc_.min(0); unique voxels
  by ravel hash (lexicographic (x, y, z)), features = the FIRST point of each voxel
  (return_index), inverse_map maps points to voxels; clouds concatenated with the batch
  index appended: TS 1.4 / 2.0 coords (x, y, z, b). Returns coords (V, 4) (x, y, z, b),
  feats (V, 4), point_to_voxel (P,) into the concatenated rows.
  """
  coords, feats, invs, off = [], [], [], 0
  for b, block in enumerate(blocks):
    pc_ = np.round(block[:, :3] / voxel_size).astype(np.int32)
    pc_ -= pc_.min(0, keepdims=1)
    x = pc_.astype(np.int64)
    xmax = x.max(0) + 1
    h = (x[:, 0] * xmax[1] + x[:, 1]) * xmax[2] + x[:, 2]
    _, inds, inv = np.unique(h, return_index=True, return_inverse=True)
    coords.append(np.c_[pc_[inds], np.full(len(inds), b)])
    feats.append(block[inds])
    invs.append(inv.reshape(-1) + off)
    off += len(inds)
  return (np.concatenate(coords).astype(np.int32), np.concatenate(feats).astype(np.float32),
          np.concatenate(invs).astype(np.int32))


def to_spconv_indices(coords_bxyz, levels=16):
  """Shift each axis by a multiple of 16 (exact for four floor-to-stride levels) so that the
  spconv indices are >= 0."""
  shift = (np.floor_divide(coords_bxyz[:, 1:].min(0), levels) * levels).astype(np.int64)
  idx = coords_bxyz.astype(np.int64).copy()
  idx[:, 1:] -= shift
  return idx.astype(np.int32), shift.astype(np.int32)


# --------------------------------------------------------------------------- parameters
def randomize(net, feats, idx, seed):
  """Deterministic non-trivial parameters: torch's default conv init (seeded), BN affine
  gamma ~ U(0.6, 1.4), beta ~ N(0, 0.2); running stats = the batch stats of one train-mode
  pass (momentum 1) on this very input, then mean += 0.2 * std * N(0, 1), var *= U(0.6, 1.6),
  num_batches_tracked = 1 + the layer's index. Keeps the eval activations O(1)."""
  torch.manual_seed(seed)
  for m in net.modules():  # re-draw every conv / linear weight with the seeded generator
    if hasattr(m, "weight") and isinstance(m.weight, torch.nn.Parameter) and m.weight.dim() >= 2:
      w = m.weight
      fan_in = w[0].numel()
      with torch.no_grad():
        w.uniform_(-(3.0 / fan_in) ** 0.5 * 1.2, (3.0 / fan_in) ** 0.5 * 1.2)
        if getattr(m, "bias", None) is not None:
          m.bias.uniform_(-0.2, 0.2)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for bn in bns:
      bn.weight.copy_(0.6 + 0.8 * torch.rand(bn.num_features, generator=g))
      bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=g))
      bn.momentum = 1.0
    R.set_mode(net, train=True)
    net(R.sparse_input(feats, idx, int(idx[:, 0].max()) + 1))
    for i, bn in enumerate(bns):
      bn.momentum = 0.1
      if bn.num_batches_tracked.item() == 0:  # point_transforms: never run by the forward
        bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
      std = bn.running_var.sqrt()
      bn.running_mean.add_(0.2 * std * torch.randn(bn.num_features, generator=g))
      bn.running_var.mul_(0.6 + torch.rand(bn.num_features, generator=g))
      bn.num_batches_tracked.fill_(1 + i)
  R.set_mode(net, train=False)


def state_np(net):
  return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in net.state_dict().items())


def forward(net, feats, idx, train, dtype=torch.float64):
  """Logits of ``net`` (float32 parameters) computed in float64 by default (the stored
  reference logits are float64 results rounded to float32). train=True runs BatchNorm on
  batch statistics and updates ``net``'s running stats (momentum 0.1), in that precision."""
  work = copy.deepcopy(net).to(dtype)
  R.set_mode(work, train=train)
  x = R.sparse_input(np.asarray(feats, np.float64), idx, int(idx[:, 0].max()) + 1, dtype=dtype)
  with torch.no_grad():
    y = work(x)
  y = y.features if hasattr(y, "features") else y
  if train:
    with torch.no_grad():
      for k, v in net.state_dict().items():
        v.copy_(work.state_dict()[k].to(v.dtype))
  R.set_mode(net, train=False)
  return y.numpy().astype(np.float32)


def save_checkpoints(name, sd_spconv, library):
  np.savez(os.path.join(HERE, f"{name}_spconv.npz"), **sd_spconv)
  if library == "me":
    sd = L.spconv_to_me_state_dict(sd_spconv)
    obj = OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
  else:
    sd = L.spconv_to_ts_state_dict(sd_spconv)
    obj = {"model": OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())}
  torch.save(obj, os.path.join(HERE, f"{name}.pth"))
  return sd


# --------------------------------------------------------------------------- configs
ME_NETS = {
    # name: (class, divisor of PLANES and INIT_DIM, in_channels, out_channels)
    "me_minkunet14a": ("MinkUNet14A", 8, 3, 6),
    "me_minkunet18b": ("MinkUNet18B", 16, 4, 7),
    "me_minkunet34c": ("MinkUNet34C", 16, 3, 6),
}
SPVNAS_NET = {"name": "spvnas_minkunet", "cr": 0.1, "num_classes": 19}

CASES = [
    # case, network, scene, voxel size, scene args, train-mode forward too
    ("me_minkunet14a_room", "me_minkunet14a", "room", 0.05, dict(seeds=(0, 1), density=700.0, crop=(1.3, 1.3, 1.2)), True),
    ("me_minkunet18b_lidar", "me_minkunet18b", "lidar", 0.05, dict(seeds=(0, 3), sizes=(1800, 1400)), False),
    ("me_minkunet34c_room", "me_minkunet34c", "room", 0.03, dict(seeds=(2, 5), density=1500.0, crop=(0.9, 0.9, 0.9)), False),
    ("spvnas_minkunet_lidar", "spvnas_minkunet", "lidar", 0.05, dict(seeds=(1, 2), sizes=(1800, 1400)), True),
]


def me_net(name):
  cls, div, cin, cout = ME_NETS[name]
  C = R.ME_MODELS[cls]
  planes = [p // div for p in C.PLANES]
  return C(cin, cout, planes=planes, init_dim=C.INIT_DIM // div), dict(
      cls=cls, planes=planes, init_dim=C.INIT_DIM // div, layers=list(C.LAYERS),
      in_channels=cin, out_channels=cout, divisor=div)


def scene_clouds(scenes, kind, args):
  pts, feats, labels = [], [], []
  if kind == "room":
    for s in args["seeds"]:
      p, c, lab = scenes.room_points(s, density=args["density"])
      keep = np.all(p < np.float32(args["crop"]), axis=1)  # a corner of the room
      p, c, lab = p[keep], c[keep], lab[keep]
      pts.append(p.astype(np.float32))
      feats.append(c.astype(np.float32))
      labels.append(lab.astype(np.int32))
  else:
    for s, n in zip(args["seeds"], args["sizes"]):
      p, lab = scenes.lidar_points(n, 0.05, s)
      p = p.astype(np.float32)
      pts.append(p)
      feats.append(np.c_[p, intensity(p, s)].astype(np.float32))
      labels.append(lab.astype(np.int32))
  return pts, feats, labels


def main():
  R.setup_spconv_cpu()
  scenes = load_scenes()
  manifest = {"cases": {}, "networks": {}}
  built = {}
  for case, netname, kind, vs, args, do_train in CASES:
    pts, feats, labels = scene_clouds(scenes, kind, args)
    P = np.concatenate(pts)
    out = dict(points=P, point_features=np.concatenate(feats), labels=np.concatenate(labels),
               point_batch=np.concatenate([np.full(len(p), b, np.int32) for b, p in enumerate(pts)]),
               voxel_size=np.float32(vs), library=np.str_("me" if netname.startswith("me") else "torchsparse"))
    if netname.startswith("me"):
      coords, vfeat, p2v = me_quantize(pts, feats, vs)
      idx, shift = to_spconv_indices(coords)
      out.update(voxel_coords=coords, voxel_features=vfeat, point_to_voxel=p2v,
                 spconv_indices=idx, spconv_shift=shift)
    else:
      coords, vfeat, p2v = spvnas_quantize(feats, vs)
      bxyz = coords[:, [3, 0, 1, 2]]
      idx, shift = to_spconv_indices(bxyz)
      assert (shift == 0).all()
      out.update(voxel_coords=coords, voxel_coords_bxyz=bxyz, voxel_features=vfeat,
                 point_to_voxel=p2v, spconv_indices=idx, spconv_shift=shift)

    if netname not in built:
      if netname.startswith("me"):
        net, cfg = me_net(netname)
      else:
        net = R.MinkUNet(num_classes=SPVNAS_NET["num_classes"], cr=SPVNAS_NET["cr"])
        cfg = dict(cls="MinkUNet", cr=SPVNAS_NET["cr"], cs=net.cs, in_channels=4,
                   num_classes=SPVNAS_NET["num_classes"])
      seed = 1000 + len(built)
      randomize(net, vfeat, idx, seed)
      # scale the last layer so that the eval logits have std 1.5 (keeps |logits| ~ 10)
      last = net.final if netname.startswith("me") else net.classifier[0]
      g = 1.5 / float(forward(net, vfeat, idx, train=False, dtype=torch.float32).std())
      with torch.no_grad():
        last.weight.mul_(g)
        last.bias.mul_(g)
      sd = state_np(net)
      lib_sd = save_checkpoints(netname, sd, "me" if netname.startswith("me") else "ts")
      built[netname] = (net, sd)
      cfg.update(seed=seed, calibrated_on=case, num_params=int(sum(v.size for v in sd.values())))
      manifest["networks"][netname] = cfg
    net, sd = built[netname]
    for k, v in sd.items():  # nothing below may change the saved state
      assert np.array_equal(v, net.state_dict()[k].numpy())

    vlog = forward(net, vfeat, idx, train=False)
    out.update(voxel_logits=vlog, point_logits=vlog[p2v])
    if do_train:
      tnet = copy.deepcopy(net)
      tl = forward(tnet, vfeat, idx, train=True)
      # the running stats after that one train-mode forward (momentum 0.1)
      out["train_voxel_logits"] = tl
      for k, v in tnet.state_dict().items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
          out["train_state/" + k] = v.numpy().copy()
    out["network"] = np.str_(netname)
    np.savez_compressed(os.path.join(HERE, f"{case}.npz"), **out)
    manifest["cases"][case] = dict(
        network=netname, scene=kind, voxel_size=vs, scene_args={k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
        num_points=int(len(P)), num_voxels=int(len(coords)),
        per_cloud_voxels=[int((out["voxel_coords"][:, 0 if netname.startswith("me") else 3] == b).sum()) for b in range(len(pts))],
        train_forward=do_train, logit_absmax=float(np.abs(vlog).max()), logit_std=float(vlog.std()))
    print(case, manifest["cases"][case])
  manifest["versions"] = dict(torch=torch.__version__, numpy=np.__version__,
                              spconv=__import__("spconv").__version__)
  with open(os.path.join(HERE, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)


if __name__ == "__main__":
  main()
