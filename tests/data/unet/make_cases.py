"""Reference data from Open3D-ML's real ``SparseConvUnet`` (open3d-cpu 0.20.0, torch 2.13.0 CPU).

Run with the Open3D virtual environment (NOT the repo's JAX environment):

    /work/o3d-venv/bin/python tests/data/unet/make_cases.py

Everything is deterministic: clouds, weights and the random grid placement come from fixed NumPy
seeds (no torch RNG is used anywhere); the .npz files are written with fixed zip timestamps, so a
rerun reproduces them byte for byte.  See README.md next to this file for every key.

Clouds (``make_cloud``): two synthetic indoor rooms, xyz in metres (float32), rgb float32 with
integer values 0..255.  Cloud 0: ``np.random.default_rng(CLOUD_SEEDS[0])``, 13,000 points, axis
aligned 3.4 x 3.0 m room (walls scanned up to 1.3 m), 3 walls, 3 boxes, 2 spheres.  Cloud 1:
``default_rng(CLOUD_SEEDS[1])``, 11,500 points, 3.0 x 2.6 m room (walls up to 1.2 m), 2 walls,
2 boxes, 2 spheres, rotated 23 degrees about z.  Points are sampled per surface (count ~ area x
density weight), coloured (base colour + smooth shading + N(0, 10), rounded, clipped to 0..255),
jittered with N(0, 4 mm), then put into a random order.  ~1.7-1.8 points per level-0 voxel.

Configs (the brief asked for multiplier 16 plain / 8 residual; their state_dicts alone are 2.69 M /
1.89 M numbers, 6.1 / 4.3 MB compressed, over the size budget, so): "plain" = multiplier 8,
conv_block_reps 1, plain blocks; "residual" = multiplier 4, conv_block_reps 2, residual blocks;
"small" checkpoint = multiplier 4, plain.  Other arguments are the defaults (voxel_size 0.05,
in_channels 3, num_classes 20, grid_size 4096).

Weights (``set_weights``): ``rng = np.random.default_rng(WEIGHT_SEEDS[config])``, then for every
entry of ``model.state_dict()`` in key order (one draw of the entry's full shape, float64):
  - ``*.net.kernel`` [K,K,K,Cin,Cout]: uniform(-a, a), a = 1.7 / sqrt(K**3 * Cin)
  - ``*.net.offset`` and ``*.num_batches_tracked``: kept as constructed (no draw)
  - BN ``weight`` U(0.5, 1.5), ``bias`` U(-0.2, 0.2), ``running_mean`` U(-0.3, 0.3),
    ``running_var`` U(0.5, 2.0)
  - Linear ``weight`` / ``bias`` (``linear.linear.*``, residual ``*.lin.linear.weight``): U(-0.3, 0.3)
  Each draw is then rounded to the nearest float16 value and stored as float32
  (``np.float16(w).astype(np.float32)``): the weights are ordinary float32 numbers, every one of them
  exactly representable in float16, which makes the .npz files ~40% smaller.
  The model gets them with ``load_state_dict`` and runs in ``eval()`` under ``torch.no_grad()``.

Pre-processing: the model's own ``preprocess({'point': xyz, 'feat': rgb, 'label': zeros},
{'split': 'test'})`` with ``model.rng = np.random.default_rng(1234 + b)`` set just before cloud b.
The grid offset is recomputed here with the same formula and checked against the result.
Batching: Open3D-ML's ``ConcatBatcher('cpu', 'SparseConvUnet').collate_fn`` over
``model.transform(...)`` of both clouds, then ``model(batch)``.  Intermediates come from forward hooks.
"""

import datetime
import io
import os
import sys
import time
import zipfile
from collections import OrderedDict

# Open3D's multi-threaded (TBB) CPU SparseConv is not bitwise reproducible: with 2 threads, reruns
# differ by ~1 ulp (1e-7 relative) for some channel counts.  One CPU makes it exact, so pin the
# process to a single CPU before open3d / torch start their thread pools.
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import numpy as np
import torch

import open3d
from open3d.ml.torch.models import SparseConvUnet
from open3d.ml.torch.dataloaders import ConcatBatcher
from open3d._ml3d.torch.models.sparseconvnet import (Convolution, DeConvolution)

