"""Pointcept's ``SpUNet-v1m1`` (``SpUNetBase``) in Flax Linen.

Built from :class:`~jax_sparseconv.SparseTensor` levels (index order ``[x, y, z]``,
Pointcept's) and the spconv-shaped layers of :mod:`jax_sparseconv.linen`: a ``K=5``
SubM stem, four ``SparseConv3d(k2, s2)`` stages of ``BasicBlock`` encoders, four
``SparseInverseConv3d`` stages back (through the encoder's maps, by ``indice_key``) with
skip concatenation and ``BasicBlock`` decoders, and a kernel-1 ``final`` conv. The module
names are the torch modules' (``conv_input.0``, ``down.0.0``, ``enc.0.block0.conv1``,
``dec.3.block0.proj.0``, ``final``), so Pointcept checkpoints load with
:func:`~jax_sparseconv.models.pointcept_variables`. BatchNorm: eps ``1e-3``, torch
momentum ``0.01`` (Pointcept's ``norm_fn``), over the valid voxels of the batch.

Example::

  model = SpUNet(in_channels=6, num_classes=20)
  variables = pointcept_variables(load_torch_checkpoint("model_best.pth"))
  logits = model.apply(variables, grid_coord, feat, offset)   # (N, 20)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import linen as sl
from jax_sparseconv._src import checks
from jax_sparseconv.models.layers import SparseBatchNorm

__all__ = ["SpUNet", "basic_block", "offset_to_batch", "BN_EPS", "BN_MOMENTUM"]

#: Pointcept's ``norm_fn``: ``BatchNorm1d(eps=1e-3, momentum=0.01)`` (Flax: decay 0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.99
#: The grid used when the coordinates are traced (Pointcept's ``max + 96`` needs values);
#: it only bounds the coordinates: the k2 s2 convs never reach a clip.
_TRACED_EXTENT = (1 << 20) - 1


def offset_to_batch(offset, n: int):
  """Pointcept's ``offset2batch``: the cloud index of each of ``n`` rows from the
  cumulative counts ``offset`` (rows from ``offset[-1]`` on get ``len(offset)``)."""
  offset = jnp.asarray(offset)
  return jnp.searchsorted(offset, jnp.arange(n), side="right").astype(jnp.int32)


def _bn(x: sc.SparseTensor, name: str, train: bool, relu: bool = True) -> sc.SparseTensor:
  y = SparseBatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, name=name)(x.feats, x.valid, train)
  return x.replace(feats=nn.relu(y) if relu else y)


def basic_block(x: sc.SparseTensor, in_channels: int, channels: int, name: str,
                indice_key: str | None = None, train: bool = False,
                bias: bool = False) -> sc.SparseTensor:
  """Pointcept's ``BasicBlock`` inside a compact Flax module: ``relu(bn2(conv2(relu(bn1(
  conv1(x))))) + proj(x))``, the convs SubM ``K=3`` under ``indice_key``; ``proj`` the
  identity, or a kernel-1 SubM + BN when the widths differ. Its layers are named
  ``{name}.conv1, .bn1, .conv2, .bn2, .proj.0, .proj.1`` (the torch keys)."""
  c = channels
  h = sl.SubMConv3d(in_channels, c, 3, padding=1, bias=bias, indice_key=indice_key,
                    name=f"{name}.conv1")(x)
  h = _bn(h, f"{name}.bn1", train)
  h = sl.SubMConv3d(c, c, 3, padding=1, bias=bias, indice_key=indice_key,
                    name=f"{name}.conv2")(h)
  h = _bn(h, f"{name}.bn2", train, relu=False)
  if in_channels == c:
    skip = x.feats
  else:
    p = sl.SubMConv3d(in_channels, c, 1, bias=False, name=f"{name}.proj.0")(x)
    skip = _bn(p, f"{name}.proj.1", train, relu=False).feats
  return h.replace(feats=nn.relu(h.feats + skip))


class SpUNet(nn.Module):
  """Pointcept's ``SpUNet-v1m1`` (``SpUNetBase``), its defaults.

  Attributes:
    in_channels: input feature channels (ScanNet: 6, colour and normal).
    num_classes: output classes (0: no ``final`` conv, the decoder's features).
    base_channels: the stem's width (32).
    channels: encoder then decoder widths, ``(32, 64, 128, 256, 256, 128, 96, 96)``.
    layers: blocks per stage, ``(2, 3, 4, 6, 2, 2, 2, 2)``.
    capacities: static rows of the four down-sampled levels (e.g. :meth:`level_sizes`);
      None: exact counts for concrete coordinates, under ``jit`` the input's rows.
  """
  in_channels: int
  num_classes: int
  base_channels: int = 32
  channels: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96)
  layers: Sequence[int] = (2, 3, 4, 6, 2, 2, 2, 2)
  capacities: Sequence[int] | None = None

  def _input(self, grid_coord, feat, offset, valid):
    grid_coord = jnp.asarray(grid_coord)
    if grid_coord.ndim != 2 or grid_coord.shape[1] != 3:
      raise ValueError(f"grid_coord must be int (N, 3) [x, y, z], got shape {grid_coord.shape}")
    n = grid_coord.shape[0]
    offset = jnp.asarray(offset)
    if offset.ndim != 1 or not offset.shape[0]:
      raise ValueError(f"offset must be the (B,) cumulative point counts, got {offset.shape}")
    batch = offset_to_batch(offset, n)
    mask = jnp.arange(n) < offset[-1]
    if valid is not None:
      mask &= checks.valid_mask(valid, (n,), "valid")
    if checks.is_concrete(grid_coord) and checks.is_concrete(mask):
      g = np.asarray(grid_coord)[np.asarray(mask)]
      extent = tuple(int(v) + 96 for v in g.max(0)) if len(g) else (96, 96, 96)
    else:
      extent = (_TRACED_EXTENT,) * 3
    idx = jnp.concatenate([jnp.where(mask, batch, 0)[:, None],
                           jnp.where(mask[:, None], grid_coord, 0)], 1).astype(jnp.int32)
    return sc.SparseTensor.from_indices(idx, feat, extent, int(offset.shape[0]),
                                        axis_order="xyz", valid=mask)

  @nn.compact
  def __call__(self, grid_coord, feat, offset, valid=None, *, train: bool = False):
    """Per-voxel logits.

    Args:
      grid_coord: int ``(N, 3)`` voxel coordinates ``[x, y, z]`` (Pointcept's
        ``grid_coord``, non-negative).
      feat: float ``(N, in_channels)``.
      offset: int ``(B,)`` cumulative counts (Pointcept's ``offset``: cloud ``b`` owns rows
        ``[offset[b-1], offset[b])``); rows from ``offset[-1]`` on are padding.
      valid: optional further count or bool mask of valid rows.
      train: batch statistics (``mutable=['batch_stats']``) or running averages.

    Returns:
      ``(N, num_classes)`` (0 on padding rows), in the input's row order.
    """
    stages = len(self.layers) // 2
    ch, layers = tuple(self.channels), tuple(self.layers)
    if len(ch) != len(layers) or len(layers) % 2:
      raise ValueError(f"SpUNet: channels {ch} and layers {layers} must have one even length")
    caps = (None,) * stages if self.capacities is None else tuple(self.capacities)
    if len(caps) != stages:
      raise ValueError(f"SpUNet: capacities must give {stages} ints, got {caps}")
    x = self._input(grid_coord, feat, offset, valid)
    x = x.replace(feats=jnp.where(x.valid[:, None], x.feats, 0))
    x = sl.SubMConv3d(self.in_channels, self.base_channels, 5, padding=1, bias=False,
                      indice_key="stem", name="conv_input.0")(x)
    x = _bn(x, "conv_input.1", train)
    skips = [x]
    enc = self.base_channels
    for s in range(stages):
      x = sl.SparseConv3d(enc, ch[s], 2, stride=2, bias=False, indice_key=f"spconv{s + 1}",
                          capacity=caps[s], name=f"down.{s}.0")(x)
      x = _bn(x, f"down.{s}.1", train)
      for i in range(layers[s]):
        x = basic_block(x, ch[s], ch[s], f"enc.{s}.block{i}", f"subm{s + 1}", train)
      self.sow("intermediates", f"enc{s}", x.feats)
      skips.append(x)
      enc = ch[s]
    x = skips.pop(-1)
    for s in reversed(range(stages)):
      dec = ch[-1] if s == 0 else ch[len(ch) - s - 1]
      cin = ch[len(ch) - s - 2]
      enc_s = self.base_channels if s == 0 else ch[s - 1]
      x = sl.SparseInverseConv3d(cin, dec, 2, bias=False, indice_key=f"spconv{s + 1}",
                                 name=f"up.{s}.0")(x)
      x = _bn(x, f"up.{s}.1", train)
      skip = skips.pop(-1)
      x = x.replace(feats=jnp.concatenate([x.feats, skip.feats], -1))
      for i in range(layers[len(ch) - s - 1]):
        x = basic_block(x, dec + enc_s if i == 0 else dec, dec, f"dec.{s}.block{i}",
                        f"subm{s}", train)
      self.sow("intermediates", f"dec{s}", x.feats)
    if self.num_classes > 0:
      x = sl.SubMConv3d(ch[-1], self.num_classes, 1, padding=1, bias=True, name="final")(x)
    return jnp.where(x.valid[:, None], x.feats, 0)

  def level_sizes(self, grid_coord, offset) -> tuple[int, ...]:
    """The voxel counts of the down-sampled levels for concrete coordinates (the core's
    conv rule), each rounded up by at most 12.5%: ``capacities`` for a jitted model."""
    from jax_sparseconv._src.tensor import round_capacity  # noqa: PLC0415
    t = self._input(grid_coord, jnp.zeros((len(grid_coord), 0)), offset, None)
    sizes = []
    for _ in range(len(self.layers) // 2):
      t = t.conv(2, 2)
      sizes.append(round_capacity(int(t.count)))
    return tuple(sizes)
