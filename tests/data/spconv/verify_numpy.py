"""Check every golden spconv case against a plain-NumPy brute force of its rule.

    python tests/data/spconv/verify_numpy.py [case ...]

Needs only NumPy (no torch, no spconv).  For each case it rebuilds the output
coordinates and features (and the gradients of sum(out_features * grad_out))
from the rules written down in README.md, in float64, and compares them with
what spconv 2.3.8 produced.  Prints the max relative error per array and exits
non-zero if any case disagrees.
"""
import glob
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 2e-5          # max |a - b| / max |b|, float32 spconv vs float64 NumPy
FAILURES = []


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def sort_perm(ind):
    ind = np.asarray(ind)
    return np.lexsort((ind[:, 3], ind[:, 2], ind[:, 1], ind[:, 0]))


def slots(K):
    """All kernel offsets (k0, k1, k2), flattened in C order (the weight's k0, k1, k2 axes)."""
    K = np.asarray(K)
    g = np.stack(np.meshgrid(*[np.arange(k) for k in K], indexing="ij"), -1)
    return g.reshape(-1, 3)


class Table:
    """Coordinate (b, d0, d1, d2) -> row lookup."""

    def __init__(self, ind, shape, batch_size):
        self.shape = np.asarray(shape, np.int64)
        self.B = int(batch_size)
        self.keys = self.key(ind)
        assert len(np.unique(self.keys)) == len(self.keys), "duplicate coordinates"
        self.order = np.argsort(self.keys)
        self.sorted = self.keys[self.order]

    def key(self, ind):
        ind = np.asarray(ind, np.int64)
        S = self.shape
        return ((ind[:, 0] * S[0] + ind[:, 1]) * S[1] + ind[:, 2]) * S[2] + ind[:, 3]

    def find(self, ind):
        """Row of each coordinate, -1 where absent or outside [0, S)."""
        ind = np.asarray(ind, np.int64)
        inside = np.all((ind[:, 1:] >= 0) & (ind[:, 1:] < self.shape), 1)
        res = np.full(len(ind), -1, np.int64)
        if inside.any():
            k = self.key(ind[inside])
            pos = np.clip(np.searchsorted(self.sorted, k), 0, len(self.sorted) - 1)
            hit = self.sorted[pos] == k
            r = np.where(hit, self.order[pos], -1)
            res[inside] = r
        return res


