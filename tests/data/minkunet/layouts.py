"""Kernel slot orders and state-dict layouts of spconv 2.x, MinkowskiEngine 0.5 and
TorchSparse 1.4 / 2.0 / 2.1, in plain NumPy (no torch needed). See LAYOUTS.md.

* spconv 2.x: ``weight (Cout, k0, k1, k2, Cin)``, kernel axis ``k_a`` on index column
  ``d_a``; here the columns are ``(b, x, y, z)``, so ``(k0, k1, k2) = (kx, ky, kz)``.
* ME: ``kernel (K^3, Cin, Cout)``, slot ``s = ix + K*(iy + K*iz)`` (x fastest) for odd and
  even K; offset of index ``i``: ``(i - K//2) * ts * d`` for odd K, ``i * ts * d`` for even K.
  A kernel-1 stride-1 conv holds ``kernel (Cin, Cout)``; a bias is ``(1, Cout)``.
* TorchSparse: ``kernel (K^3, Cin, Cout)``; odd ``K^3``: x fastest (as ME); even ``K^3``:
  z fastest, ``s = iz + K*(iy + K*ix)``; offsets ``(i - (K-1)//2)`` (odd: ``-K//2..``, even:
  ``0..K-1``); kernel-1 stride-1 ``(Cin, Cout)``; bias ``(Cout,)``.

``me_conv_numpy`` / ``ts_conv_numpy`` are brute-force convs that read a library's kernel
by that library's slot rule: for every output and slot, the input at the offset that
library assigns to the slot.
"""

from __future__ import annotations

import numpy as np


