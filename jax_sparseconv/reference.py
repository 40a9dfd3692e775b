"""Slow, obviously-right references for testing (not for speed).

* :func:`loop_sparse_conv`: NumPy, straight from Open3D's rules on real-valued
  positions (brute-force all-pairs L-infinity window, per-pair kernel cell).
* :func:`brute_force_neighbors`: the all-pairs neighbour sets those rules give.
* :func:`dense_sparse_conv`: scatter onto the bounding voxel grid and run a dense
  ``lax.conv_general_dilated`` with ``padding='SAME'``, read at the output voxels
  (transposed: the exact linear transpose of that dense conv). Default offsets only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _geometry(kernel_size, offset):
  ks_xyz = np.asarray(kernel_size[::-1], np.float64)  # (Kx, Ky, Kz)
  if offset is None:
    offset = np.where(ks_xyz % 2 == 1, 0.0, -0.5)
  return ks_xyz, np.asarray(offset, np.float64)


def _cells(d, vs, ks_xyz, off):
  # Snap d / vs to the lattice (1e-6 voxel) so that exact ties (offsets that put a neighbour
  # halfway between two cells) round half away from zero instead of by float noise.
  u = np.round(d / vs, 6) + off + np.floor(ks_xyz / 2) - 0.5 * (ks_xyz % 2 == 0)
  c = np.sign(u) * np.floor(np.abs(u) + 0.5)
  c = np.clip(c, 0, ks_xyz - 1).astype(np.int64)
  return c[..., 2], c[..., 1], c[..., 0]  # z, y, x


def brute_force_neighbors(in_pos, out_pos, voxel_size, kernel_size, offset=None,
                          transpose=False):
  """For each output ``m``, the sorted indices of the inputs that feed it, by brute force.

  Conv: the inputs in ``m``'s window. Transposed conv: the inputs ``n`` with ``m`` in
  ``M(n)`` (``n``'s window, centred on ``in_pos[n] - offset * voxel_size``, contains ``m``).
  """
  in_pos = np.asarray(in_pos, np.float64)
  out_pos = np.asarray(out_pos, np.float64)
  vs = float(voxel_size)
  ks_xyz, off = _geometry(kernel_size, offset)
  r = 0.51 * ks_xyz * vs
  if transpose:  # n's window is centred on in_pos[n] - off*vs
    inside = np.all(np.abs(out_pos[:, None] - (in_pos[None] - off * vs)) <= r, axis=-1)
  else:
    inside = np.all(np.abs(in_pos[None] - (out_pos[:, None] - off * vs)) <= r, axis=-1)
  return [np.nonzero(row)[0] for row in inside]


def loop_sparse_conv(kernel, bias, feats, in_pos, out_pos, voxel_size, *, offset=None,
                     normalize=False, importance=None, transpose=False):
  """Open3D's ``SparseConv`` (or ``SparseConvTranspose``) computed output by output in float64."""
  kernel = np.asarray(kernel, np.float64)
  feats = np.asarray(feats, np.float64)
  in_pos = np.asarray(in_pos, np.float64)
  out_pos = np.asarray(out_pos, np.float64)
  vs = float(voxel_size)
  ks_xyz, off = _geometry(kernel.shape[:3], offset)
  nbrs = brute_force_neighbors(in_pos, out_pos, vs, kernel.shape[:3], offset, transpose)
  m, cout = out_pos.shape[0], kernel.shape[4]
  x = feats.copy()
  if transpose and normalize:
    count_in = np.zeros(len(feats))
    for row in nbrs:
      count_in[row] += 1
    x = x / np.maximum(count_in, 1)[:, None]
  if importance is not None and not transpose:
    x = x * np.asarray(importance, np.float64)[:, None]
  y = np.zeros((m, cout))
  for i in range(m):
    idx = nbrs[i]
    if len(idx) == 0:
      continue
    d = (out_pos[i] - in_pos[idx]) if transpose else (in_pos[idx] - out_pos[i])
    cz, cy, cx = _cells(d, vs, ks_xyz, off)
    y[i] = np.einsum("nc,nco->o", x[idx], kernel[cz, cy, cx])
    if normalize and not transpose:
      y[i] /= len(idx)
  if importance is not None and transpose:
    y = y * np.asarray(importance, np.float64)[:, None]
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y


def _grid_index(in_pos, out_pos, voxel_size, margin):
  both = np.concatenate([np.asarray(in_pos, np.float64), np.asarray(out_pos, np.float64)])
  ref = both[0] if len(both) else np.zeros(3)
  q_in = np.round((np.asarray(in_pos, np.float64) - ref) / voxel_size).astype(np.int64)
  q_out = np.round((np.asarray(out_pos, np.float64) - ref) / voxel_size).astype(np.int64)
  lo = np.concatenate([q_in, q_out]).min(0) - margin
  hi = np.concatenate([q_in, q_out]).max(0) + margin
  return q_in - lo, q_out - lo, tuple((hi - lo + 1)[::-1])  # grid shape (z, y, x)


def _dense_conv(grid, kernel):
  """``padding='SAME'`` cross-correlation of a ``(Z, Y, X, C)`` grid, z first."""
  return jax.lax.conv_general_dilated(
      grid[None], kernel, window_strides=(1, 1, 1), padding="SAME",
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      precision=jax.lax.Precision.HIGHEST)[0]


def dense_sparse_conv(kernel, bias, feats, in_pos, out_pos, voxel_size, *, normalize=False,
                      importance=None, transpose=False):
  """The sparse conv as a dense conv on the bounding grid (default offsets only).

  Duplicated inputs add up in the grid (as Open3D counts every copy). For
  ``transpose`` the dense operator is the linear transpose of the dense conv from
  the output grid to the input grid with ``Cin``/``Cout`` swapped.
  """
  kernel = jnp.asarray(kernel)
  feats = jnp.asarray(feats, kernel.dtype)
  margin = max(kernel.shape[:3])
  q_in, q_out, shape = _grid_index(in_pos, out_pos, voxel_size, margin)
  zin, yin, xin = q_in[:, 2], q_in[:, 1], q_in[:, 0]
  zo, yo, xo = q_out[:, 2], q_out[:, 1], q_out[:, 0]
  cin, cout = kernel.shape[3:]
  ones = jnp.ones((1, 1, 1, 1, 1), kernel.dtype) * jnp.ones(kernel.shape[:3] + (1, 1), kernel.dtype)

  if not transpose:
    x = feats if importance is None else feats * jnp.asarray(importance, feats.dtype)[:, None]
    grid = jnp.zeros(shape + (cin,), kernel.dtype).at[zin, yin, xin].add(x)
    y = _dense_conv(grid, kernel)[zo, yo, xo]
    if normalize:
      occ = jnp.zeros(shape + (1,), kernel.dtype).at[zin, yin, xin].add(1.0)
      count = _dense_conv(occ, ones)[zo, yo, xo]
      y = y / jnp.maximum(count, 1)
  else:
    # conv from the output set to the input set with the kernel's channel axes swapped
    def conv_out_to_in(z):  # z: (M, Cout) -> (N, Cin)
      grid = jnp.zeros(shape + (cout,), kernel.dtype).at[zo, yo, xo].add(z)
      return _dense_conv(grid, jnp.swapaxes(kernel, 3, 4))[zin, yin, xin]
    x = feats
    if normalize:
      occ = jnp.zeros(shape + (1,), kernel.dtype).at[zo, yo, xo].add(1.0)
      count_in = _dense_conv(occ, ones)[zin, yin, xin]
      x = x / jnp.maximum(count_in, 1)
    (y,) = jax.linear_transpose(conv_out_to_in, jnp.zeros((len(q_out), cout), kernel.dtype))(x)
    if importance is not None:
      y = y * jnp.asarray(importance, y.dtype)[:, None]
  if bias is not None:
    y = y + jnp.asarray(bias, y.dtype)
  return y
