"""Generate golden sparse-convolution cases computed by spconv 2.3.8 itself.

Run with the spconv venv (torch 2.13 CPU, spconv 2.3.8 with the CPU cumm build):

    /work/spconv-venv/bin/python tests/data/spconv/make_cases.py

It writes one ``<case>.npz`` per case next to this file (see README.md for the
key list and the rules that verify_numpy.py checks).  Everything is seeded, so
a rerun gives the same inputs; spconv is run on one thread because the CPU
wheel's results are wrong / nondeterministic with more.
"""
import datetime
import json
import os
import sys
import zlib

import numpy as np
import torch

torch.set_num_threads(1)

import spconv  # noqa: E402
import spconv.pytorch as spconv_pt  # noqa: E402
import spconv.pytorch.ops as spconv_ops  # noqa: E402

# The CPU wheel's backward asks torch.cuda for the current stream; on a CPU-only
# build that raises.  ops.py imported the name at module level, so patch it there.
spconv_ops.get_current_stream = lambda: 0

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
B = 2  # batch size of (almost) every case


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------
def case_rng(name):
    """A generator seeded by the case name (stable across Python runs)."""
    return np.random.default_rng(zlib.crc32(name.encode()) + 12345)


def make_cloud(rng, spatial_shape, n, n_clusters=3, sigma=2.0, edges=True):
    """n unique voxels in [0, S) made of a few gaussian clusters plus edge voxels."""
    S = np.asarray(spatial_shape)
    pts = set()
    if edges:
        # voxels on the boundary planes (0 and S-1 of every axis): exercise clipping
        # and the planes an odd-grid stride-2 conv drops.
        for _ in range(max(4, n // 20)):
            p = rng.integers(0, S)
            ax = rng.integers(3)
            p[ax] = 0 if rng.random() < 0.5 else S[ax] - 1
            pts.add(tuple(int(v) for v in p))
    centers = rng.uniform(0, S, size=(n_clusters, 3))
    while len(pts) < n:
        c = centers[rng.integers(n_clusters)]
        p = np.clip(np.round(c + rng.normal(0, sigma, 3)), 0, S - 1).astype(int)
        pts.add(tuple(int(v) for v in p))
    pts = sorted(pts)[:n] if len(pts) > n else sorted(pts)
    return np.array(pts, np.int32)


def make_batch(rng, spatial_shape, sizes, shuffle=True, **kw):
    """Packed (N, 4) int32 indices (b, d0, d1, d2) of len(sizes) clouds, rows shuffled."""
    rows = []
    for b, n in enumerate(sizes):
        c = make_cloud(rng, spatial_shape, n, **kw)
        rows.append(np.concatenate([np.full((len(c), 1), b, np.int32), c], 1))
    ind = np.concatenate(rows, 0)
    if shuffle:
        ind = ind[rng.permutation(len(ind))]
    return np.ascontiguousarray(ind, dtype=np.int32)


def trip(v):
    v = np.asarray(v, np.int32).reshape(-1)
    return np.repeat(v, 3) if v.size == 1 else v


def sort_perm(ind):
    """Permutation sorting rows lexicographically by (b, d0, d1, d2)."""
    ind = np.asarray(ind)
    return np.lexsort((ind[:, 3], ind[:, 2], ind[:, 1], ind[:, 0]))


# --------------------------------------------------------------------------
# running spconv
# --------------------------------------------------------------------------
def sp_tensor(ind, feat, spatial_shape, batch_size=B):
    f = torch.tensor(feat, dtype=torch.float32, requires_grad=True)
    x = spconv_pt.SparseConvTensor(f, torch.tensor(ind, dtype=torch.int32),
                                   [int(s) for s in spatial_shape], batch_size)
    return f, x


def set_params(rng, m, cin, cout, has_bias):
    w = (rng.standard_normal(tuple(m.weight.shape)) * 0.3).astype(np.float32)
    assert w.shape[0] == cout and w.shape[-1] == cin, w.shape  # KRSC (Cout, k0, k1, k2, Cin)
    m.weight.data = torch.tensor(w)
    out = {"weight": w}
    if has_bias:
        b = rng.standard_normal(cout).astype(np.float32)
        m.bias.data = torch.tensor(b)
        out["bias"] = b
    return out


def grads_of(out_t, rng, extra_params, f_leaf):
    """Backprop sum(out_sorted * grad_out); returns (perm, grad_out_sorted, grads)."""
    ind = out_t.indices.detach().numpy()
    perm = sort_perm(ind)
    g_sorted = rng.standard_normal((ind.shape[0], out_t.features.shape[1])).astype(np.float32)
    g = np.empty_like(g_sorted)
    g[perm] = g_sorted
    out_t.features.backward(torch.tensor(g))
    grads = {"grad_features": f_leaf.grad.detach().numpy().copy()}
    for key, p in extra_params.items():
        grads[key] = p.grad.detach().numpy().copy()
    return perm, g_sorted, grads


def out_arrays(t, prefix=""):
    ind = t.indices.detach().numpy().astype(np.int32)
    feat = t.features.detach().numpy().astype(np.float32)
    perm = sort_perm(ind)
    return {prefix + "out_indices": ind[perm], prefix + "out_features": feat[perm],
            prefix + "out_spatial_shape": np.asarray(t.spatial_shape, np.int32)}


def geom(ks, st, pad, dil, prefix=""):
    return {prefix + "kernel_size": trip(ks), prefix + "stride": trip(st),
            prefix + "padding": trip(pad), prefix + "dilation": trip(dil)}


def base(op, config, ind, feat, spatial_shape, axis_order="zyx", batch_size=B):
    return {"op": np.array(op), "config": np.array(json.dumps(config, sort_keys=True)),
            "axis_order": np.array(axis_order), "indices": ind,
            "features": feat.astype(np.float32),
            "spatial_shape": np.asarray(spatial_shape, np.int32),
            "batch_size": np.array(batch_size, np.int64)}


CASES = {}


def save(name, d):
    for k, v in d.items():
        if isinstance(v, np.ndarray) and v.dtype == np.float64:
            raise TypeError(f"{name}:{k} is float64")
    np.savez_compressed(os.path.join(OUT_DIR, name + ".npz"), **d)
    CASES[name] = d
    print(f"{name:32s} N={d['indices'].shape[0]:5d}  out={d.get('out_indices', np.zeros((0,))).shape[0]:5d}")


# --------------------------------------------------------------------------
# single layers
# --------------------------------------------------------------------------
CLS = {"SubMConv3d": spconv_pt.SubMConv3d, "SparseConv3d": spconv_pt.SparseConv3d,
       "SparseConvTranspose3d": spconv_pt.SparseConvTranspose3d}


def conv_case(name, op, spatial_shape, sizes, cin, cout, ks, st=1, pad=0, dil=1,
              bias=True, axis_order="zyx", cloud_kw=None, note=None):
    rng = case_rng(name)
    ind = make_batch(rng, spatial_shape, sizes, **(cloud_kw or {}))
    feat = rng.standard_normal((len(ind), cin)).astype(np.float32)
    m = CLS[op](cin, cout, ks, stride=st, padding=pad, dilation=dil, bias=bias)
    m.train()  # CPU build: a conv with bias asserts in eval()
    params = set_params(rng, m, cin, cout, bias)
    f, x = sp_tensor(ind, feat, spatial_shape)
    y = m(x)
    cfg = {"class": op, "in_channels": cin, "out_channels": cout, "kernel_size": ks,
           "stride": st, "padding": pad, "dilation": dil, "bias": bias, "indice_key": None}
    if note:
        cfg["note"] = note
    d = base(op, cfg, ind, feat, spatial_shape, axis_order)
    d.update(geom(ks, st, pad, dil))
    d.update(params)
    d.update(out_arrays(y))
    extra = {"grad_weight": m.weight}
    if bias:
        extra["grad_bias"] = m.bias
    _, g, grads = grads_of(y, rng, extra, f)
    d["grad_out"] = g
    d.update(grads)
    save(name, d)


def inverse_case(name, spatial_shape, sizes, cin, cmid, ks, st, pad=0, dil=1,
                 axis_order="zyx", cloud_kw=None, fwd_op="SparseConv3d"):
    """forward SparseConv3d (indice_key 'k') -> SparseInverseConv3d(indice_key 'k')."""
    rng = case_rng(name)
    ind = make_batch(rng, spatial_shape, sizes, **(cloud_kw or {}))
    feat = rng.standard_normal((len(ind), cin)).astype(np.float32)
    fwd = spconv_pt.SparseConv3d(cin, cmid, ks, stride=st, padding=pad, dilation=dil,
                                 bias=True, indice_key="k")
    inv = spconv_pt.SparseInverseConv3d(cmid, cin, ks, indice_key="k", bias=True)
    fwd.train(); inv.train()
    pf = set_params(rng, fwd, cin, cmid, True)
    pi = set_params(rng, inv, cmid, cin, True)
    f, x = sp_tensor(ind, feat, spatial_shape)
    h = fwd(x)
    y = inv(h)
    cfg = {"fwd": {"class": "SparseConv3d", "in_channels": cin, "out_channels": cmid,
                   "kernel_size": ks, "stride": st, "padding": pad, "dilation": dil,
                   "bias": True, "indice_key": "k"},
           "inv": {"class": "SparseInverseConv3d", "in_channels": cmid, "out_channels": cin,
                   "kernel_size": ks, "bias": True, "indice_key": "k"}}
    d = base("SparseInverseConv3d", cfg, ind, feat, spatial_shape, axis_order)
    d.update(geom(ks, st, pad, dil))          # what the inverse layer effectively uses
    d.update(geom(ks, st, pad, dil, "fwd_"))
    d.update({"fwd_" + k: v for k, v in pf.items()})
    d.update(pi)
    d.update(out_arrays(h, "fwd_"))
    d.update(out_arrays(y))
    # fine rows that the forward conv dropped (no output in reach): they get just the bias
    S = np.asarray(spatial_shape)
    So = d["fwd_out_spatial_shape"]
    stv, padv, dilv, ksv = trip(st), trip(pad), trip(dil), trip(ks)
    reach = np.zeros(len(ind), bool)
    for k0 in range(ksv[0]):
        for k1 in range(ksv[1]):
            for k2 in range(ksv[2]):
                num = ind[:, 1:] + padv - np.array([k0, k1, k2]) * dilv
                ok = np.all((num % stv == 0) & (num // stv >= 0) & (num // stv < So), 1)
                reach |= ok
    dropped = ind[~reach]
    d["dropped_indices"] = dropped[sort_perm(dropped)] if len(dropped) else np.zeros((0, 4), np.int32)
    extra = {"fwd_grad_weight": fwd.weight, "fwd_grad_bias": fwd.bias,
             "grad_weight": inv.weight, "grad_bias": inv.bias}
    _, g, grads = grads_of(y, rng, extra, f)
    d["grad_out"] = g
    d.update(grads)
    save(name, d)
    return d


def maxpool_case(name, spatial_shape, sizes, c, ks, st, pad=0, dil=1, positive=True, note=None):
    rng = case_rng(name)
    ind = make_batch(rng, spatial_shape, sizes)
    feat = rng.standard_normal((len(ind), c)).astype(np.float32)
    if positive:
        feat = (np.abs(feat) + 0.1).astype(np.float32)
    m = spconv_pt.SparseMaxPool3d(ks, st, pad, dil)
    f, x = sp_tensor(ind, feat, spatial_shape)
    y = m(x)
    cfg = {"class": "SparseMaxPool3d", "kernel_size": ks, "stride": st, "padding": pad,
           "dilation": dil, "positive_features": positive,
           "algo": "Native (forced by the CPU-only build)"}
    if note:
        cfg["note"] = note
    d = base("SparseMaxPool3d", cfg, ind, feat, spatial_shape)
    d.update(geom(ks, st, pad, dil))
    d.update(out_arrays(y))
    _, g, grads = grads_of(y, rng, {}, f)
    d["grad_out"] = g
    d.update(grads)
    d["spconv_cpu_clamp_bug"] = np.array(not positive)
    save(name, d)


def dense_case(name, channels_first):
    rng = case_rng(name)
    S = [5, 6, 7]
    ind = make_batch(rng, S, [40, 25])
    feat = rng.standard_normal((len(ind), 3)).astype(np.float32)
    f, x = sp_tensor(ind, feat, S)
    dn = x.dense(channels_first=channels_first)
    cfg = {"method": "SparseConvTensor.dense", "channels_first": channels_first,
           "layout": "(B, C, D0, D1, D2)" if channels_first else "(B, D0, D1, D2, C)"}
    d = base("dense", cfg, ind, feat, S)
    d["dense"] = dn.detach().numpy().astype(np.float32)
    g = rng.standard_normal(dn.shape).astype(np.float32)
    dn.backward(torch.tensor(g))
    d["grad_out"] = g
    d["grad_features"] = f.grad.numpy().copy()
    save(name, d)


def block_case(name, conv_op, spatial_shape, sizes, cin, cout, ks, st=1, pad=0):
    """OpenPCDet post_act_block: conv(bias=False) -> BatchNorm1d(eps=1e-3, momentum=0.01, eval) -> ReLU."""
    rng = case_rng(name)
    ind = make_batch(rng, spatial_shape, sizes)
    feat = rng.standard_normal((len(ind), cin)).astype(np.float32)
    conv = CLS[conv_op](cin, cout, ks, stride=st, padding=pad, bias=False,
                        indice_key="spconv1" if conv_op == "SparseConv3d" else "subm1")
    bn = torch.nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01)
    net = spconv_pt.SparseSequential(conv, bn, torch.nn.ReLU())
    params = set_params(rng, conv, cin, cout, False)
    bnp = {"bn_weight": rng.uniform(0.5, 1.5, cout).astype(np.float32),
           "bn_bias": (rng.standard_normal(cout) * 0.3).astype(np.float32),
           "bn_running_mean": (rng.standard_normal(cout) * 0.3).astype(np.float32),
           "bn_running_var": rng.uniform(0.3, 2.0, cout).astype(np.float32)}
    bn.weight.data = torch.tensor(bnp["bn_weight"]); bn.bias.data = torch.tensor(bnp["bn_bias"])
    bn.running_mean.data = torch.tensor(bnp["bn_running_mean"])
    bn.running_var.data = torch.tensor(bnp["bn_running_var"])
    net.train(); bn.eval()
    f, x = sp_tensor(ind, feat, spatial_shape)
    y = net(x)
    cfg = {"class": "post_act_block", "conv": conv_op, "in_channels": cin, "out_channels": cout,
           "kernel_size": ks, "stride": st, "padding": pad, "dilation": 1, "bias": False,
           "bn": {"eps": 1e-3, "momentum": 0.01, "mode": "eval"}, "act": "ReLU"}
    d = base("post_act_block", cfg, ind, feat, spatial_shape)
    d.update(geom(ks, st, pad, 1))
    d.update(params)
    d.update(bnp)
    d["bn_eps"] = np.array(1e-3, np.float32)
    d.update(out_arrays(y))
    extra = {"grad_weight": conv.weight, "grad_bn_weight": bn.weight, "grad_bn_bias": bn.bias}
    _, g, grads = grads_of(y, rng, extra, f)
    d["grad_out"] = g
    d.update(grads)
    save(name, d)


def chain_case(name):
    """SubM k3 -> ReLU -> SparseConv3d k3 s2 p1 ('down1') -> ReLU -> SubM k3 -> ReLU
    -> SparseInverseConv3d k3 ('down1')."""
    rng = case_rng(name)
    S = [21, 30, 26]
    ind = make_batch(rng, S, [450, 300])
    c0, c1, c2 = 4, 6, 8
    feat = rng.standard_normal((len(ind), c0)).astype(np.float32)
    layers = [spconv_pt.SubMConv3d(c0, c1, 3, bias=True, indice_key="subm1"),
              spconv_pt.SparseConv3d(c1, c2, 3, stride=2, padding=1, bias=True, indice_key="down1"),
              spconv_pt.SubMConv3d(c2, c2, 3, bias=True, indice_key="subm2"),
              spconv_pt.SparseInverseConv3d(c2, c1, 3, indice_key="down1", bias=True)]
    geoms = [(3, 1, 0, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 2, 1, 1)]
    chans = [(c0, c1), (c1, c2), (c2, c2), (c2, c1)]
    d = {}
    for i, (m, (ci, co)) in enumerate(zip(layers, chans), 1):
        m.train()
        p = set_params(rng, m, ci, co, True)
        d[f"stage{i}_weight"] = p["weight"]
        d[f"stage{i}_bias"] = p["bias"]
        d.update(geom(*geoms[i - 1], prefix=f"stage{i}_"))
    f, x = sp_tensor(ind, feat, S)
    t = x
    outs = []
    for i, m in enumerate(layers, 1):
        t = m(t)
        if i < 4:
            t = t.replace_feature(torch.relu(t.features))
        outs.append(t)
    cfg = {"stages": [
        {"class": "SubMConv3d", "in_channels": c0, "out_channels": c1, "kernel_size": 3,
         "bias": True, "indice_key": "subm1", "act": "ReLU"},
        {"class": "SparseConv3d", "in_channels": c1, "out_channels": c2, "kernel_size": 3,
         "stride": 2, "padding": 1, "bias": True, "indice_key": "down1", "act": "ReLU"},
        {"class": "SubMConv3d", "in_channels": c2, "out_channels": c2, "kernel_size": 3,
         "bias": True, "indice_key": "subm2", "act": "ReLU"},
        {"class": "SparseInverseConv3d", "in_channels": c2, "out_channels": c1,
         "kernel_size": 3, "bias": True, "indice_key": "down1", "act": None}]}
    d.update(base("chain", cfg, ind, feat, S))
    d.update(geom(3, 2, 1, 1))  # of the last (inverse) layer, as it effectively uses
    for i, t in enumerate(outs, 1):
        a = out_arrays(t)
        d[f"stage{i}_indices"] = a["out_indices"]
        d[f"stage{i}_features"] = a["out_features"]
        d[f"stage{i}_spatial_shape"] = a["out_spatial_shape"]
    d.update(out_arrays(outs[-1]))
    extra = {}
    for i, m in enumerate(layers, 1):
        extra[f"stage{i}_grad_weight"] = m.weight
        extra[f"stage{i}_grad_bias"] = m.bias
    _, g, grads = grads_of(outs[-1], rng, extra, f)
    d["grad_out"] = g
    d.update(grads)
    save(name, d)


def main():
    for fn in os.listdir(OUT_DIR):
        if fn.endswith(".npz"):
            os.remove(os.path.join(OUT_DIR, fn))
    # ---- SubMConv3d
    conv_case("subm_k3", "SubMConv3d", [20, 24, 22], [400, 250], 4, 6, 3)
    conv_case("subm_k313", "SubMConv3d", [20, 24, 22], [400, 250], 4, 6, (3, 1, 3))
    conv_case("subm_k5", "SubMConv3d", [20, 24, 22], [350, 200], 3, 5, 5)
    conv_case("subm_k3_d2", "SubMConv3d", [20, 24, 22], [400, 250], 4, 6, 3, dil=2,
              cloud_kw={"sigma": 3.0})
    conv_case("subm_k1", "SubMConv3d", [12, 14, 10], [120, 70], 3, 5, 1,
              note="kernel-1 quirk: spconv computes x @ weight.reshape(Cin, Cout) + bias")
    conv_case("subm_k3_p1_s2", "SubMConv3d", [20, 24, 22], [400, 250], 4, 6, 3, st=2, pad=1,
              note="padding=1 and stride=2 passed as OpenPCDet does; SubM ignores both")
    # ---- SparseConv3d (regular)
    conv_case("conv_k3s2p1_odd", "SparseConv3d", [41, 64, 48], [900, 600], 4, 8, 3, st=2, pad=1,
              cloud_kw={"n_clusters": 5, "sigma": 3.0},
              note="OpenPCDet down conv on a KITTI-like odd z extent")
    conv_case("conv_k2s2_even", "SparseConv3d", [16, 20, 18], [350, 200], 4, 6, 2, st=2)
    conv_case("conv_k2s2_odd", "SparseConv3d", [15, 21, 17], [350, 200], 4, 6, 2, st=2,
              note="odd grid: the last plane of every odd axis has no output")
    conv_case("conv_k3s1p1", "SparseConv3d", [14, 16, 15], [250, 150], 3, 5, 3, st=1, pad=1)
    conv_case("conv_k3s2_p011", "SparseConv3d", [11, 40, 36], [400, 250], 4, 6, 3, st=2,
              pad=(0, 1, 1), note="OpenPCDet stage 4 (conv4)")
    conv_case("conv_k311_s211", "SparseConv3d", [5, 40, 36], [400, 250], 4, 6, (3, 1, 1),
              st=(2, 1, 1), pad=0, note="OpenPCDet conv_out")
    conv_case("conv_k3s1p2_d2", "SparseConv3d", [14, 16, 15], [250, 150], 3, 5, 3, st=1, pad=2,
              dil=2)
    conv_case("conv_k3s2p0", "SparseConv3d", [17, 20, 19], [350, 200], 4, 6, 3, st=2, pad=0)
    conv_case("conv_k3s122p1", "SparseConv3d", [17, 20, 19], [350, 200], 4, 6, 3, st=(1, 2, 2),
              pad=1, note="per-axis stride")
    conv_case("conv_k1s1", "SparseConv3d", [12, 14, 10], [120, 70], 3, 5, 1,
              note="regular conv with k=1 s=1 takes the same 1x1 path as SubM k=1 (quirk)")
    # ---- inverse
    inverse_case("inv_k3s2p1", [17, 22, 20], [350, 200], 4, 6, 3, 2, 1)
    inverse_case("inv_k2s2", [16, 20, 18], [350, 200], 4, 6, 2, 2)
    d = inverse_case("inv_k2s2_odd", [15, 21, 17], [350, 200], 4, 6, 2, 2)
    assert len(d["dropped_indices"]) > 0, "odd-grid inverse case must have dropped rows"
    # ---- transposed (generative)
    conv_case("tconv_k2s2", "SparseConvTranspose3d", [8, 10, 9], [120, 80], 4, 6, 2, st=2)
    conv_case("tconv_k3s2p1", "SparseConvTranspose3d", [8, 10, 9], [120, 80], 4, 6, 3, st=2,
              pad=1)
    conv_case("tconv_k3s1p1", "SparseConvTranspose3d", [10, 12, 11], [150, 90], 4, 6, 3, st=1,
              pad=1)
    conv_case("tconv_k3s1p2_d2", "SparseConvTranspose3d", [10, 12, 11], [150, 90], 3, 5, 3,
              st=1, pad=2, dil=2,
              note="dilation: out_spatial_shape formula has no dilation term")
    conv_case("tconv_k3s2p0_asym", "SparseConvTranspose3d", [6, 9, 8], [80, 50], 3, 5, (3, 2, 1),
              st=(2, 2, 1), pad=0, note="asymmetric kernel: shows the slot order / no flip")
    # ---- pooling
    maxpool_case("maxpool_k2s2", [16, 21, 18], [350, 200], 4, 2, 2)
    maxpool_case("maxpool_k3s2p1", [17, 22, 19], [350, 200], 4, 3, 2, 1)
    maxpool_case("maxpool_k3s2p1_mixed_sign_buggy", [17, 22, 19], [350, 200], 4, 3, 2, 1,
                 positive=False,
                 note="BUGGY: spconv's Native max pool starts from 0, so negative maxima become 0")
    # ---- dense
    dense_case("dense", True)
    dense_case("dense_channels_last", False)
    # ---- blocks
    block_case("block_conv_bn_relu", "SparseConv3d", [21, 30, 26], [450, 300], 4, 8, 3, 2, 1)
    block_case("block_subm_bn_relu", "SubMConv3d", [21, 30, 26], [450, 300], 4, 8, 3, 1, 1)
    # ---- chain
    chain_case("chain_encdec")
    # ---- Pointcept axis order (columns b, x, y, z)
    conv_case("pointcept_xyz_subm_k3", "SubMConv3d", [26, 18, 12], [400, 250], 4, 6, 3,
              axis_order="xyz")
    inverse_case("pointcept_xyz_down_k2s2_inv", [26, 18, 12], [400, 250], 4, 6, 2, 2,
                 axis_order="xyz")

    meta = {"spconv": spconv.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0],
            "torch_num_threads": torch.get_num_threads(),
            "generated": datetime.date.today().isoformat(), "cases": sorted(CASES)}
    with open(os.path.join(OUT_DIR, "provenance.json"), "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(OUT_DIR, n + ".npz")) for n in CASES)
    print(f"{len(CASES)} cases, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