# ---- pair rules: each returns (out_indices sorted, pairs (pi, po, pk), out_shape)
def subm_pairs(ind, S, B, K, dil):
    """SubM: outputs = input rows (input order); slot k reads x[o + (k - K//2) * d]."""
    K = np.asarray(K); dil = np.asarray(dil)
    tab = Table(ind, S, B)
    pi, po, pk = [], [], []
    for k, off in enumerate(slots(K)):
        q = ind.astype(np.int64).copy()
        q[:, 1:] += (off - K // 2) * dil
        r = tab.find(q)
        ok = r >= 0
        pi.append(r[ok]); po.append(np.nonzero(ok)[0]); pk.append(np.full(ok.sum(), k))
    return ind, (np.concatenate(pi), np.concatenate(po), np.concatenate(pk)), np.asarray(S)


def conv_out_shape(S, K, s, p, d):
    return (np.asarray(S) + 2 * np.asarray(p) - np.asarray(d) * (np.asarray(K) - 1) - 1) // np.asarray(s) + 1


def conv_pairs(ind, S, B, K, s, p, d):
    """Regular SparseConv3d: o is active iff some input i = o*s - p + k*d, 0 <= o < So."""
    K, s, p, d = map(np.asarray, (K, s, p, d))
    So = conv_out_shape(S, K, s, p, d)
    cand = []
    for k, off in enumerate(slots(K)):
        num = ind[:, 1:].astype(np.int64) + p - off * d
        o = num // s
        ok = np.all((num % s == 0) & (o >= 0) & (o < So), 1)
        cand.append((np.nonzero(ok)[0], np.concatenate([ind[ok, :1], o[ok]], 1), k))
    allo = np.concatenate([c[1] for c in cand], 0)
    out = np.unique(allo, axis=0).astype(np.int32)
    out = out[sort_perm(out)]
    tab = Table(out, So, B)
    pi = np.concatenate([c[0] for c in cand])
    po = tab.find(allo)
    pk = np.concatenate([np.full(len(c[0]), c[2]) for c in cand])
    assert (po >= 0).all()
    return out, (pi, po, pk), So


def tconv_out_shape(S, K, s, p):
    # spconv's get_deconv_output_size: (S - 1) * s - 2p + K  (no dilation term, no output_padding arg)
    return (np.asarray(S) - 1) * np.asarray(s) - 2 * np.asarray(p) + np.asarray(K)


def tconv_pairs(ind, S, B, K, s, p, d, flip=False):
    """SparseConvTranspose3d: input i scatters to o = i*s - p + k*d with slot k, kept if 0 <= o < So."""
    K, s, p, d = map(np.asarray, (K, s, p, d))
    So = tconv_out_shape(S, K, s, p)
    cand = []
    sl = slots(K)
    for k, off in enumerate(sl):
        o = ind[:, 1:].astype(np.int64) * s - p + off * d
        ok = np.all((o >= 0) & (o < So), 1)
        kk = k
        if flip:  # hypothesis test only: the slot of the mirrored offset
            kk = int(np.nonzero(np.all(sl == K - 1 - off, 1))[0][0])
        cand.append((np.nonzero(ok)[0], np.concatenate([ind[ok, :1], o[ok]], 1), kk))
    allo = np.concatenate([c[1] for c in cand], 0)
    out = np.unique(allo, axis=0).astype(np.int32)
    out = out[sort_perm(out)]
    tab = Table(out, So, B)
    pi = np.concatenate([c[0] for c in cand])
    po = tab.find(allo)
    pk = np.concatenate([np.full(len(c[0]), c[2]) for c in cand])
    return out, (pi, po, pk), So


# ---- linear op on a pair list: y[o] = b + sum_{(i,o,k)} W[:, k, :] @ x[i]
def lin_fwd(x, W, b, pairs, M):
    Cout = W.shape[0]
    Wf = W.reshape(Cout, -1, W.shape[-1]).astype(np.float64)
    y = np.zeros((M, Cout))
    pi, po, pk = pairs
    for k in range(Wf.shape[1]):
        sel = pk == k
        if sel.any():
            np.add.at(y, po[sel], x[pi[sel]] @ Wf[:, k, :].T)
    if b is not None:
        y += b
    return y


def lin_bwd(x, W, g, pairs):
    Cout = W.shape[0]
    Wf = W.reshape(Cout, -1, W.shape[-1]).astype(np.float64)
    gx = np.zeros(x.shape)
    gW = np.zeros(Wf.shape)
    pi, po, pk = pairs
    for k in range(Wf.shape[1]):
        sel = pk == k
        if sel.any():
            np.add.at(gx, pi[sel], g[po[sel]] @ Wf[:, k, :])
            gW[:, k, :] = g[po[sel]].T @ x[pi[sel]]
    return gx, gW.reshape(W.shape), g.sum(0)


def swap(pairs):
    pi, po, pk = pairs
    return (po, pi, pk)


def k1_fwd(x, W, b):
    """spconv 2.x kernel-1 path: x @ weight.reshape(Cin, Cout) (memory reinterpreted)."""
    Cout, Cin = W.shape[0], W.shape[-1]
    y = x @ W.astype(np.float64).reshape(Cin, Cout)
    return y + b if b is not None else y


def k1_bwd(x, W, g):
    Cout, Cin = W.shape[0], W.shape[-1]
    Wr = W.astype(np.float64).reshape(Cin, Cout)
    return g @ Wr.T, (x.T @ g).reshape(W.shape), g.sum(0)


# --------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------
class Checker:
    def __init__(self, name):
        self.name = name
        self.msgs = []
        self.ok = True

    def close(self, key, got, want, tol=TOL):
        got = np.asarray(got, np.float64); want = np.asarray(want, np.float64)
        if got.shape != want.shape:
            self.fail(f"{key}: shape {got.shape} != rule {want.shape}")
            return
        den = max(np.abs(want).max() if want.size else 0.0, 1e-12)
        err = (np.abs(got - want).max() if want.size else 0.0) / den
        self.msgs.append(f"{key}={err:.1e}")
        if not err <= tol:
            self.fail(f"{key}: rel err {err:.3e} > {tol:g}")

    def equal(self, key, got, want):
        got = np.asarray(got); want = np.asarray(want)
        if got.shape != want.shape or not np.array_equal(got, want):
            self.fail(f"{key}: differs from the rule (shape {got.shape} vs {want.shape})")
        else:
            self.msgs.append(f"{key}:exact")

    def info(self, s):
        self.msgs.append(s)

    def fail(self, s):
        self.ok = False
        self.msgs.append("FAIL " + s)

    def slots_used(self, pairs, K, what=""):
        kv = int(np.prod(K))
        cnt = np.bincount(pairs[2], minlength=kv)
        if (cnt == 0).any():
            self.fail(f"{what}kernel slots never used: {np.nonzero(cnt == 0)[0].tolist()}")
        else:
            self.msgs.append(f"{what}min pairs/slot={cnt.min()}")


def g(d, k):
    return d[k].astype(np.float64)


def check_conv_like(c, d, prefix=""):
    """One SubM / regular / transposed conv from the plain keys."""
    op = str(d["op"])
    ind = d["indices"]; S = d["spatial_shape"]; B = int(d["batch_size"])
    K, s, p, dil = d["kernel_size"], d["stride"], d["padding"], d["dilation"]
    x = g(d, "features"); W = d["weight"]; b = g(d, "bias") if "bias" in d else None
    if np.prod(K) == 1 and (op == "SubMConv3d" or (op == "SparseConv3d" and np.all(s == 1))):
        out = ind[sort_perm(ind)]
        perm = sort_perm(ind)
        c.equal("out_indices", d["out_indices"], out)
        c.equal("out_spatial_shape", d["out_spatial_shape"], conv_out_shape(S, K, s, p, dil)
                if op == "SparseConv3d" else S)
        y = k1_fwd(x, W, b)[perm]
        c.close("out_features", d["out_features"], y)
        textbook = x @ W.reshape(W.shape[0], -1).astype(np.float64).T + (b if b is not None else 0)
        err = np.abs(d["out_features"] - textbook[perm]).max() / np.abs(textbook).max()
        c.info(f"textbook(x@W.T) rel err={err:.2f}")
        if err < 1e-3:
            c.fail("k=1 output matches the textbook x @ W.T; quirk not present?")
        gy = np.empty_like(g(d, "grad_out")); gy[perm] = g(d, "grad_out")
        gx, gW, gb = k1_bwd(x, W, gy)
    else:
        if op == "SubMConv3d":
            out, pairs, So = subm_pairs(ind, S, B, K, dil)
            perm = sort_perm(ind)
            out = out[perm]
            y_in = lin_fwd(x, W, b, pairs, len(ind))
            y = y_in[perm]
        elif op == "SparseConv3d":
            out, pairs, So = conv_pairs(ind, S, B, K, s, p, dil)
            y = lin_fwd(x, W, b, pairs, len(out))
        elif op == "SparseConvTranspose3d":
            out, pairs, So = tconv_pairs(ind, S, B, K, s, p, dil)
            y = lin_fwd(x, W, b, pairs, len(out))
            _, fpairs, _ = tconv_pairs(ind, S, B, K, s, p, dil, flip=True)
            yf = lin_fwd(x, W, b, fpairs, len(out))
            if len(yf) == len(d["out_features"]):
                e = np.abs(yf - d["out_features"]).max() / np.abs(y).max()
                c.info(f"flipped-slot hypothesis rel err={e:.2f}")
        else:
            raise ValueError(op)
        c.slots_used(pairs, K)
        c.equal("out_indices", d["out_indices"], out)
        c.equal("out_spatial_shape", d["out_spatial_shape"], np.asarray(So, np.int32))
        c.close("out_features", d["out_features"], y)
        gout = g(d, "grad_out")
        if op == "SubMConv3d":
            gy = np.empty_like(gout); gy[perm] = gout
        else:
            gy = gout
        gx, gW, gb = lin_bwd(x, W, gy, pairs)
    c.close("grad_features", d["grad_features"], gx)
    c.close("grad_weight", d["grad_weight"], gW)
    if b is not None:
        c.close("grad_bias", d["grad_bias"], gb)


def check_inverse(c, d):
    ind = d["indices"]; S = d["spatial_shape"]; B = int(d["batch_size"])
    K, s, p, dil = d["fwd_kernel_size"], d["fwd_stride"], d["fwd_padding"], d["fwd_dilation"]
    x = g(d, "features")
    Wf, bf = d["fwd_weight"], g(d, "fwd_bias")
    Wi, bi = d["weight"], g(d, "bias")
    cout, fpairs, So = conv_pairs(ind, S, B, K, s, p, dil)
    c.slots_used(fpairs, K, "fwd ")
    c.equal("fwd_out_indices", d["fwd_out_indices"], cout)
    c.equal("fwd_out_spatial_shape", d["fwd_out_spatial_shape"], np.asarray(So, np.int32))
    h = lin_fwd(x, Wf, bf, fpairs, len(cout))
    c.close("fwd_out_features", d["fwd_out_features"], h)
    # inverse: outputs are the forward conv's input rows; same slot k, roles swapped
    ipairs = swap(fpairs)
    y_in = lin_fwd(g(d, "fwd_out_features"), Wi, bi, ipairs, len(ind))
    perm = sort_perm(ind)
    c.equal("out_indices", d["out_indices"], ind[perm])
    c.equal("out_spatial_shape", d["out_spatial_shape"], S)
    c.close("out_features", d["out_features"], y_in[perm])
    # rows no forward output reaches: exactly the bias
    dropped = d["dropped_indices"]
    reached = np.zeros(len(ind), bool); reached[fpairs[0]] = True
    want_drop = ind[~reached]; want_drop = want_drop[sort_perm(want_drop)]
    c.equal("dropped_indices", dropped, want_drop.reshape(-1, 4))
    if len(dropped):
        rows = Table(d["out_indices"], S, B).find(dropped)
        exact = np.array_equal(d["out_features"][rows], np.broadcast_to(d["bias"], (len(rows), len(bi))))
        if not exact:
            c.fail("dropped rows are not exactly the bias")
        else:
            c.info(f"{len(dropped)} dropped rows == bias exactly")
    # gradients through both layers
    gy = np.empty_like(g(d, "grad_out")); gy[perm] = g(d, "grad_out")
    h64 = lin_fwd(x, Wf, bf, fpairs, len(cout))
    gh, gWi, gbi = lin_bwd(h64, Wi, gy, ipairs)
    gx, gWf, gbf = lin_bwd(x, Wf, gh, fpairs)
    c.close("grad_weight", d["grad_weight"], gWi)
    c.close("grad_bias", d["grad_bias"], gbi)
    c.close("fwd_grad_weight", d["fwd_grad_weight"], gWf)
    c.close("fwd_grad_bias", d["fwd_grad_bias"], gbf)
    c.close("grad_features", d["grad_features"], gx)


def check_maxpool(c, d):
    ind = d["indices"]; S = d["spatial_shape"]; B = int(d["batch_size"])
    K, s, p, dil = d["kernel_size"], d["stride"], d["padding"], d["dilation"]
    x = g(d, "features")
    out, pairs, So = conv_pairs(ind, S, B, K, s, p, dil)
    c.slots_used(pairs, K)
    c.equal("out_indices", d["out_indices"], out)
    c.equal("out_spatial_shape", d["out_spatial_shape"], np.asarray(So, np.int32))
    pi, po, _ = pairs
    true_max = np.full((len(out), x.shape[1]), -np.inf)
    np.maximum.at(true_max, po, x[pi])
    spconv_rule = np.maximum(true_max, 0.0)   # Native max pool starts from zeros
    buggy = bool(d["spconv_cpu_clamp_bug"])
    if buggy:
        c.close("out_features(vs clamped rule)", d["out_features"], spconv_rule)
        n = int((true_max < 0).sum())
        c.info(f"{n}/{true_max.size} entries differ from the true max (negative maxima -> 0)")
        if n == 0:
            c.fail("mixed-sign case shows no clamping")
        want = spconv_rule
    else:
        if (x <= 0).any():
            c.fail("non-buggy max-pool case must have positive features")
        c.close("out_features", d["out_features"], true_max)
        want = true_max
    # gradient: every input equal to its output's max gets dout (spconv's rule; ties all get it)
    gy = g(d, "grad_out")
    gx = np.zeros_like(x)
    hit = x[pi] == want[po]
    np.add.at(gx, pi, np.where(hit, gy[po], 0.0))
    c.close("grad_features", d["grad_features"], gx)


def check_dense(c, d):
    ind = d["indices"]; S = d["spatial_shape"]; B = int(d["batch_size"]); x = g(d, "features")
    cfg = json.loads(str(d["config"]))
    Cn = x.shape[1]
    dn = np.zeros((B, *S, Cn))
    dn[ind[:, 0], ind[:, 1], ind[:, 2], ind[:, 3]] = x
    go = g(d, "grad_out")
    if cfg["channels_first"]:
        dn = dn.transpose(0, 4, 1, 2, 3)
        gx = go[ind[:, 0], :, ind[:, 1], ind[:, 2], ind[:, 3]]
    else:
        gx = go[ind[:, 0], ind[:, 1], ind[:, 2], ind[:, 3], :]
    c.equal("dense", d["dense"], dn.astype(np.float32))
    c.close("grad_features", d["grad_features"], gx)


def check_block(c, d):
    cfg = json.loads(str(d["config"]))
    ind = d["indices"]; S = d["spatial_shape"]; B = int(d["batch_size"])
    K, s, p, dil = d["kernel_size"], d["stride"], d["padding"], d["dilation"]
    x = g(d, "features"); W = d["weight"]
    if cfg["conv"] == "SubMConv3d":
        out, pairs, So = subm_pairs(ind, S, B, K, dil)
        perm = sort_perm(ind)
        z = lin_fwd(x, W, None, pairs, len(ind))[perm]
        out = out[perm]
        pairs = (pairs[0], np.argsort(perm)[pairs[1]], pairs[2])   # outputs in sorted order
    else:
        out, pairs, So = conv_pairs(ind, S, B, K, s, p, dil)
        z = lin_fwd(x, W, None, pairs, len(out))
    c.slots_used(pairs, K)
    c.equal("out_indices", d["out_indices"], out)
    c.equal("out_spatial_shape", d["out_spatial_shape"], np.asarray(So, np.int32))
    gam, bet = g(d, "bn_weight"), g(d, "bn_bias")
    rm, rv, eps = g(d, "bn_running_mean"), g(d, "bn_running_var"), float(d["bn_eps"])
    inv = 1.0 / np.sqrt(rv + eps)
    zn = (z - rm) * inv
    a = zn * gam + bet
    y = np.maximum(a, 0.0)
    c.close("out_features", d["out_features"], y)
    ga = g(d, "grad_out") * (a > 0)
    c.close("grad_bn_weight", d["grad_bn_weight"], (ga * zn).sum(0))
    c.close("grad_bn_bias", d["grad_bn_bias"], ga.sum(0))
    gz = ga * gam * inv
    gx, gW, _ = lin_bwd(x, W, gz, pairs)
    c.close("grad_weight", d["grad_weight"], gW)
    c.close("grad_features", d["grad_features"], gx)


def check_chain(c, d):
    ind = d["indices"]; S = d["spatial_shape"]; B = int(d["batch_size"]); x = g(d, "features")
    W = [d[f"stage{i}_weight"] for i in range(1, 5)]
    b = [g(d, f"stage{i}_bias") for i in range(1, 5)]
    perm = sort_perm(ind)
    # stage 1: SubM k3 on the fine set (rows in input order)
    geo = [tuple(d[f"stage{i}_{k}"] for k in ("kernel_size", "stride", "padding", "dilation"))
           for i in range(1, 5)]
    _, p1, _ = subm_pairs(ind, S, B, geo[0][0], geo[0][3])
    a1 = lin_fwd(x, W[0], b[0], p1, len(ind)); h1 = np.maximum(a1, 0)
    c.equal("stage1_indices", d["stage1_indices"], ind[perm])
    c.close("stage1_features", d["stage1_features"], h1[perm])
    # stage 2: SparseConv3d k3 s2 p1 (coarse set, sorted)
    cout, p2, So = conv_pairs(ind, S, B, *geo[1])
    a2 = lin_fwd(h1, W[1], b[1], p2, len(cout)); h2 = np.maximum(a2, 0)
    c.equal("stage2_indices", d["stage2_indices"], cout)
    c.equal("stage2_spatial_shape", d["stage2_spatial_shape"], np.asarray(So, np.int32))
    c.close("stage2_features", d["stage2_features"], h2)
    # stage 3: SubM k3 on the coarse set
    _, p3, _ = subm_pairs(cout, So, B, geo[2][0], geo[2][3])
    a3 = lin_fwd(h2, W[2], b[2], p3, len(cout)); h3 = np.maximum(a3, 0)
    c.equal("stage3_indices", d["stage3_indices"], cout)
    c.close("stage3_features", d["stage3_features"], h3)
    # stage 4: inverse of stage 2 back onto the fine set
    assert all(np.array_equal(a, b_) for a, b_ in zip(geo[3], geo[1]))
    p4 = swap(p2)
    y = lin_fwd(h3, W[3], b[3], p4, len(ind))
    c.equal("stage4_indices", d["stage4_indices"], ind[perm])
    c.equal("out_indices", d["out_indices"], ind[perm])
    c.close("stage4_features", d["stage4_features"], y[perm])
    c.close("out_features", d["out_features"], y[perm])
    # backward
    gy = np.empty_like(g(d, "grad_out")); gy[perm] = g(d, "grad_out")
    gh3, gW4, gb4 = lin_bwd(h3, W[3], gy, p4)
    ga3 = gh3 * (a3 > 0)
    gh2, gW3, gb3 = lin_bwd(h2, W[2], ga3, p3)
    ga2 = gh2 * (a2 > 0)
    gh1, gW2, gb2 = lin_bwd(h1, W[1], ga2, p2)
    ga1 = gh1 * (a1 > 0)
    gx, gW1, gb1 = lin_bwd(x, W[0], ga1, p1)
    for i, (gw, gb_) in enumerate([(gW1, gb1), (gW2, gb2), (gW3, gb3), (gW4, gb4)], 1):
        c.close(f"stage{i}_grad_weight", d[f"stage{i}_grad_weight"], gw)
        c.close(f"stage{i}_grad_bias", d[f"stage{i}_grad_bias"], gb_)
    c.close("grad_features", d["grad_features"], gx)


COMMON = ["op", "config", "axis_order", "indices", "features", "spatial_shape", "batch_size"]


def check_file(path):
    name = os.path.basename(path)[:-4]
    d = dict(np.load(path, allow_pickle=False))
    c = Checker(name)
    for k in COMMON:
        if k not in d:
            c.fail(f"missing key {k}")
    if not c.ok:
        return c
    if str(d["axis_order"]) not in ("zyx", "xyz"):
        c.fail("axis_order must be zyx or xyz")
    json.loads(str(d["config"]))
    ind = d["indices"]
    if ind.dtype != np.int32 or ind.shape[1] != 4 or d["features"].dtype != np.float32:
        c.fail("indices must be int32 (N, 4), features float32")
    for k in ("out_indices", "fwd_out_indices", "dropped_indices") + tuple(
            f"stage{i}_indices" for i in range(1, 5)):
        if k in d and len(d[k]) and not np.array_equal(sort_perm(d[k]), np.arange(len(d[k]))):
            c.fail(f"{k} is not sorted")
    op = str(d["op"])
    if op in ("SubMConv3d", "SparseConv3d", "SparseConvTranspose3d"):
        check_conv_like(c, d)
    elif op == "SparseInverseConv3d":
        check_inverse(c, d)
    elif op == "SparseMaxPool3d":
        check_maxpool(c, d)
    elif op == "dense":
        check_dense(c, d)
    elif op == "post_act_block":
        check_block(c, d)
    elif op == "chain":
        check_chain(c, d)
    else:
        c.fail(f"unknown op {op}")
    return c


def main(argv):
    paths = sorted(glob.glob(os.path.join(HERE, "*.npz")))
    if argv:
        paths = [p for p in paths if os.path.basename(p)[:-4] in argv]
    if not paths:
        print("no cases found")
        return 1
    bad = 0
    for p in paths:
        try:
            c = check_file(p)
        except Exception as e:  # a crash in the checker is a failure too
            c = Checker(os.path.basename(p)[:-4]); c.fail(f"{type(e).__name__}: {e}")
        status = "ok  " if c.ok else "FAIL"
        bad += not c.ok
        print(f"{status} {c.name:32s} " + "  ".join(c.msgs))
    print(f"{len(paths) - bad}/{len(paths)} cases pass")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
