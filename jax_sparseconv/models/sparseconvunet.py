"""Open3D-ML's ``SparseConvUnet`` (ScanNet semantic segmentation) in Flax Linen.

The same network, parameter for parameter, as ``open3d.ml.torch.models.SparseConvUnet``
(open3d 0.20): weights load unchanged through :func:`open3d_ml_variables`, and the
logits agree with Open3D-ML's to float32 rounding. Differences are in how it runs:
each level's kernel maps are built once per cloud and shared by all its layers
(Open3D-ML searches 26 times per cloud), shapes are static (padded capacities with
valid counts), and the whole forward runs under ``jax.jit``.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jax_sparseconv import linen as sl
from jax_sparseconv._src import checks, errors
from jax_sparseconv._src.tensor import round_capacity, subm_key
from jax_sparseconv.models.layers import (
    Open3DVoxels, ResidualBlock, SparseBatchNorm, calculate_grid, input_layer,
    level_kernel_maps, output_layer)

__all__ = ["SparseConvUnet", "UNet", "unet_layout", "unet_level_sizes", "open3d_ml_preprocess",
           "NUM_LEVELS"]

SUBM = subm_key(3)  # "subm3x3x3": the key of a level's K=3 map

#: Levels of the U-Net (planes ``m, 2m, ..., 7m``; six stride-2 down-samplings).
NUM_LEVELS = 7


def unet_layout(conv_block_reps: int, planes: Sequence[int], residual_blocks: bool):
  """The modules of Open3D-ML's ``UNet.net`` (``UNet.get_UNet``), in order.

  Returns a list of ``(kind, in_channels, out_channels)``; ``kind`` is one of
  ``'bn'``, ``'relu'``, ``'subm'``, ``'residual'``, ``'concat'``, ``'conv'``,
  ``'deconv'``, ``'join'``. The position in the list is the torch index ``i`` of
  ``unet.net.{i}`` in the state_dict.

  >>> [k for k, _, _ in unet_layout(1, [16, 32], False)]
  ['bn', 'relu', 'subm', 'concat', 'bn', 'relu', 'conv', 'bn', 'relu', 'subm', 'bn', 'relu', \
'deconv', 'join', 'bn', 'relu', 'subm']
  """
  layers = []

  def block(a, b):
    if residual_blocks:
      layers.append(("residual", a, b))
    else:
      layers.extend([("bn", a, a), ("relu", a, a), ("subm", a, b)])

  def build(planes):
    for _ in range(conv_block_reps):
      block(planes[0], planes[0])
    if len(planes) > 1:
      layers.extend([("concat", planes[0], planes[0]), ("bn", planes[0], planes[0]),
                     ("relu", planes[0], planes[0]), ("conv", planes[0], planes[1])])
      build(planes[1:])
      layers.extend([("bn", planes[1], planes[1]), ("relu", planes[1], planes[1]),
                     ("deconv", planes[1], planes[0]), ("join", 2 * planes[0], 2 * planes[0])])
      for i in range(conv_block_reps):
        block(planes[0] * (2 if i == 0 else 1), planes[0])

  build(list(planes))
  return layers


class UNet(nn.Module):
  """Open3D-ML's ``UNet``: the encoder-decoder between the first conv and the head.

  Submodules are named ``net_{i}`` after the torch index of ``unet.net.{i}``
  (:func:`unet_layout`). Level ``l`` (a :class:`~jax_sparseconv.SparseTensor`) has
  ``planes[l]`` channels; its layers are the library's level layers
  (:class:`jax_sparseconv.linen.SubMConv`, :class:`~jax_sparseconv.linen.DownConv`,
  :class:`~jax_sparseconv.linen.UpConv`, bias-free) through the maps the level carries:
  ``"subm3x3x3"``, and from the finer level ``"down"`` / ``"up"`` (its transpose).

  Attributes:
    conv_block_reps: blocks per level (and per decoder level).
    planes: channels per level, Open3D-ML's ``nPlanes``.
    residual_blocks: :class:`ResidualBlock` instead of BN-ReLU-conv blocks.
    momentum, epsilon, axis_name: of every :class:`SparseBatchNorm`.
  """
  conv_block_reps: int
  planes: Sequence[int]
  residual_blocks: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-4
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, levels, train: bool = False):
    """Args:
      x: level-0 features ``(capacity_0, planes[0])``.
      levels: ``levels[l]``, the level-``l`` :class:`~jax_sparseconv.SparseTensor` with
        its maps (see above; its features are not read).
      train: batch statistics (True) or running averages.

    Returns the level-0 features ``(capacity_0, planes[0])``.
    """
    bn_kw = dict(momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name)
    level, skips = 0, []
    for i, (kind, _, b) in enumerate(unet_layout(self.conv_block_reps, self.planes,
                                                 self.residual_blocks)):
      name = f"net_{i}"
      t = levels[level]
      if kind == "bn":
        x = SparseBatchNorm(name=name, **bn_kw)(x, t.valid, train)
      elif kind == "relu":
        x = nn.relu(x)
      elif kind == "subm":
        x = sl.SubMConv(b, 3, use_bias=False, name=name)(t.replace(feats=x)).feats
      elif kind == "residual":
        x = ResidualBlock(b, name=name, **bn_kw)(x, t.valid, t.maps[SUBM], train)
      elif kind == "concat":
        skips.append(x)
      elif kind == "conv":
        level += 1
        x = sl.DownConv(b, 2, use_bias=False, name=name)(t.replace(feats=x),
                                                          levels[level]).feats
      elif kind == "deconv":
        level -= 1
        x = sl.UpConv(b, 2, use_bias=False, name=name)(t.replace(feats=x),
                                                        levels[level]).feats
      elif kind == "join":
        x = jnp.concatenate([skips.pop(), x], axis=-1)
      self.sow("intermediates", f"out_{name}", x)
    return x


def unet_level_sizes(points, *, batch=None, valid=None, levels: int = NUM_LEVELS):
  """Voxel counts at every level of the U-Net for concrete points (NumPy, no jit).

  Args:
    points: ``(n, 3)`` positions in voxel units, or a list of such arrays.
    batch, valid: as :meth:`SparseConvUnet.__call__`.
    levels: number of levels (7 for ``SparseConvUnet``).

  Returns:
    A tuple of ``levels`` ints (for a list: a list of tuples), e.g. to pick the
    ``capacities`` of :meth:`SparseConvUnet.__call__`.

  >>> unet_level_sizes(np.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]]), levels=3)
  (3, 2, 1)
  """
  if isinstance(points, (list, tuple)):
    bs = batch if batch is not None else [None] * len(points)
    vs = valid if valid is not None else [None] * len(points)
    return [unet_level_sizes(p, batch=b, valid=v, levels=levels)
            for p, b, v in zip(points, bs, vs)]
  p = np.asarray(points, np.float64)
  mask = np.ones(len(p), bool)
  if valid is not None:
    valid = np.asarray(valid)
    mask = valid if valid.dtype == bool else np.arange(len(p)) < int(valid)
  b = np.zeros(len(p), np.int64) if batch is None else np.asarray(batch, np.int64)
  c = np.floor(p[mask]).astype(np.int64)
  b = b[mask]
  sizes = []
  for _ in range(levels):
    key = np.unique(np.concatenate([b[:, None], c], axis=1), axis=0)
    sizes.append(len(key))
    b, c = key[:, 0], np.floor_divide(key[:, 1:], 2)
  return tuple(sizes)


def _check_capacities(caps, n: int, name: str, levels: int = NUM_LEVELS):
  if caps is None:
    return (n,) * levels
  caps = tuple(caps)
  if caps and all(isinstance(c, (tuple, list)) for c in caps):  # one tuple per cloud
    caps = tuple(max(c) for c in zip(*caps))
  if len(caps) != levels or not all(isinstance(c, numbers.Integral) and c > 0 for c in caps):
    raise ValueError(f"{name} must be {levels} positive ints (one per level), got {caps!r}")
  return tuple(int(c) for c in caps)


class SparseConvUnet(nn.Module):
  """Open3D-ML's ``SparseConvUnet`` in Flax Linen (same names, defaults and weights).

  ``InputLayer`` (voxel means) -> ``sub_sparse_conv`` (``K=3``, ``in_channels -> m``)
  -> :class:`UNet` (planes ``m, 2m, ..., 7m``) -> ``batch_norm`` -> ReLU -> ``linear``
  (``m -> num_classes``) -> ``OutputLayer`` (one row per input point). Load Open3D-ML
  weights with :func:`~jax_sparseconv.models.open3d_ml_variables`.

  Example usage::

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> model = SparseConvUnet()  # Open3D-ML's defaults: multiplier 16, 20 classes
    >>> pts = jnp.asarray(np.random.default_rng(0).integers(0, 16, (64, 3)) + 0.5, jnp.float32)
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), pts, jnp.ones((64, 3)))
    >>> shapes["params"]["unet"]["net_51"]["kernel"].shape  # Subm 192 -> 96 (level 5)
    (3, 3, 3, 192, 96)
    >>> jax.eval_shape(model.apply, shapes, pts, jnp.ones((64, 3))).shape
    (64, 20)

  Real use: ``variables = open3d_ml_variables(load_open3d_ml_checkpoint(path))``, then
  ``model.apply(variables, points, feats)``, or for speed
  ``jax.jit(functools.partial(model.apply, capacities=unet_level_sizes(points)))``.

  Attributes:
    multiplier: ``m``, channels of level 0 (Open3D-ML's default 16; ScanNet yml 32).
    voxel_size: metres per voxel, used only by :func:`open3d_ml_preprocess` (the model
      takes points already in voxel units).
    conv_block_reps: blocks per level.
    residual_blocks: :class:`~jax_sparseconv.models.layers.ResidualBlock` blocks.
    in_channels: feature channels (Open3D-ML only supports 3).
    num_classes: output classes.
    grid_size: of the random placement in :func:`open3d_ml_preprocess`.
    momentum: BatchNorm running-average decay, Flax convention (0.99 = torch's 0.01).
    epsilon: BatchNorm epsilon (1e-4, Open3D-ML's).
    axis_name: a ``vmap`` axis name over which train-mode BatchNorm statistics are
      pooled (padded clouds under ``vmap``); None otherwise.
    num_levels: U-Net depth (planes ``m, 2m, ..., num_levels * m``); Open3D-ML's is 7.
  """
  multiplier: int = 16
  voxel_size: float = 0.05
  conv_block_reps: int = 1
  residual_blocks: bool = False
  in_channels: int = 3
  num_classes: int = 20
  grid_size: int = 4096
  momentum: float = 0.99
  epsilon: float = 1e-4
  axis_name: str | None = None
  num_levels: int = NUM_LEVELS

  @property
  def planes(self) -> tuple[int, ...]:
    """Channels per level: ``multiplier * (1, 2, ..., num_levels)``."""
    return tuple((i + 1) * self.multiplier for i in range(self.num_levels))

  def preprocess(self, xyz, rgb, offset_or_rng=None):
    """:func:`open3d_ml_preprocess` with this model's ``voxel_size`` and ``grid_size``
    (Open3D-ML's ``SparseConvUnet.preprocess`` for the test split)."""
    return open3d_ml_preprocess(xyz, rgb, self.voxel_size, offset_or_rng, self.grid_size)

  @nn.compact
  def __call__(self, points, feats, batch=None, valid=None, *, train: bool = False,
               capacities=None):
    """Per-point logits.

    Args:
      points: the pre-processed points in voxel units (Open3D-ML's ``preprocess``
        output, voxel centres ``i + 0.5``; any point in voxel ``floor(p)`` works):
        float ``(n, 3)`` for one cloud (or a packed batch with ``batch``);
        ``(B, n, 3)`` for a padded batch (with ``valid``); or a list of ``(n_b, 3)``
        arrays, one per cloud (padded to one capacity internally). Several clouds run as
        one packed set: cloud ``b`` owns rows ``[b * capacity_l, (b + 1) * capacity_l)``
        of level ``l`` (see the ``intermediates`` collection).
      feats: ``(..., in_channels)`` features (rgb) matching ``points``.
      batch: optional int ``(n,)`` cloud index per point: a packed batch (clouds never
        interact: the batch index enters every sort and neighbour search).
      valid: optional validity of padded rows: an int count or bool ``(n,)`` mask for
        ``(n, 3)`` points, ``(B,)`` counts or a ``(B, n)`` mask for ``(B, n, 3)``.
        Invalid points get zero logits; their values may be anything.
      train: BatchNorm with batch statistics over the valid voxels of all clouds
        (call with ``mutable=['batch_stats']``); False: running averages.
      capacities: static voxel capacities of the ``num_levels`` levels (one tuple for all clouds, or
        one per cloud, e.g. :func:`unet_level_sizes` of a list: the maximum is used).
        Default: when the points are concrete, their exact counts
        (:func:`unet_level_sizes`, maximum over clouds) rounded up by at most 12.5%;
        under ``jit``, ``n`` at every level (always enough but slower: pass capacities,
        e.g. from :func:`unet_level_sizes`, with ``functools.partial``).

    Returns:
      float32 logits, one row per input point in input order: ``(n, num_classes)``,
      ``(B, n, num_classes)`` for a padded batch, and for a list the clouds'
      rows concatenated (``(sum n_b, num_classes)``, as Open3D-ML's ``OutputLayer``).
      If a level does not fit its capacity (or a valid point is not finite) a
      ``ValueError`` is raised when the values are concrete; under ``jit`` the library's
      error rule applies (a host callback raises in error mode ``"raise"``, the default)
      and all logits are NaN.
    """
    pts, fts, bat, val, how = _stack_inputs(points, feats, batch, valid, self.in_channels)
    num_clouds, n = pts.shape[0], pts.shape[1]
    levels = self.num_levels
    concrete = all(checks.is_concrete(a) for a in (pts, bat, val))
    if capacities is None and concrete:
      sizes = [unet_level_sizes(pts[b], batch=None if bat is None else bat[b], valid=val[b],
                                levels=levels) for b in range(num_clouds)]
      capacities = tuple(round_capacity(max(s[lev] for s in sizes))
                         for lev in range(levels))
    caps = _check_capacities(capacities, n, "capacities", levels)

    # Geometry (the core's): each cloud's levels, then the clouds as one packed set per
    # level (cloud b at rows b * capacity) and each level's maps, built once.
    clouds, flags = [], jnp.int32(0)
    for b in range(num_clouds):
      vox, vf, index_map, f = input_layer(pts[b], fts[b], valid=val[b],
                                          batch=None if bat is None else bat[b],
                                          capacity=caps[0])
      vlevels = [vox]
      for lev in range(1, levels):
        coarse, _, fl = calculate_grid(vlevels[-1], caps[lev])
        vlevels.append(coarse)
        f = f | jnp.where(f != 0, 0, fl)  # a broken level breaks the next: its error only
      flags = flags | f
      clouds.append((vlevels, vf, index_map))
    if num_clouds == 1:
      vlevels, x0, _ = clouds[0]
    else:
      vlevels = [Open3DVoxels.concatenate([c[0][lev] for c in clouds]) for lev in range(levels)]
      x0 = jnp.concatenate([c[1] for c in clouds])
    # (level sizes: jax_sparseconv.models.unet_level_sizes)
    where = f"SparseConvUnet (level capacities {caps})"
    errors.report(flags, where)
    batched = num_clouds > 1 or bat is not None
    with errors.error_mode("flag"):  # a level that overflowed also has broken maps
      maps = [level_kernel_maps(vlevels[lev], vlevels[lev + 1] if lev + 1 < levels else None,
                                batched=batched) for lev in range(levels)]
    map_flags = functools.reduce(jnp.bitwise_or, [m.flags for lm in maps for m in lm
                                                  if m is not None])
    errors.report(jnp.where(flags != 0, 0, map_flags), where)  # the maps' own errors
    flags = flags | map_flags
    # the levels as SparseTensors carrying their maps (the coarse ones also the maps from
    # the finer level, as SparseTensor.down() makes them)
    tensors = []
    for lev in range(levels):
      m = {SUBM: maps[lev].subm}
      if lev:
        m.update(down=maps[lev - 1].down, up=maps[lev - 1].up)
      tensors.append(vlevels[lev].tensor(batched=batched).replace(maps=m))
    self.sow("intermediates", "voxels", vlevels)
    self.sow("intermediates", "input_layer", x0)

    x = sl.SubMConv(self.multiplier, 3, use_bias=False,
                    name="sub_sparse_conv")(tensors[0].replace(feats=x0)).feats
    self.sow("intermediates", "out_sub_sparse_conv", x)
    x = UNet(self.conv_block_reps, self.planes, self.residual_blocks, momentum=self.momentum,
             epsilon=self.epsilon, axis_name=self.axis_name, name="unet")(x, tensors, train)
    x = SparseBatchNorm(momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
                        name="batch_norm")(x, tensors[0].valid, train)
    x = nn.Dense(self.num_classes, name="linear")(nn.relu(x))
    self.sow("intermediates", "out_linear", x)
    cap0 = caps[0]
    logits = jnp.stack([output_layer(x[b * cap0:(b + 1) * cap0], clouds[b][2])
                        for b in range(num_clouds)])
    logits = errors.poison(logits, flags)
    if how == "single":
      return logits[0]
    if how is None:
      return logits
    return jnp.concatenate([logits[b, :k] for b, k in enumerate(how)])


def _stack_inputs(points, feats, batch, valid, in_channels):
  """Normalises the three input forms to ``(B, n, 3)`` points, ``(B, n, C)`` features,
  ``(B, n)`` batch ids or None, ``(B, n)`` validity masks, and how to return: ``'single'``,
  None (padded batch) or the list of cloud lengths."""
  if isinstance(points, (list, tuple)):
    if batch is not None or valid is not None:
      raise ValueError("with a list of clouds, give neither batch nor valid")
    if not isinstance(feats, (list, tuple)) or len(feats) != len(points) or not points:
      raise ValueError("feats must be a list matching the (non-empty) list of points")
    lengths = [int(np.shape(p)[0]) for p in points]
    n = max(lengths)
    pts = jnp.stack([jnp.pad(jnp.asarray(p, jnp.float32), ((0, n - k), (0, 0)))
                     for p, k in zip(points, lengths)])
    fts = jnp.stack([jnp.pad(jnp.asarray(f, jnp.float32), ((0, n - k), (0, 0)))
                     for f, k in zip(feats, lengths)])
    val = jnp.arange(n)[None, :] < jnp.asarray(lengths)[:, None]
    bat, how = None, lengths
  else:
    pts, fts = jnp.asarray(points), jnp.asarray(feats)
    if pts.ndim == 2:
      pts, fts = pts[None], fts[None]
      val = checks.valid_mask(valid, pts.shape[1:2])[None]
      bat = None
      if batch is not None:
        bat = jnp.asarray(batch)
        if bat.shape != pts.shape[1:2] or not jnp.issubdtype(bat.dtype, jnp.integer):
          raise ValueError(f"batch must be int ({pts.shape[1]},), got {bat.dtype} {bat.shape}")
        bat = bat.astype(jnp.int32)[None]
      how = "single"
    elif pts.ndim == 3:
      if batch is not None:
        raise ValueError("a padded (B, n, 3) batch takes valid, not batch")
      val = checks.valid_mask(valid, pts.shape[:2])
      bat, how = None, None
    else:
      raise ValueError(f"points must have shape (n, 3) or (B, n, 3), got {pts.shape}")
  if pts.shape[-1] != 3:
    raise ValueError(f"points must have 3 coordinates, got shape {pts.shape}")
  if fts.shape != pts.shape[:-1] + (in_channels,):
    raise ValueError(f"feats must have shape {pts.shape[:-1] + (in_channels,)} "
                     f"(in_channels={in_channels}), got {fts.shape}")
  return pts, fts.astype(jnp.float32), bat, val, how


def open3d_ml_preprocess(xyz, rgb, voxel_size: float = 0.05, offset_or_rng: Any = None,
                         grid_size: int = 4096):
  """Open3D-ML's ``SparseConvUnet.preprocess`` for the test split, in NumPy.

  1. ``points = float32(xyz) * float32(1 / voxel_size)``; ``feats = float32(rgb)``
     (unchanged: no colour normalisation in this Open3D-ML version).
  2. Random placement in the ``grid_size``-cube: ``offset = -m + clip(G - M + m -
     0.001, 0) * r1 + clip(G - M + m + 0.001, None, 0) * r2`` (float64; ``m, M`` the
     float32 min/max; ``r1, r2 = rng.random(3)``, drawn in that order), added in place
     (float32 of the float64 sum).
  3. Keep the rows with all coordinates in ``[0, 4096)`` (4096 hard-coded, as in
     Open3D-ML).
  4. Snap to voxel centres: ``float32(int32(points) + 0.5)``.

  Args:
    xyz: ``(n, 3)`` coordinates in metres.
    rgb: ``(n, C)`` features (ScanNet colours 0..255).
    voxel_size: metres per voxel (the model's ``voxel_size``).
    offset_or_rng: a ``numpy.random.Generator`` (advanced by two ``random(3)`` draws,
      like Open3D-ML's ``model.rng``), an int seed for ``numpy.random.default_rng``, a
      given ``(3,)`` offset in voxels (e.g. the saved one of a reference run), or None
      (a fresh unseeded generator).
    grid_size: the model's ``grid_size``.

  Returns:
    ``(points, feats, kept)``: float32 ``(k, 3)`` points ``i + 0.5``, float32 ``(k, C)``
    features, and int64 ``(k,)`` indices of the kept input rows (e.g. to select labels).

  >>> p, f, kept = open3d_ml_preprocess(np.array([[0.0, 0.0, 0.0], [0.12, 0.0, 0.0]]),
  ...                                   np.ones((2, 3)), 0.05, offset_or_rng=[1.0, 2.0, 3.0])
  >>> p.tolist(), kept.tolist()
  ([[1.5, 2.5, 3.5], [3.5, 2.5, 3.5]], [0, 1])
  """
  points = np.array(xyz, dtype=np.float32)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"xyz must have shape (n, 3), got {points.shape}")
  feats = np.array(rgb, dtype=np.float32)
  points *= np.float32(1.0 / voxel_size)
  if isinstance(offset_or_rng, np.random.Generator) or offset_or_rng is None or isinstance(
      offset_or_rng, numbers.Integral):
    rng = (offset_or_rng if isinstance(offset_or_rng, np.random.Generator)
           else np.random.default_rng(offset_or_rng))
    m, mx = points.min(0), points.max(0)
    offset = (-m + np.clip(grid_size - mx + m - np.float32(0.001), 0, None) * rng.random(3)
              + np.clip(grid_size - mx + m + np.float32(0.001), None, 0) * rng.random(3))
  else:
    offset = np.asarray(offset_or_rng, np.float64)
    if offset.shape != (3,):
      raise ValueError(f"offset must have shape (3,), got {offset.shape}")
  points += offset
  keep = (points.min(1) >= 0) & (points.max(1) < 4096)
  kept = np.nonzero(keep)[0]
  points = (points[keep].astype(np.int32) + 0.5).astype(np.float32)
  return points, feats[keep], kept
