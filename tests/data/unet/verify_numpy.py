"""Independent float64 NumPy re-implementation of Open3D-ML's SparseConvUnet (eval), run on the
stored .npz files: checks that each file holds everything needed to reproduce Open3D's logits from
``points_b*`` / ``feats_b*`` / ``sd/*`` alone (no torch, no open3d), on the integer voxel lattice.

    python tests/data/unet/verify_numpy.py      # any Python with numpy

Semantics (see shared REFERENCE-unet.md): voxel = floor(point); voxel order ascending
x + 40960*(y + 40960*z); features = mean rgb; K=3 submanifold conv uses kernel[dz+1, dy+1, dx+1];
K=2 stride-2 conv: parent j = floor(i/2), cell c = i - 2j, kernel[cz, cy, cx]; transposed conv: each
child receives its parent through kernel[c]; coarse voxel order = lexicographic (x, y, z) unique;
BN eval with eps 1e-4; skip concat [skip, up].
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BIG = 1 << 20


def keys_of(c):
    c = c.astype(np.int64) + 2  # subm neighbours may be at -1
    return c[:, 0] + BIG * (c[:, 1] + BIG * c[:, 2])


def subm(f, coords, W):
    k = keys_of(coords)
    order = np.argsort(k)
    ks = k[order]
    out = np.zeros((len(coords), W.shape[-1]))
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                q = keys_of(coords + np.array([dx, dy, dz]))
                pos = np.clip(np.searchsorted(ks, q), 0, len(ks) - 1)
                hit = ks[pos] == q
                src = order[pos[hit]]
                out[hit] += f[src] @ W[dz + 1, dy + 1, dx + 1]
    return out


def down(coords):
    parent = np.floor_divide(coords, 2)
    uniq, inv = np.unique(parent, axis=0, return_inverse=True)  # lexicographic (x, y, z)
    return uniq, inv.reshape(-1), coords - 2 * parent


def conv_down(f, inv, cell, n_out, W):
    out = np.zeros((n_out, W.shape[-1]))
    for cz in (0, 1):
        for cy in (0, 1):
            for cx in (0, 1):
                sel = (cell[:, 0] == cx) & (cell[:, 1] == cy) & (cell[:, 2] == cz)
                np.add.at(out, inv[sel], f[sel] @ W[cz, cy, cx])
    return out


def conv_up(fc, inv, cell, W):
    out = np.zeros((len(inv), W.shape[-1]))
    for cz in (0, 1):
        for cy in (0, 1):
            for cx in (0, 1):
                sel = (cell[:, 0] == cx) & (cell[:, 1] == cy) & (cell[:, 2] == cz)
                out[sel] = fc[inv[sel]] @ W[cz, cy, cx]
    return out


def module_list(reps, planes, residual):
    """Type tags of ``unet.net``, in the same order as UNet.get_UNet."""
    def block(a, b):
        return [('res', a, b)] if residual else [('bn',), ('relu',), ('subm',)]
    layers = []
    for _ in range(reps):
        layers += block(planes[0], planes[0])
    if len(planes) > 1:
        layers += [('concat',), ('bn',), ('relu',), ('conv',)]
        layers += module_list(reps, planes[1:], residual)
        layers += [('bn',), ('relu',), ('deconv',), ('join',)]
        for i in range(reps):
            layers += block(planes[0] * (2 if i == 0 else 1), planes[0])
    return layers


def forward(z, points, feats):
    sd = {k[3:]: z[k].astype(np.float64) for k in z.files if k.startswith('sd/')}
    m = int(z['config_multiplier'])
    reps = int(z['config_conv_block_reps'])
    residual = bool(z['config_residual_blocks'])

    def bn(x, p):
        return ((x - sd[p + '.running_mean']) / np.sqrt(sd[p + '.running_var'] + 1e-4)
                * sd[p + '.weight'] + sd[p + '.bias'])

    relu = lambda x: np.maximum(x, 0)

    i = np.floor(points).astype(np.int64)
    key = i[:, 0] + 40960 * (i[:, 1] + 40960 * i[:, 2])
    ukey, index_map = np.unique(key, return_inverse=True)
    index_map = index_map.reshape(-1)
    coords = np.stack([ukey % 40960, (ukey // 40960) % 40960, ukey // 40960 ** 2], 1)
    cnt = np.bincount(index_map)
    f = np.zeros((len(ukey), 3))
    np.add.at(f, index_map, feats.astype(np.float64)[:, :3])
    f /= cnt[:, None]
    inter = {'inp_feats': f, 'inp_pos': coords + 0.5, 'index_map': index_map, 'level_pos': []}

    f = subm(f, coords, sd['sub_sparse_conv.net.kernel'])
    inter['subm0_feats'] = f
    layers = module_list(reps, [m * k for k in range(1, 8)], residual)
    stack_pos, stack_feat = [], []
    for idx, mod in enumerate(layers):
        p = f'unet.net.{idx}'
        if mod[0] == 'bn':
            f = bn(f, p + '.bn')
        elif mod[0] == 'relu':
            f = relu(f)
        elif mod[0] == 'subm':
            f = subm(f, coords, sd[p + '.net.kernel'])
        elif mod[0] == 'res':
            lin = sd.get(p + '.lin.linear.weight')
            skip = f if lin is None else f @ lin.T
            h = subm(relu(bn(f, p + '.batch_norm1.bn')), coords, sd[p + '.sub_sparse_conv1.net.kernel'])
            h = subm(relu(bn(h, p + '.batch_norm2.bn')), coords, sd[p + '.sub_sparse_conv2.net.kernel'])
            f = skip + h
        elif mod[0] == 'concat':
            stack_feat.append(f)
        elif mod[0] == 'conv':
            uniq, inv, cell = down(coords)
            stack_pos.append((coords, inv, cell))
            f = conv_down(f, inv, cell, len(uniq), sd[p + '.net.kernel'])
            coords = uniq
            inter['level_pos'].append(coords + 0.25)
        elif mod[0] == 'deconv':
            if 'deep_feats' not in inter:
                inter['deep_feats'] = pre_bn_feat
            coords, inv, cell = stack_pos.pop()
            f = conv_up(f, inv, cell, sd[p + '.net.kernel'])
        elif mod[0] == 'join':
            f = np.concatenate([stack_feat.pop(), f], -1)
        if mod[0] in ('subm', 'res'):
            pre_bn_feat = f
    f = relu(bn(f, 'batch_norm.bn'))
    f = f @ sd['linear.linear.weight'].T + sd['linear.linear.bias']
    return f[index_map], inter


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def check(name):
    z = np.load(os.path.join(HERE, name))
    nb = 2 if 'points_b1' in z.files else 1
    outs, worst = [], 0.0
    for b in range(nb):
        logits, inter = forward(z, z[f'points_b{b}'], z[f'feats_b{b}'])
        outs.append(logits)
        msgs = []
        if f'inp_feats_b{b}' in z.files:
            assert np.array_equal(z[f'index_map_b{b}'], inter['index_map'])
            assert np.array_equal(z[f'inp_pos_b{b}'], inter['inp_pos'].astype(np.float32))
            msgs.append(f'inp {rel(z[f"inp_feats_b{b}"], inter["inp_feats"]):.1e}')
            for lev in range(1, 7):
                assert np.array_equal(z[f'level{lev}_pos_b{b}'],
                                      inter['level_pos'][lev - 1].astype(np.float32)), lev
            msgs.append(f'deep {rel(z[f"deep_feats_b{b}"], inter["deep_feats"]):.1e}')
        if f'subm0_feats_b{b}' in z.files:
            msgs.append(f'subm0 {rel(z[f"subm0_feats_b{b}"], inter["subm0_feats"]):.1e}')
        print(f'{name} cloud {b}: ' + ', '.join(msgs))
    logits = np.concatenate(outs)
    r = rel(z['logits'], logits)
    print(f'{name}: logits {z["logits"].shape} max|diff|/max|ref| = {r:.2e}')
    assert r < 1e-5, r
    return r


if __name__ == '__main__':
    for n in ('plain.npz', 'residual.npz', 'small_checkpoint.npz'):
        check(n)
    print('ok')