HERE = os.path.dirname(os.path.abspath(__file__))

CLOUD_SEEDS = (20250, 20251)
CLOUD_POINTS = (13000, 11500)
PRE_SEED = 1234  # model.rng = default_rng(PRE_SEED + b) before preprocessing cloud b
WEIGHT_SEEDS = {'plain': 7, 'residual': 8, 'small': 9}
MODEL_SEED = 0  # passed as SparseConvUnet(seed=...): only seeds model.rng (re-seeded anyway)

CONFIGS = OrderedDict([
    ('plain', dict(multiplier=8, voxel_size=0.05, conv_block_reps=1, residual_blocks=False,
                   in_channels=3, num_classes=20, grid_size=4096)),
    ('residual', dict(multiplier=4, voxel_size=0.05, conv_block_reps=2, residual_blocks=True,
                      in_channels=3, num_classes=20, grid_size=4096)),
])
SMALL_CONFIG = dict(multiplier=4, voxel_size=0.05, conv_block_reps=1, residual_blocks=False,
                    in_channels=3, num_classes=20, grid_size=4096)

ZIP_DATE = (2025, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------------------------
# clouds

def _rect(rng, n, origin, u, v):
    s = rng.random((n, 1))
    t = rng.random((n, 1))
    return np.asarray(origin) + s * np.asarray(u) + t * np.asarray(v)


def _box_faces(x0, y0, z0, dx, dy, dz):
    """The 5 visible faces (no bottom) of an axis-aligned box, as (origin, u, v)."""
    o = np.array([x0, y0, z0], float)
    ex, ey, ez = np.array([dx, 0, 0.]), np.array([0, dy, 0.]), np.array([0, 0, dz])
    return [(o + ez, ex, ey), (o, ex, ez), (o + ey, ex, ez), (o, ey, ez), (o + ex, ey, ez)]


def _sphere(rng, n, c, r):
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p = np.asarray(c) + r * d
    return p[p[:, 2] >= 0.0]  # the part below the floor is not seen


def make_cloud(index):
    rng = np.random.default_rng(CLOUD_SEEDS[index])
    n_total = CLOUD_POINTS[index]
    if index == 0:
        lx, ly, h = 3.4, 3.0, 1.3  # h: the scanned part of the walls
        rects = [((0, 0, 0), (lx, 0, 0), (0, ly, 0), 1.0, (150, 120, 90)),       # floor
                 ((0, 0, 0), (0, ly, 0), (0, 0, h), 0.45, (210, 205, 190)),     # wall x=0
                 ((0, 0, 0), (lx, 0, 0), (0, 0, h), 0.45, (190, 200, 215)),     # wall y=0
                 ((lx, 0, 0), (0, ly, 0), (0, 0, h), 0.30, (200, 190, 170))]    # wall x=lx
        boxes = [((1.0, 1.1, 0.0, 1.1, 0.7, 0.75), 1.6, (120, 70, 40)),          # table
                 ((0.05, 2.0, 0.0, 0.5, 0.9, 1.1), 1.6, (60, 60, 160)),          # cabinet
                 ((2.6, 0.3, 0.0, 0.4, 0.4, 0.45), 2.0, (30, 140, 60))]          # crate
        spheres = [((2.7, 2.2, 0.35), 0.35, 2.0, (220, 40, 40)),
                   ((1.4, 1.35, 0.93), 0.18, 2.5, (240, 220, 30))]                # ball on table
        yaw, shift = 0.0, np.array([-1.3, -0.7, 0.0])
    else:
        lx, ly, h = 3.0, 2.6, 1.2
        rects = [((0, 0, 0), (lx, 0, 0), (0, ly, 0), 1.0, (100, 100, 105)),
                 ((0, 0, 0), (0, ly, 0), (0, 0, h), 0.5, (230, 225, 200)),
                 ((0, 0, 0), (lx, 0, 0), (0, 0, h), 0.5, (180, 210, 180))]
        boxes = [((0.7, 0.8, 0.0, 0.9, 0.9, 0.45), 1.8, (90, 50, 120)),           # bed-ish
                 ((2.0, 0.1, 0.0, 0.8, 0.45, 1.6), 1.6, (200, 150, 60))]          # shelf
        spheres = [((2.3, 1.9, 0.25), 0.25, 2.2, (30, 90, 220)),
                   ((1.15, 1.25, 0.62), 0.17, 2.5, (250, 120, 20))]
        yaw, shift = np.deg2rad(23.0), np.array([0.4, -2.1, 0.1])

    parts = []  # (sampler, area * density, colour)
    for o, u, v, dens, col in rects:
        area = np.linalg.norm(np.cross(u, v))
        parts.append((('rect', o, u, v), area * dens, col))
    for (x0, y0, z0, dx, dy, dz), dens, col in boxes:
        for o, u, v in _box_faces(x0, y0, z0, dx, dy, dz):
            area = np.linalg.norm(np.cross(u, v))
            parts.append((('rect', o, u, v), area * dens, col))
    for c, r, dens, col in spheres:
        parts.append((('sphere', c, r), 4 * np.pi * r * r * dens, col))

    w = np.array([p[1] for p in parts])
    counts = np.floor(w / w.sum() * n_total).astype(int)
    counts[0] += n_total - counts.sum()

    xyz, rgb = [], []
    for (spec, _, col), n in zip(parts, counts):
        if spec[0] == 'rect':
            p = _rect(rng, n, *spec[1:])
        else:
            p = _sphere(rng, n, *spec[1:])
            while len(p) < n:
                p = np.concatenate([p, _sphere(rng, n, *spec[1:])])
            p = p[:n]
        shade = 18.0 * np.sin(3.1 * p[:, :1] + 1.7 * p[:, 1:2] + 2.3 * p[:, 2:3])
        c = np.asarray(col, float) + shade + rng.normal(0, 10.0, (n, 3))
        xyz.append(p)
        rgb.append(np.clip(np.rint(c), 0, 255))
    xyz = np.concatenate(xyz)
    rgb = np.concatenate(rgb)
    xyz = xyz + rng.normal(0, 0.004, xyz.shape)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rot = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    xyz = xyz @ rot.T + shift
    perm = rng.permutation(len(xyz))
    return xyz[perm].astype(np.float32), rgb[perm].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# model, weights

def build_model(cfg):
    return SparseConvUnet(multiplier=cfg['multiplier'], voxel_size=cfg['voxel_size'],
                          conv_block_reps=cfg['conv_block_reps'],
                          residual_blocks=cfg['residual_blocks'], in_channels=cfg['in_channels'],
                          num_classes=cfg['num_classes'], grid_size=cfg['grid_size'],
                          device='cpu', seed=MODEL_SEED)


def set_weights(model, seed):
    rng = np.random.default_rng(seed)
    sd = model.state_dict()
    new = OrderedDict()
    for k, v in sd.items():
        shape = tuple(v.shape)
        if k.endswith('.net.offset') or k.endswith('.num_batches_tracked'):
            new[k] = v.clone()
            continue
        if k.endswith('.net.kernel'):
            a = 1.7 / np.sqrt(shape[0] ** 3 * shape[3])
            w = rng.uniform(-a, a, shape)
        elif '.bn.' in k:
            lo, hi = {'weight': (0.5, 1.5), 'bias': (-0.2, 0.2), 'running_mean': (-0.3, 0.3),
                      'running_var': (0.5, 2.0)}[k.rsplit('.', 1)[1]]
            w = rng.uniform(lo, hi, shape)
        elif k.startswith('linear.linear.') or '.lin.linear.' in k:
            w = rng.uniform(-0.3, 0.3, shape)
        else:
            raise KeyError(k)
        w = w.astype(np.float16).astype(np.float32)
        assert v.dtype == torch.float32, k
        new[k] = torch.from_numpy(w)
    model.load_state_dict(new)
    model.eval()
    return model


def state_dict_arrays(model):
    out = OrderedDict()
    for k, v in model.state_dict().items():
        a = v.detach().cpu().numpy()
        out['sd/' + k] = a.astype(np.int64) if k.endswith('num_batches_tracked') else a
    return out


# ----------------------------------------------------------------------------------------------
# pre-processing

def preprocess(model, xyz, rgb, b):
    model.rng = np.random.default_rng(PRE_SEED + b)
    data = {'point': xyz.copy(), 'feat': rgb.copy(), 'label': np.zeros(len(xyz), np.int32)}
    pre = model.preprocess(data, {'split': 'test'})

    # Recompute the placement exactly as preprocess() does (same dtypes, same rng draws).
    rng = np.random.default_rng(PRE_SEED + b)
    pts = np.array(xyz, dtype=np.float32)
    pts *= 1. / model.cfg.voxel_size
    m, M = pts.min(0), pts.max(0)
    gs = model.cfg.grid_size
    offset = -m + np.clip(gs - M + m - 0.001, 0, None) * rng.random(3) + \
        np.clip(gs - M + m + 0.001, None, 0) * rng.random(3)
    pts += offset
    keep = (pts.min(1) >= 0) * (pts.max(1) < 4096)
    snapped = (pts[keep].astype(np.int32) + 0.5).astype(np.float32)
    assert offset.dtype == np.float64
    assert np.array_equal(snapped, pre['point']), 'grid offset recomputation differs'
    assert np.array_equal(rgb[keep], pre['feat'])
    return pre, offset, keep


# ----------------------------------------------------------------------------------------------
# forward with hooks

class Capture:
    def __init__(self, model):
        self.model = model
        self.handles = []
        self.reset()
        net = model.unet.net
        first_deconv = next(i for i, mod in enumerate(net) if isinstance(mod, DeConvolution))
        self.deep_index = first_deconv - 3  # last block of level 6 (then BN, ReLU, DeConv)
        self.handles.append(model.input_layer.register_forward_hook(self._inp))
        self.handles.append(model.sub_sparse_conv.register_forward_hook(self._subm0))
        self.handles.append(net[self.deep_index].register_forward_hook(self._deep))
        self.handles.append(model.linear.register_forward_hook(self._vox_logits))
        for i, mod in enumerate(net):
            if isinstance(mod, Convolution):
                self.handles.append(mod.register_forward_hook(self._conv))

    def reset(self):
        self.inp, self.subm0, self.deep, self.levels, self.vox_logits = [], None, None, [], None

    def _inp(self, mod, args, out):
        feat, pos, index_map = out
        self.inp.append((feat.detach().numpy().copy(), pos.detach().numpy().copy(),
                         np.asarray(index_map).copy()))

    def _subm0(self, mod, args, out):
        self.subm0 = [f.detach().numpy().copy() for f in out]

    def _deep(self, mod, args, out):
        self.deep = [f.detach().numpy().copy() for f in out]

    def _vox_logits(self, mod, args, out):
        self.vox_logits = [f.detach().numpy().copy() for f in out]

    def _conv(self, mod, args, out):
        self.levels.append([p.detach().numpy().copy() for p in out[1]])


def run_batch(model, pres):
    batcher = ConcatBatcher('cpu', model=model.cfg.name)
    items = [{'data': model.transform({k: v.copy() for k, v in pre.items()}, {}), 'attr': {}}
             for pre in pres]
    batch = batcher.collate_fn(items)['data']
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(batch)
        dt = time.perf_counter() - t0
    return out.numpy().copy(), dt


# ----------------------------------------------------------------------------------------------
# deterministic npz writer (np.savez_compressed stamps the current time into the zip)

def save_npz(path, arrays):
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(v), allow_pickle=False)
            info = zipfile.ZipInfo(k + '.npy', date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def config_arrays(cfg):
    out = OrderedDict()
    for k in ('multiplier', 'voxel_size', 'conv_block_reps', 'residual_blocks', 'in_channels',
              'num_classes', 'grid_size'):
        v = cfg[k]
        out['config_' + k] = (np.asarray(v, np.float64) if isinstance(v, float) else
                              np.asarray(v, np.bool_) if isinstance(v, bool) else
                              np.asarray(v, np.int64))
    return out


def inp_check(pre, inp):
    """InputLayer = voxel mean of rgb, voxels in ascending (z, y, x) order, positions i + 0.5."""
    feat, pos, index_map = inp
    i = np.floor(pre['point']).astype(np.int64)
    key = i[:, 0] + 40960 * (i[:, 1] + 40960 * i[:, 2])
    ukey, inv = np.unique(key, return_inverse=True)
    assert np.array_equal(index_map, inv)
    cnt = np.bincount(inv).astype(np.float32)
    sums = np.zeros((len(ukey), 3), np.float64)
    np.add.at(sums, inv, pre['feat'].astype(np.float64))
    assert np.array_equal(feat, sums.astype(np.float32) / cnt[:, None])
    ipos = np.stack([ukey % 40960, (ukey // 40960) % 40960, ukey // 40960 ** 2], 1) + 0.5
    assert np.array_equal(pos, ipos.astype(np.float32))


def make_config_case(name, cfg, clouds, log):
    model = set_weights(build_model(cfg), WEIGHT_SEEDS[name])
    pres, offsets = [], []
    for b, (xyz, rgb) in enumerate(clouds):
        pre, off, keep = preprocess(model, xyz, rgb, b)
        assert keep.all()
        pres.append(pre)
        offsets.append(off)

    cap = Capture(model)
    logits, dt = run_batch(model, pres)
    # second and third runs for timing, and to check run-to-run determinism
    times = [dt]
    for _ in range(2):
        cap.reset()
        l2, dt = run_batch(model, pres)
        times.append(dt)
        assert np.array_equal(l2, logits)
    # per-cloud runs: identical to the batch
    lens = [len(p['point']) for p in pres]
    starts = np.cumsum([0] + lens)
    single = []
    for b, pre in enumerate(pres):
        cap.reset()
        lb, _ = run_batch(model, [pre])
        single.append(lb)
        assert np.array_equal(lb, logits[starts[b]:starts[b + 1]]), 'batch != single cloud'
    cap.reset()
    l3, _ = run_batch(model, pres)
    assert np.array_equal(l3, logits)

    assert np.isfinite(logits).all()
    assert logits.std() > 0.1 and len(np.unique(logits)) > 1000
    for b in range(2):
        inp_check(pres[b], cap.inp[b])
        assert np.array_equal(cap.vox_logits[b][cap.inp[b][2]], logits[starts[b]:starts[b + 1]])

    arrays = config_arrays(cfg)
    arrays['weight_seed'] = np.asarray(WEIGHT_SEEDS[name], np.int64)
    arrays['deep_module_index'] = np.asarray(cap.deep_index, np.int64)
    arrays['batch_lengths'] = np.asarray(lens, np.int64)
    for b, (xyz, rgb) in enumerate(clouds):
        arrays[f'raw_xyz_b{b}'] = xyz
        arrays[f'raw_rgb_b{b}'] = rgb
        arrays[f'preprocess_seed_b{b}'] = np.asarray(PRE_SEED + b, np.int64)
        arrays[f'grid_offset_b{b}'] = offsets[b]
        arrays[f'points_b{b}'] = pres[b]['point']
        arrays[f'feats_b{b}'] = pres[b]['feat']
    arrays['logits'] = logits
    for b in range(2):
        feat, pos, index_map = cap.inp[b]
        arrays[f'inp_feats_b{b}'] = feat
        arrays[f'inp_pos_b{b}'] = pos
        arrays[f'index_map_b{b}'] = index_map.astype(np.int32)
        if name == 'plain':  # same op in both configs; kept in one file to save space
            arrays[f'subm0_feats_b{b}'] = cap.subm0[b]
        for lev in range(1, 7):
            arrays[f'level{lev}_pos_b{b}'] = cap.levels[lev - 1][b]
        arrays[f'deep_feats_b{b}'] = cap.deep[b]
        arrays[f'deep_pos_b{b}'] = cap.levels[5][b]
    arrays.update(state_dict_arrays(model))

    log(f'[{name}] SparseConvUnet({", ".join(f"{k}={v!r}" for k, v in cfg.items())}, '
        f"device='cpu', seed={MODEL_SEED}); weight seed {WEIGHT_SEEDS[name]}; "
        f'{len(model.state_dict())} state_dict entries, '
        f'{sum(v.numel() for v in model.state_dict().values())} numbers; '
        f'deep block = unet.net.{cap.deep_index}')
    for b in range(2):
        counts = [len(cap.inp[b][1])] + [len(cap.levels[lev][b]) for lev in range(6)]
        log(f'[{name}] cloud {b}: {lens[b]} points, voxels per level 0..6: {counts}')
    log(f'[{name}] logits {logits.shape} mean {logits.mean():.4g} std {logits.std():.4g} '
        f'min {logits.min():.4g} max {logits.max():.4g}; argmax classes used: '
        f'{len(np.unique(logits.argmax(1)))}')
    log(f'[{name}] forward (2-cloud batch, eval, no_grad, torch threads '
        f'{torch.get_num_threads()}): ' + ', '.join(f'{t * 1e3:.0f}' for t in times) + ' ms')
    path = os.path.join(HERE, f'{name}.npz')
    save_npz(path, arrays)
    log(f'[{name}] wrote {path}: {os.path.getsize(path)} bytes')
    return arrays


def make_small_checkpoint(clouds, log):
    cfg = SMALL_CONFIG
    model = set_weights(build_model(cfg), WEIGHT_SEEDS['small'])
    optimizer, scheduler = model.get_optimizer(
        type('C', (), {'optimizer': {'lr': 0.001}, 'scheduler_gamma': 0.99})())
    ckpt = dict(epoch=3, model_state_dict=model.state_dict(),
                optimizer_state_dict=optimizer.state_dict(),
                scheduler_state_dict=scheduler.state_dict())
    p_ckpt = os.path.join(HERE, 'small_checkpoint.pth')
    p_sd = os.path.join(HERE, 'small_state_dict.pth')
    torch.save(ckpt, p_ckpt)
    torch.save(model.state_dict(), p_sd)

    # reload both (weights_only=True, the torch>=2.6 default) into fresh models
    for path, get in ((p_ckpt, lambda c: c['model_state_dict']), (p_sd, lambda c: c)):
        loaded = torch.load(path, map_location='cpu', weights_only=True)
        m2 = build_model(cfg)
        m2.load_state_dict(get(loaded))
        for k, v in model.state_dict().items():
            assert torch.equal(v, m2.state_dict()[k]), k

    xyz, rgb = clouds[0]
    pre, off, keep = preprocess(model, xyz, rgb, 0)
    logits, dt = run_batch(model, [pre])
    assert np.isfinite(logits).all() and logits.std() > 0.1

    arrays = config_arrays(cfg)
    arrays['weight_seed'] = np.asarray(WEIGHT_SEEDS['small'], np.int64)
    arrays['epoch'] = np.asarray(3, np.int64)
    arrays['preprocess_seed_b0'] = np.asarray(PRE_SEED, np.int64)
    arrays['grid_offset_b0'] = off
    arrays['points_b0'] = pre['point']
    arrays['feats_b0'] = pre['feat']
    arrays['logits'] = logits
    arrays.update(state_dict_arrays(model))
    path = os.path.join(HERE, 'small_checkpoint.npz')
    save_npz(path, arrays)
    log(f'[small] multiplier 4: {len(model.state_dict())} entries, '
        f'{sum(v.numel() for v in model.state_dict().values())} numbers; logits {logits.shape} '
        f'std {logits.std():.4g}; forward {dt * 1e3:.0f} ms')
    for p in (p_ckpt, p_sd, path):
        log(f'[small] wrote {p}: {os.path.getsize(p)} bytes')


def main():
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f'open3d {open3d.__version__}, torch {torch.__version__}, numpy {np.__version__}, '
        f'python {sys.version.split()[0]}, {datetime.date.today().isoformat()}')
    clouds = [make_cloud(0), make_cloud(1)]
    for b, (xyz, rgb) in enumerate(clouds):
        log(f'cloud {b}: {len(xyz)} points, xyz min {np.round(xyz.min(0), 3).tolist()} '
            f'max {np.round(xyz.max(0), 3).tolist()}')
    for name, cfg in CONFIGS.items():
        make_config_case(name, cfg, clouds, log)
    make_small_checkpoint(clouds, log)


if __name__ == '__main__':
    main()
