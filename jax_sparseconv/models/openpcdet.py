"""OpenPCDet's voxel-detector 3D backbones in Flax Linen: SECOND's ``VoxelBackBone8x`` and
CenterPoint's ``VoxelResBackBone8x``, with ``HeightCompression`` (the BEV map for a 2D
network) and ``MeanVFE`` on OpenPCDet's voxel generator (:func:`mean_vfe`).

Built from :class:`~jax_sparseconv.SparseTensor` levels and the spconv-shaped layers of
:mod:`jax_sparseconv.linen` (spconv's output rules, ``indice_key`` maps); the module names
are the torch modules' (``conv_input.0``, ``conv2.0.0``, ``conv1.0.bn1``, ...), so
OpenPCDet checkpoints load with :func:`~jax_sparseconv.models.openpcdet_variables`.
BatchNorm runs over the valid voxels of the batch, eps ``1e-3`` and torch momentum
``0.01`` (OpenPCDet's ``norm_fn``).

Example::

  ckpt = load_torch_checkpoint("second_7862.pth")
  model = VoxelBackBone8x(input_channels=4, grid_size=(1408, 1600, 40))
  variables = openpcdet_variables(ckpt, spconv_version="1")
  feats, coords, count = mean_vfe(points, point_cloud_range=(0, -40, -3, 70.4, 40, 1),
                                  voxel_size=(0.05, 0.05, 0.1), max_points_per_voxel=5,
                                  max_voxels=16000)
  out = model.apply(variables, feats, coords, batch_size=1, valid=count)
  out["spatial_features"]          # (1, 256, 200, 176)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import linen as sl
from jax_sparseconv._src import checks, errors
from jax_sparseconv._src.errors import ErrorCode
from jax_sparseconv._src.tensor import round_capacity
from jax_sparseconv._src.voxelize import unique_voxels_flagged
from jax_sparseconv.models.layers import SparseBatchNorm

__all__ = ["VoxelBackBone8x", "VoxelResBackBone8x", "height_compression", "mean_vfe",
           "BN_EPS", "BN_MOMENTUM"]

#: OpenPCDet's ``norm_fn``: ``BatchNorm1d(eps=1e-3, momentum=0.01)`` (Flax: decay 0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.99


def _bn_relu(x: sc.SparseTensor, name: str, train: bool, relu: bool = True) -> sc.SparseTensor:
  y = SparseBatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, name=name)(x.feats, x.valid, train)
  return x.replace(feats=nn.relu(y) if relu else y)


def height_compression(t: sc.SparseTensor) -> jax.Array:
  """OpenPCDet's ``HeightCompression``: ``t.dense()`` ``(B, C, D, H, W)`` (index order
  ``z, y, x``) viewed as the BEV map ``(B, C * D, H, W)``
  (:meth:`jax_sparseconv.SparseTensor.height_compression`)."""
  return t.height_compression()


class VoxelBackBone8x(nn.Module):
  """OpenPCDet's ``VoxelBackBone8x`` (SECOND, PV-RCNN, Voxel R-CNN, ...).

  ``conv_input`` (SubM 3) -> ``conv1`` (SubM) -> ``conv2``..``conv4`` (each a
  ``SparseConv3d(k3, s2)`` with padding 1, 1, ``(0, 1, 1)``, then two SubM blocks) ->
  ``conv_out`` (``SparseConv3d((3, 1, 1), s(2, 1, 1))``), every conv bias-free followed by
  BatchNorm and ReLU; 8x down-sampling in ``y, x``.

  Attributes:
    input_channels: voxel feature channels (4 for KITTI's ``x, y, z, intensity``).
    grid_size: the voxel grid ``[x, y, z]`` (OpenPCDet's ``grid_size``); the sparse shape is
      ``grid_size[::-1] + [1, 0, 0]`` (``[41, 1600, 1408]`` for KITTI).
    channels: widths of ``conv_input, conv1, conv2, conv3, conv4, conv_out``; OpenPCDet's
      ``(16, 16, 32, 64, 64, 128)``.
    last_pad: ``conv_out``'s padding (OpenPCDet's ``LAST_PAD``, default 0).
    capacities: static rows of the four generated levels (``conv2``, ``conv3``, ``conv4``,
      ``conv_out``), e.g. from :meth:`level_sizes`. None: the exact counts when the
      coordinates are concrete; under ``jit`` the bound of the conv rule (8 candidates per
      voxel for ``k3 s2``: give capacities there).
  """
  input_channels: int
  grid_size: Sequence[int]
  channels: Sequence[int] = (16, 16, 32, 64, 64, 128)
  last_pad: Any = 0
  capacities: Sequence[int] | None = None

  _res = False

  @property
  def sparse_shape(self) -> tuple[int, int, int]:
    """The sparse shape ``[z, y, x]``: ``grid_size[::-1] + [1, 0, 0]``."""
    gx, gy, gz = (int(g) for g in self.grid_size)
    return (gz + 1, gy, gx)

  def _caps(self):
    if self.capacities is None:
      return (None,) * 4
    caps = tuple(int(c) for c in self.capacities)
    if len(caps) != 4:
      raise ValueError(f"{type(self).__name__}: capacities must give 4 ints (conv2, conv3, "
                       f"conv4, conv_out), got {self.capacities}")
    return caps

  def _block(self, x, cin, cout, name, key, train, stride=1, padding=0, capacity=None):
    """OpenPCDet's ``post_act_block``: a SubM (``stride`` 1) or strided conv, BN, ReLU."""
    if stride == 1:
      conv = sl.SubMConv3d(cin, cout, 3, bias=False, indice_key=key, name=f"{name}.0")
    else:
      conv = sl.SparseConv3d(cin, cout, 3, stride=stride, padding=padding, bias=False,
                             indice_key=key, capacity=capacity, name=f"{name}.0")
    return _bn_relu(conv(x), f"{name}.1", train)

  def _stage(self, x, s, cin, cout, padding, train, capacity):
    """``conv{s}``: the strided block and two SubM blocks."""
    x = self._block(x, cin, cout, f"conv{s}.0", f"spconv{s}", train, 2, padding, capacity)
    for i in (1, 2):
      x = self._block(x, cout, cout, f"conv{s}.{i}", f"subm{s}", train)
    return x

  def _conv1(self, x, c0, c1, train):
    return self._block(x, c0, c1, "conv1.0", "subm1", train)

  @nn.compact
  def __call__(self, voxel_features, voxel_coords, batch_size: int, valid=None, *,
               train: bool = False):
    """The backbone on voxels (OpenPCDet's ``batch_dict['voxel_features']`` and
    ``['voxel_coords']``).

    Args:
      voxel_features: float ``(N, input_channels)`` (e.g. :func:`mean_vfe`'s).
      voxel_coords: int ``(N, 4)`` ``[b, z, y, x]``.
      batch_size: static number of clouds.
      valid: optional count or bool ``(N,)`` mask of the valid rows (padding; its rows
        may hold anything and come out as zeros).
      train: BatchNorm with the batch statistics of the valid voxels (call with
        ``mutable=['batch_stats']``); False: running averages.

    Returns:
      A dict: ``x_conv1`` .. ``x_conv4`` (OpenPCDet's ``multi_scale_3d_features``, strides
      1, 2, 4, 8) and ``encoded_spconv_tensor`` (``conv_out``'s level) as
      :class:`~jax_sparseconv.SparseTensor` levels (``.feats``, ``.indices()`` ``[b, z,
      y, x]``, ``.dense()``), and ``spatial_features``, ``(B, C * D, H, W)``: the
      ``HeightCompression`` of the encoded tensor.
    """
    ch = tuple(int(c) for c in self.channels)
    if len(ch) != 6:
      raise ValueError(f"{type(self).__name__}: channels must give 6 widths, got {ch}")
    caps = self._caps()
    x = sc.SparseTensor.from_indices(voxel_coords, voxel_features, self.sparse_shape,
                                     batch_size, axis_order="zyx", valid=valid)
    x = x.replace(feats=jnp.where(x.valid[:, None], x.feats, 0))
    conv = sl.SubMConv3d(self.input_channels, ch[0], 3, padding=1, bias=False,
                         indice_key="subm1", name="conv_input.0")
    x = _bn_relu(conv(x), "conv_input.1", train)
    out = {}
    x = self._conv1(x, ch[0], ch[1], train)
    out["x_conv1"] = x
    for s, (cin, cout, pad) in zip((2, 3, 4), ((ch[1], ch[2], 1), (ch[2], ch[3], 1),
                                               (ch[3], ch[4], (0, 1, 1)))):
      x = self._stage(x, s, cin, cout, pad, train, caps[s - 2])
      out[f"x_conv{s}"] = x
    conv = sl.SparseConv3d(ch[4], ch[5], (3, 1, 1), stride=(2, 1, 1), padding=self.last_pad,
                           bias=False, indice_key="spconv_down2", capacity=caps[3],
                           name="conv_out.0")
    x = _bn_relu(conv(x), "conv_out.1", train)
    out["encoded_spconv_tensor"] = x
    out["spatial_features"] = height_compression(x)
    return out

  def level_sizes(self, voxel_coords, batch_size: int, valid=None) -> tuple[int, ...]:
    """The voxel counts of the four generated levels for concrete coordinates (the
    core's output rules, no features), each rounded up by at most 12.5%: ``capacities``
    for a jitted model, e.g. the maximum over a data set's batches."""
    t = sc.SparseTensor.from_indices(voxel_coords, jnp.zeros((len(voxel_coords), 0)),
                                     self.sparse_shape, batch_size, valid=valid)
    sizes = []
    for ks, s, p in ((3, 2, 1), (3, 2, 1), (3, 2, (0, 1, 1)),
                     ((3, 1, 1), (2, 1, 1), self.last_pad)):
      # per-axis arguments in index order (z, y, x) = the kernel-array order here
      t = t.conv(ks, s, p)
      sizes.append(round_capacity(int(t.count)))
    return tuple(sizes)


class VoxelResBackBone8x(VoxelBackBone8x):
  """OpenPCDet's ``VoxelResBackBone8x`` (CenterPoint, PV-RCNN++, ...): as
  :class:`VoxelBackBone8x` with ``conv1``..``conv4`` of two ``SparseBasicBlock`` each
  (SubM-BN-ReLU-SubM-BN, plus the input, ReLU; their convs biased unless
  ``use_bias=False``: OpenPCDet's ``USE_BIAS``), widths ``(16, 16, 32, 64, 128, 128)``."""
  channels: Sequence[int] = (16, 16, 32, 64, 128, 128)
  use_bias: bool | None = None

  def _basic(self, x, c, name, key, train):
    bias = True if self.use_bias is None else bool(self.use_bias)
    h = sl.SubMConv3d(c, c, 3, padding=1, bias=bias, indice_key=key, name=f"{name}.conv1")(x)
    h = _bn_relu(h, f"{name}.bn1", train)
    h = sl.SubMConv3d(c, c, 3, padding=1, bias=bias, indice_key=key, name=f"{name}.conv2")(h)
    h = _bn_relu(h, f"{name}.bn2", train, relu=False)
    return h.replace(feats=nn.relu(h.feats + x.feats))

  def _conv1(self, x, c0, c1, train):
    if c0 != c1:
      raise ValueError(f"VoxelResBackBone8x: conv1's blocks keep the width: channels[0] "
                       f"({c0}) must equal channels[1] ({c1})")
    for i in (0, 1):
      x = self._basic(x, c1, f"conv1.{i}", "res1", train)
    return x

  def _stage(self, x, s, cin, cout, padding, train, capacity):
    x = self._block(x, cin, cout, f"conv{s}.0", f"spconv{s}", train, 2, padding, capacity)
    for i in (1, 2):
      x = self._basic(x, cout, f"conv{s}.{i}", f"res{s}", train)
    return x


# ----------------------------------------------------------------------------- MeanVFE


def mean_vfe(points, point_cloud_range, voxel_size, max_points_per_voxel: int = 5,
             max_voxels: int = 16000, *, batch=None, valid=None, capacity: int | None = None):
  """OpenPCDet's voxelisation (``transform_points_to_voxels``, spconv's ``PointToVoxel``)
  and ``MeanVFE``: the voxel features and ``[b, z, y, x]`` coordinates the backbones take.

  A point ``p`` (its first three channels ``x, y, z``) falls in voxel
  ``floor((p - range_min) / voxel_size)``; points outside ``point_cloud_range`` are dropped.
  Voxels come in the order of their first point, each keeps its first
  ``max_points_per_voxel`` points in input order, and only the first ``max_voxels``
  voxels of each cloud are kept (as the generator does). A voxel's feature is the mean
  of its kept points' channels (all of them, ``x, y, z`` included).

  Args:
    points: float ``(n, C)``, ``C >= 3``.
    point_cloud_range: ``[x_min, y_min, z_min, x_max, y_max, z_max]`` (static).
    voxel_size: ``[vx, vy, vz]`` (static).
    max_points_per_voxel, max_voxels: static, OpenPCDet's ``MAX_POINTS_PER_VOXEL`` and
      ``MAX_NUMBER_OF_VOXELS`` (per cloud).
    batch: optional int ``(n,)`` cloud index of each point (packed batch: clouds are
      voxelised apart, as OpenPCDet does per sample, and their voxels come cloud by cloud).
    valid: optional count or bool mask of the valid points (padding).
    capacity: static number of voxel rows; default ``min(n, max_voxels * clouds)`` when
      the batch is concrete, else ``n``. More voxels than that is ``CAPACITY_OVERFLOW``
      (the error rule of ``errors.py``).

  Returns:
    ``(voxel_features, voxel_coords, count)``: float ``(capacity, C)`` (0 on padding),
    int32 ``(capacity, 4)`` ``[b, z, y, x]`` (0 on padding) and the int32 number of
    voxels (pass it as the backbone's ``valid``). Works under ``jit``.
  """
  points = checks.check_float_array("points", points, 2)
  n, c = points.shape
  if c < 3:
    raise ValueError(f"points must have at least 3 channels (x, y, z, ...), got {points.shape}")
  rng = tuple(float(v) for v in np.asarray(point_cloud_range, np.float64).ravel())
  vs = tuple(float(v) for v in np.asarray(voxel_size, np.float64).ravel())
  if len(rng) != 6 or len(vs) != 3 or min(vs) <= 0:
    raise ValueError(f"point_cloud_range must be 6 numbers and voxel_size 3 positive ones, got "
                     f"{point_cloud_range} and {voxel_size}")
  grid = tuple(int(round((rng[3 + a] - rng[a]) / vs[a])) for a in range(3))
  mask = checks.valid_mask(valid, (n,), "valid")
  b = jnp.zeros((n,), jnp.int32) if batch is None else checks.check_batch("batch", batch, n)
  if capacity is None:
    clouds = 1 if batch is None else (int(np.max(np.asarray(batch), initial=0)) + 1
                                      if checks.is_concrete(b) else None)
    capacity = n if clouds is None else min(n, int(max_voxels) * clouds)
  capacity = checks.check_capacity(capacity)
  feats, coords, count, flags = _mean_vfe(points, mask, b, rng=rng, vs=vs, grid=grid,
                                          max_points=int(max_points_per_voxel),
                                          max_voxels=int(max_voxels), capacity=capacity)
  errors.report(flags, "mean_vfe")
  return feats, coords, count


@functools.partial(jax.jit, static_argnames=("rng", "vs", "grid", "max_points", "max_voxels",
                                             "capacity"))
def _mean_vfe(points, mask, batch, *, rng, vs, grid, max_points, max_voxels, capacity):
  n = points.shape[0]
  lo = np.asarray(rng[:3], np.float32)
  cell = jnp.floor((points[:, :3] - lo) / np.asarray(vs, np.float32))
  inside = mask & jnp.all((cell >= 0) & (cell < np.asarray(grid)), axis=-1)
  inside &= jnp.all(jnp.isfinite(points), axis=-1)
  cell = jnp.where(inside[:, None], cell, 0)
  flags = errors.bit(mask & ~jnp.all(jnp.isfinite(points), axis=-1),
                     ErrorCode.NONFINITE_POSITION)
  flags |= errors.bit(inside & (batch < 0), ErrorCode.BAD_BATCH)
  # The voxels (the core's unique_voxels: one row per occupied cell of each cloud) and
  # each point's voxel (a K=1 lookup): the grouping; OpenPCDet's selection rules below.
  centres = jnp.where(inside[:, None], cell + 0.5, jnp.nan)
  with errors.error_mode("flag"):
    (pos, _, vb, nvox), f = unique_voxels_flagged(
        centres, jnp.zeros((n, 0), points.dtype), 1.0, valid=inside, batch=batch, capacity=n)
    vvalid = jnp.arange(n) < nvox
    vpos = jnp.where(vvalid[:, None], pos, 0.5)
    km = sc.build_kernel_map(vpos, jnp.where(inside[:, None], centres, 0.5), 1.0, 1,
                             in_valid=vvalid, out_valid=inside, in_batch=vb, out_batch=batch)
  flags |= f | km.flags
  vid = jnp.where(inside, km.neighbors[:, 0], n)  # each point's voxel (n: none)
  idx = jnp.arange(n, dtype=jnp.int32)
  # first point of each voxel, and each point's rank in its voxel (input order)
  first = jax.ops.segment_min(idx, vid, num_segments=n + 1)[:n]
  order = jnp.lexsort((idx, vid))  # points grouped by voxel, input order within
  svid = vid[order]
  start = jnp.searchsorted(svid, svid, side="left")
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) - start)
  # voxels in the order of their first point, cloud by cloud; per-cloud rank < max_voxels
  big = jnp.int32(2**30)
  vfirst = jnp.where(vvalid, first, big)
  vorder = jnp.lexsort((vfirst, jnp.where(vvalid, vb, big)))
  sb = jnp.where(vvalid, vb, big)[vorder]
  vrank = jnp.arange(n, dtype=jnp.int32) - jnp.searchsorted(sb, sb, side="left")
  keep_v = vvalid[vorder] & (vrank < max_voxels)
  count = jnp.sum(keep_v, dtype=jnp.int32)
  flags |= errors.bit(count > capacity, ErrorCode.CAPACITY_OVERFLOW)
  row = jnp.where(keep_v, jnp.cumsum(keep_v) - 1, capacity)  # output row of sorted voxel
  out_row = jnp.full((n + 1,), capacity, jnp.int32).at[vorder].set(row.astype(jnp.int32))
  prow = jnp.where(inside & (rank < max_points), out_row[vid], capacity)
  prow = jnp.where(prow < capacity, prow, capacity)
  sums = jax.ops.segment_sum(jnp.where(inside[:, None], points, 0), prow,
                             num_segments=capacity + 1)[:capacity]
  num = jax.ops.segment_sum(jnp.ones((n,), points.dtype), prow,
                            num_segments=capacity + 1)[:capacity]
  feats = sums / jnp.maximum(num, 1)[:, None]
  zyx = jnp.floor(jnp.where(vvalid[:, None], pos, 0)).astype(jnp.int32)[:, ::-1]
  vrow = jnp.where(keep_v, row, capacity)
  coords = jnp.zeros((capacity, 4), jnp.int32).at[vrow].set(
      jnp.concatenate([vb[vorder][:, None], zyx[vorder]], 1), mode="drop")
  feats = errors.poison(feats, flags)
  return feats, coords, jnp.minimum(count, capacity), flags