# --------------------------------------------------------------------------- slot orders
def me_kernel_offsets(kernel_size, tensor_stride=1, dilation=1):
  """(K^3, 3) integer (x, y, z) offsets, row = ME slot (src/kernel_region.hpp coordinate_at)."""
  K = int(kernel_size)
  if K % 2:
    o = (np.arange(K) - K // 2) * tensor_stride * dilation
  else:
    o = np.arange(K) * tensor_stride * dilation
  iz, iy, ix = np.meshgrid(o, o, o, indexing="ij")  # last axis (x) fastest
  return np.stack([ix.ravel(), iy.ravel(), iz.ravel()], 1).astype(np.int64)


def ts_kernel_offsets(kernel_size, stride=1):
  """(K^3, 3) (x, y, z) offsets, row = TorchSparse slot (nn/utils/kernel.py
  get_kernel_offsets, 1.4 and 2.0; the 2.1 CUDA kmap kernels enumerate the same order).
  ``stride``: 1.4/2.0 pass the input tensor stride (coordinates kept in input-voxel units);
  2.1 uses 1 (coordinates in the level's own units)."""
  K = int(kernel_size)
  o = np.arange(-K // 2 + 1, K // 2 + 1) * stride  # (-K)//2 + 1: odd -K//2.., even 0..K-1
  if (K ** 3) % 2 == 1:
    return np.array([[x, y, z] for z in o for y in o for x in o], dtype=np.int64)
  return np.array([[x, y, z] for x in o for y in o for z in o], dtype=np.int64)


# --------------------------------------------------------------------------- kernels
def spconv_to_me_kernel(w):
  """spconv (Cout, kx, ky, kz, Cin) -> ME (K^3, Cin, Cout); kernel-1 -> (Cin, Cout)."""
  w = np.asarray(w)
  cout, kx, ky, kz, cin = w.shape
  if kx == ky == kz == 1:
    return np.ascontiguousarray(w.reshape(cout, cin).T)
  return np.ascontiguousarray(w.transpose(3, 2, 1, 4, 0).reshape(kx * ky * kz, cin, cout))


def me_to_spconv_kernel(k, kernel_size=None):
  k = np.asarray(k)
  if k.ndim == 2:
    cin, cout = k.shape
    return np.ascontiguousarray(k.T.reshape(cout, 1, 1, 1, cin))
  v, cin, cout = k.shape
  K = kernel_size or int(round(v ** (1 / 3)))
  assert K ** 3 == v
  return np.ascontiguousarray(k.reshape(K, K, K, cin, cout).transpose(4, 2, 1, 0, 3))


def spconv_to_ts_kernel(w):
  """spconv (Cout, kx, ky, kz, Cin) -> TorchSparse (K^3, Cin, Cout) (any version)."""
  w = np.asarray(w)
  cout, kx, ky, kz, cin = w.shape
  if kx == ky == kz == 1:
    return np.ascontiguousarray(w.reshape(cout, cin).T)
  if (kx * ky * kz) % 2 == 1:  # x fastest, as ME
    return np.ascontiguousarray(w.transpose(3, 2, 1, 4, 0).reshape(kx * ky * kz, cin, cout))
  return np.ascontiguousarray(w.transpose(1, 2, 3, 4, 0).reshape(kx * ky * kz, cin, cout))


def ts_to_spconv_kernel(k, kernel_size=None):
  k = np.asarray(k)
  if k.ndim == 2:
    cin, cout = k.shape
    return np.ascontiguousarray(k.T.reshape(cout, 1, 1, 1, cin))
  v, cin, cout = k.shape
  K = kernel_size or int(round(v ** (1 / 3)))
  assert K ** 3 == v
  if v % 2 == 1:
    return np.ascontiguousarray(k.reshape(K, K, K, cin, cout).transpose(4, 2, 1, 0, 3))
  return np.ascontiguousarray(k.reshape(K, K, K, cin, cout).transpose(4, 0, 1, 2, 3))


# --------------------------------------------------------------------------- state dicts
def _conv_prefixes(sd):
  return {k[:-len(".weight")] for k, v in sd.items()
          if k.endswith(".weight") and np.asarray(v).ndim == 5}


def spconv_to_me_state_dict(sd):
  """Our spconv-layout MinkUNet dict -> MinkowskiEngine's (``*.kernel``, bias (1, Cout))."""
  convs, out = _conv_prefixes(sd), {}
  for k, v in sd.items():
    v = np.asarray(v)
    p, _, leaf = k.rpartition(".")
    if p in convs and leaf == "weight":
      out[p + ".kernel"] = spconv_to_me_kernel(v)
    elif p in convs and leaf == "bias":
      out[k] = v.reshape(1, -1).copy()
    else:
      out[k] = v.copy()
  return out


def me_to_spconv_state_dict(sd):
  out = {}
  for k, v in sd.items():
    v = np.asarray(v)
    p, _, leaf = k.rpartition(".")
    if leaf == "kernel":
      out[p + ".weight"] = me_to_spconv_kernel(v)
    elif leaf == "bias" and (p + ".kernel") in sd:
      out[k] = v.reshape(-1).copy()
    else:
      out[k] = v.copy()
  return out


def spconv_to_ts_state_dict(sd):
  """Our spconv-layout SPVNAS MinkUNet dict -> TorchSparse's (``*.kernel``; same for 1.4,
  2.0 and 2.1: the versions differ in coordinates, not in the kernel layout)."""
  convs, out = _conv_prefixes(sd), {}
  for k, v in sd.items():
    v = np.asarray(v)
    p, _, leaf = k.rpartition(".")
    if p in convs and leaf == "weight":
      out[p + ".kernel"] = spconv_to_ts_kernel(v)
    else:
      out[k] = v.copy()
  return out


def ts_to_spconv_state_dict(sd):
  out = {}
  for k, v in sd.items():
    v = np.asarray(v)
    p, _, leaf = k.rpartition(".")
    out[p + ".weight" if leaf == "kernel" else k] = (
        ts_to_spconv_kernel(v) if leaf == "kernel" else v.copy())
  return out


# --------------------------------------------------------------------------- brute force
def _index(table, queries):
  """Row of each query (M, 4) in table (N, 4) (int rows), -1 where absent."""
  table = np.asarray(table, np.int64)
  queries = np.asarray(queries, np.int64)
  lo = np.minimum(table.min(0), queries.min(0))
  span = np.maximum(table.max(0), queries.max(0)) - lo + 1

  def key(c):
    c = c - lo
    return ((c[:, 0] * span[1] + c[:, 1]) * span[2] + c[:, 2]) * span[3] + c[:, 3]

  tk, qk = key(table), key(queries)
  order = np.argsort(tk, kind="stable")
  pos = np.clip(np.searchsorted(tk[order], qk), 0, len(tk) - 1)
  hit = tk[order][pos] == qk
  return np.where(hit, order[pos], -1)


def _conv(in_c, x, kernel, offsets, out_c, transposed, bias):
  """Rows (b, x, y, z); kernel (V, Cin, Cout) or (Cin, Cout); offsets (V, 3).

  transposed=False: y[u] = sum_s x[u + off_s] @ W[s] over out rows u (absent inputs skipped).
  transposed=True: in_c are the coarse rows u, out_c the fine rows v; y[v] += x[u] @ W[s]
  for every pair v = u + off_s (the forward conv's pairs, same slot).
  """
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim == 2:
    kernel = kernel[None]
  in_c = np.asarray(in_c, np.int64)
  out_c = np.asarray(out_c, np.int64)
  y = np.zeros((len(out_c), kernel.shape[-1]))
  for s in range(len(offsets)):
    if not transposed:
      q = out_c.copy()
      q[:, 1:] += offsets[s]
      j = _index(in_c, q)
      m = j >= 0
      y[m] += x[j[m]] @ kernel[s]
    else:
      q = in_c.copy()
      q[:, 1:] += offsets[s]
      j = _index(out_c, q)
      m = j >= 0
      np.add.at(y, j[m], x[m] @ kernel[s])
  if bias is not None:
    y += np.asarray(bias, np.float64).reshape(1, -1)
  return y


def me_conv_numpy(in_coords, feats, kernel, kernel_size, tensor_stride=1, stride=1,
                  dilation=1, out_coords=None, transposed=False, bias=None):
  """MinkowskiEngine 0.5 MinkowskiConvolution / MinkowskiConvolutionTranspose (hypercube).

  in_coords: (N, 4) int (b, x, y, z) in input-voxel units (multiples of tensor_stride).
  kernel: (K^3, Cin, Cout) in ME's slot order ((Cin, Cout) for K=1).
  Conv: output coordinates = input's (stride 1) or ``floor(c / (ts*s)) * ts*s`` (stride s,
  unique, sorted); y[u] = sum_s x[u + off_s(ts)] @ kernel[s].
  Transposed (onto the given finer ``out_coords`` at tensor stride ts/s): the pairs of the
  forward conv fine -> coarse: y[v] += x[u] @ kernel[s] for v = u + off_s(ts/s).
  Returns (out_coords, float64 features).
  """
  in_coords = np.asarray(in_coords, np.int64)
  if not transposed:
    if out_coords is None:
      if stride == 1:
        out_coords = in_coords
      else:
        q = in_coords.copy()
        t = tensor_stride * stride
        q[:, 1:] = np.floor_divide(q[:, 1:], t) * t
        out_coords = np.unique(q, axis=0)
    offs = me_kernel_offsets(kernel_size, tensor_stride, dilation)
  else:
    assert out_coords is not None, "ME's transposed conv here maps onto a cached finer map"
    offs = me_kernel_offsets(kernel_size, tensor_stride // stride, dilation)
  out_coords = np.asarray(out_coords, np.int64)
  return out_coords, _conv(in_coords, feats, kernel, offs, out_coords, transposed, bias)


def ts_conv_numpy(in_coords, feats, kernel, kernel_size, tensor_stride=1, stride=1,
                  out_coords=None, transposed=False, bias=None, version="1.4"):
  """TorchSparse spnn.Conv3d (dilation 1; 1.4/2.0 ignore dilation in the offsets).

  version "1.4" / "2.0": coordinates (N, 4) (x, y, z, b) in input-voxel units (multiples of
  tensor_stride); stride s: output ``floor(c / (ts*s)) * ts*s`` (2.0: ``trunc``), offsets
  ``off_s * ts``. version "2.1": coordinates (b, x, y, z) in the level's own units; stride s:
  output ``floor(c / s)``, input of slot s at ``o * s + off_s`` (a stride-1 conv at ``o +
  off_s``). Transposed: the forward conv's pairs, same slot.
  Returns (out_coords in the version's layout, float64 features).
  """
  c = np.asarray(in_coords, np.int64)
  bxyz = c if version == "2.1" else c[:, [3, 0, 1, 2]]
  if version == "2.1":
    step = 1
  else:
    step = tensor_stride // stride if transposed else tensor_stride
  offs = ts_kernel_offsets(kernel_size, step)
  if version == "2.1":
    if transposed:
      assert out_coords is not None
      fine = np.asarray(out_coords, np.int64)
      # coarse u pairs fine v = u * s + off: scale coarse into fine units first
      cu = bxyz.copy()
      cu[:, 1:] *= stride
      return fine, _conv(cu, feats, kernel, offs, fine, True, bias)
    if stride == 1:
      out = bxyz
      return out, _conv(bxyz, feats, kernel, offs, out, False, bias)
    q = bxyz.copy()
    q[:, 1:] = np.floor_divide(q[:, 1:], stride)
    out = np.unique(q, axis=0)
    outs = out.copy()
    outs[:, 1:] *= stride  # query at o * s + off in input units
    return out, _conv(bxyz, feats, kernel, offs, outs, False, bias)
  # 1.4 / 2.0
  if transposed:
    assert out_coords is not None
    fine = np.asarray(out_coords, np.int64)[:, [3, 0, 1, 2]]
    y = _conv(bxyz, feats, kernel, offs, fine, True, bias)
    return np.asarray(out_coords, np.int64), y
  if stride == 1:
    out = bxyz
  else:
    t = tensor_stride * stride
    q = bxyz.copy()
    if version == "2.0":
      q[:, 1:] = np.trunc(q[:, 1:] / t).astype(np.int64) * t
    else:
      q[:, 1:] = np.floor_divide(q[:, 1:], t) * t
    out = np.unique(q, axis=0)
  y = _conv(bxyz, feats, kernel, offs, out, False, bias)
  return out[:, [1, 2, 3, 0]], y


def spconv_conv_numpy(in_idx, feats, weight, kind, out_idx=None, bias=None):
  """spconv 2.x on (b, d0, d1, d2) indices, weight (Cout, k0, k1, k2, Cin), for the three ops
  these nets use: kind "subm" (odd K, window o + k - K//2), "down" (k2 s2 p0: o = floor(i/2),
  i = 2o + k) and "inverse" (the "down" pairs reversed onto ``out_idx``)."""
  w = np.asarray(weight, np.float64)
  cout, k0, k1, k2, cin = w.shape
  ks = np.stack(np.meshgrid(np.arange(k0), np.arange(k1), np.arange(k2), indexing="ij"),
                -1).reshape(-1, 3)
  kern = w.transpose(1, 2, 3, 4, 0).reshape(-1, cin, cout)
  in_idx = np.asarray(in_idx, np.int64)
  if kind == "subm":
    offs = ks - np.array([k0, k1, k2]) // 2
    return in_idx, _conv(in_idx, feats, kern, offs, in_idx, False, bias)
  if kind == "down":
    q = in_idx.copy()
    q[:, 1:] //= 2
    out = np.unique(q, axis=0)
    o2 = out.copy()
    o2[:, 1:] *= 2
    return out, _conv(in_idx, feats, kern, ks, o2, False, bias)
  assert kind == "inverse" and out_idx is not None
  c2 = in_idx.copy()
  c2[:, 1:] *= 2
  out_idx = np.asarray(out_idx, np.int64)
  return out_idx, _conv(c2, feats, kern, ks, out_idx, True, bias)
