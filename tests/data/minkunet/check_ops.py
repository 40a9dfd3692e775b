"""Checks the op equivalences and layouts behind the MinkUNet cases.

  /work/spconv-venv/bin/python tests/data/minkunet/check_ops.py        # spconv vs layouts.py
  OMP_NUM_THREADS=1 /work/me-venv/bin/python tests/data/minkunet/check_ops.py --me
                                                   # + live MinkowskiEngine vs layouts.py

For each op the nets use (odd-K stride-1 conv K=3 and 5, k2 s2 conv, k2 s2 transposed conv
onto the cached finer map, kernel-1 conv with bias), with every kernel slot holding a
different random weight:

* spconv (reference_nets.sparse_conv) == layouts.spconv_conv_numpy (spconv's rule) ==
  layouts.me_conv_numpy on layouts.spconv_to_me_kernel(weight) == layouts.ts_conv_numpy
  on layouts.spconv_to_ts_kernel(weight) for TorchSparse 1.4, 2.0 and 2.1 coordinates;
* with --me: live ME (MinkowskiConvolution / MinkowskiConvolutionTranspose on
  ME.SparseTensor, negative coordinates included) == layouts.me_conv_numpy on the same kernel.

Prints the max relative error of each and exits 1 above 1e-5.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import layouts as L  # noqa: E402

TOL = 1e-5
FAIL = []


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def report(name, err):
  ok = err <= TOL
  print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e}")
  if not ok:
    FAIL.append(name)


def cloud(rng, n=600, ext=20, lo=0):
  c = np.c_[rng.integers(0, 2, n), rng.integers(lo, lo + ext, (n, 3))]
  c = np.unique(c, axis=0)
  return c[rng.permutation(len(c))].astype(np.int64)


def sort_rows(c, y):
  o = np.lexsort(c.T[::-1])
  return c[o], y[o]


def check_spconv(rng):
  import torch
  import reference_nets as R
  R.setup_spconv_cpu()
  idx = cloud(rng)
  cin, cout = 3, 4
  x = rng.standard_normal((len(idx), cin)).astype(np.float32)
  ts_c = idx[:, [1, 2, 3, 0]]  # TorchSparse 1.4 / 2.0 (x, y, z, b)

  for K in (3, 5):
    conv = R.sparse_conv(cin, cout, K, level=1)
    with torch.no_grad():
      conv.weight.copy_(torch.randn_like(conv.weight))
      y = conv(R.sparse_input(x, idx, 2)).features.numpy()
    w = conv.weight.detach().numpy()
    _, yb = L.spconv_conv_numpy(idx, x, w, "subm")
    report(f"spconv SubM K={K} vs spconv rule", rel(y, yb))
    _, ym = L.me_conv_numpy(idx, x, L.spconv_to_me_kernel(w), K)
    report(f"spconv SubM K={K} vs ME rule (converted kernel)", rel(y, ym))
    for v, c in (("1.4", ts_c), ("2.0", ts_c), ("2.1", idx)):
      _, yt = L.ts_conv_numpy(c, x, L.spconv_to_ts_kernel(w), K, version=v)
      report(f"spconv SubM K={K} vs TS {v} rule (converted kernel)", rel(y, yt))

  # k2 s2 down, then the inverse conv back onto the fine rows; input at tensor stride 2
  # for ME / TS 1.4 (coordinates multiplied by 2) to exercise the tensor-stride scaling.
  down = R.sparse_conv(cin, cout, 2, stride=2, level=1)
  inv = R.sparse_conv(cout, cin + 1, 2, stride=2, transposed=True, level=1)
  with torch.no_grad():
    down.weight.copy_(torch.randn_like(down.weight))
    inv.weight.copy_(torch.randn_like(inv.weight))
    t = down(R.sparse_input(x, idx, 2))
    yd = t.features.numpy()
    cd = t.indices.numpy().astype(np.int64)
    yi = inv(t).features.numpy()
  wd, wi = down.weight.detach().numpy(), inv.weight.detach().numpy()
  cd_s, yd_s = sort_rows(cd, yd)
  c_b, y_b = L.spconv_conv_numpy(idx, x, wd, "down")
  report("spconv k2s2 coords == floor(i/2)", float(not np.array_equal(cd_s, c_b)))
  report("spconv k2s2 vs spconv rule", rel(yd_s, y_b))
  _, yib = L.spconv_conv_numpy(cd, yd, wi, "inverse", out_idx=idx)
  report("spconv inverse k2s2 vs spconv rule", rel(yi, yib))

  for ts in (1, 2):
    ci = idx.copy()
    ci[:, 1:] *= ts
    co, ym = L.me_conv_numpy(ci, x, L.spconv_to_me_kernel(wd), 2, tensor_stride=ts, stride=2)
    cexp = cd_s.copy()
    cexp[:, 1:] *= 2 * ts
    report(f"ME k2s2 (ts={ts}) coords == spconv's * {2 * ts}", float(not np.array_equal(co, cexp)))
    report(f"spconv k2s2 vs ME rule ts={ts}", rel(yd_s, ym))
    cc = cd.copy()
    cc[:, 1:] *= 2 * ts
    _, ymi = L.me_conv_numpy(cc, yd, L.spconv_to_me_kernel(wi), 2, tensor_stride=2 * ts,
                             stride=2, out_coords=ci, transposed=True)
    report(f"spconv inverse vs ME transposed rule ts={ts}", rel(yi, ymi))
    for v in ("1.4", "2.0"):
      co, yt = L.ts_conv_numpy(ci[:, [1, 2, 3, 0]], x, L.spconv_to_ts_kernel(wd), 2,
                               tensor_stride=ts, stride=2, version=v)
      co = co[:, [3, 0, 1, 2]]
      o = np.lexsort(co.T[::-1])
      report(f"spconv k2s2 vs TS {v} rule ts={ts}", rel(yd_s, yt[o]))
      _, yti = L.ts_conv_numpy(cc[:, [1, 2, 3, 0]], yd, L.spconv_to_ts_kernel(wi), 2,
                               tensor_stride=2 * ts, stride=2, out_coords=ci[:, [1, 2, 3, 0]],
                               transposed=True, version=v)
      report(f"spconv inverse vs TS {v} transposed rule ts={ts}", rel(yi, yti))
  co, yt = L.ts_conv_numpy(idx, x, L.spconv_to_ts_kernel(wd), 2, stride=2, version="2.1")
  report("spconv k2s2 coords == TS 2.1 coords", float(not np.array_equal(co, cd_s)))
  report("spconv k2s2 vs TS 2.1 rule", rel(yd_s, yt))
  _, yti = L.ts_conv_numpy(cd, yd, L.spconv_to_ts_kernel(wi), 2, stride=2, out_coords=idx,
                           transposed=True, version="2.1")
  report("spconv inverse vs TS 2.1 transposed rule", rel(yi, yti))

  # the ME (x fastest) and TS (z fastest) K=2 orders really differ
  k = L.spconv_to_me_kernel(wd)
  report("ME and TS K=2 slot orders differ", float(np.allclose(k, L.spconv_to_ts_kernel(wd))))

  # kernel-1 with bias (ME final / TS downsample) and the state-dict round trips
  lin = R.sparse_conv(cin, cout, 1, bias=True)
  with torch.no_grad():
    lin.bias.copy_(torch.randn_like(lin.bias))
    y = lin(R.sparse_input(x, idx, 2)).features.numpy()
  w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
  _, ym = L.me_conv_numpy(idx, x, L.spconv_to_me_kernel(w), 1, bias=b.reshape(1, -1))
  report("k1 + bias vs ME rule ((Cin, Cout) kernel, (1, Cout) bias)", rel(y, ym))
  sd = {"a.weight": wd, "b.weight": w, "b.bias": b, "c.weight": np.ones(3)}
  for f, g in ((L.spconv_to_me_state_dict, L.me_to_spconv_state_dict),
               (L.spconv_to_ts_state_dict, L.ts_to_spconv_state_dict)):
    back = g(f(sd))
    report(f"{f.__name__} round trip",
           float(sorted(back) != sorted(sd) or any(not np.array_equal(back[k], sd[k]) for k in sd)))


def check_me(rng):
  import torch
  import MinkowskiEngine as ME
  torch.manual_seed(0)
  c = cloud(rng, lo=-9)  # negative coordinates: ME floors them too
  x = rng.standard_normal((len(c), 3)).astype(np.float32)

  def st(coords, feats, ts=1):
    return ME.SparseTensor(torch.tensor(feats), coordinates=torch.tensor(coords, dtype=torch.int32),
                           tensor_stride=ts)

  for K in (3, 5):
    conv = ME.MinkowskiConvolution(3, 4, kernel_size=K, dimension=3)
    with torch.no_grad():
      conv.kernel.copy_(torch.randn_like(conv.kernel))
      s = st(c, x)
      y = conv(s)
    cy = y.C.numpy().astype(np.int64)
    _, yb = L.me_conv_numpy(c, x, conv.kernel.detach().numpy(), K)
    j = L._index(c, cy)
    report(f"live ME conv K={K} rows == input rows", float((j < 0).any()))
    report(f"live ME conv K={K} vs ME rule", rel(y.F.detach().numpy(), yb[j]))

  for ts in (1, 2):
    ci = c.copy()
    ci[:, 1:] *= ts
    down = ME.MinkowskiConvolution(3, 4, kernel_size=2, stride=2, dimension=3)
    up = ME.MinkowskiConvolutionTranspose(4, 5, kernel_size=2, stride=2, dimension=3)
    with torch.no_grad():
      down.kernel.copy_(torch.randn_like(down.kernel))
      up.kernel.copy_(torch.randn_like(up.kernel))
      s = st(ci, x, ts)
      d = down(s)
      u = up(d)
    cd = d.C.numpy().astype(np.int64)
    co, yb = L.me_conv_numpy(ci, x, down.kernel.detach().numpy(), 2, tensor_stride=ts, stride=2)
    j = L._index(co, cd)
    report(f"live ME k2s2 ts={ts} coords == floor to {2 * ts}",
           float(len(cd) != len(co) or (j < 0).any()))
    report(f"live ME k2s2 ts={ts} vs ME rule", rel(d.F.detach().numpy(), yb[j]))
    cu = u.C.numpy().astype(np.int64)
    _, ybu = L.me_conv_numpy(cd, d.F.detach().numpy(), up.kernel.detach().numpy(), 2,
                             tensor_stride=2 * ts, stride=2, out_coords=ci, transposed=True)
    j = L._index(ci, cu)
    report(f"live ME transposed ts={ts} onto the cached fine map",
           float(len(cu) != len(ci) or (j < 0).any()))
    report(f"live ME transposed ts={ts} vs ME rule", rel(u.F.detach().numpy(), ybu[j]))

  lin = ME.MinkowskiConvolution(3, 4, kernel_size=1, bias=True, dimension=3)
  with torch.no_grad():
    lin.bias.copy_(torch.randn_like(lin.bias))
    y = lin(st(c, x))
  report("live ME k1 kernel shape (Cin, Cout), bias (1, Cout)",
         float(tuple(lin.kernel.shape) != (3, 4) or tuple(lin.bias.shape) != (1, 4)))
  cy = y.C.numpy().astype(np.int64)
  _, yb = L.me_conv_numpy(c, x, lin.kernel.detach().numpy(), 1, bias=lin.bias.detach().numpy())
  report("live ME k1 + bias vs ME rule", rel(y.F.detach().numpy(), yb[L._index(c, cy)]))


if __name__ == "__main__":
  rng = np.random.default_rng(1234)
  if "--me" in sys.argv:
    check_me(rng)
  else:
    check_spconv(rng)
  sys.exit(1 if FAIL else 0)
