"""MinkUNet: MinkowskiEngine's ``MinkUNet14/18/34/50/101`` (A-D plane variants) and
SPVNAS's SemanticKITTI ``MinkUNet``, in Flax Linen on :class:`~jax_sparseconv.SparseTensor`.

The networks are the zoos' own, layer for layer (the module names mirror the state-dict
keys, see :mod:`jax_sparseconv.models.minkowski_weights`), with their conventions:

* stride-1 convs are submanifold (outputs = inputs), odd ``K``, window ``o + k - K//2``;
* the ``k2 s2`` convs output ``floor(c / 2)`` and read ``2o + {0, 1}`` per axis (the
  ``"floor"`` rule of :meth:`SparseTensor.conv`; MinkowskiEngine's even window starts at
  the output coordinate);
* the ``k2 s2`` transposed convs go back onto the finer level through the same (fine,
  coarse, slot) pairs (MinkowskiEngine's cached map, TorchSparse's ``transposed=True``);
* kernel-1 convs are ``x @ kernel``;
* BatchNorm over the valid voxels, eps ``1e-5``, torch momentum ``0.1`` (Flax 0.9).

Kernels are ``(Kz, Ky, Kx, Cin, Cout)``, slot ``(kz * Ky + ky) * Kx + kx`` (x fastest:
MinkowskiEngine's own order, so its ``(K^3, Cin, Cout)`` kernels only reshape).

Shapes are static: a level has a fixed number of rows (its *capacity*) with a validity
mask, so a padded or packed batch (several clouds told apart by ``batch``) runs under
``jax.jit``; padding rows come out as 0 and never enter the BatchNorm statistics.

The input side is MinkowskiEngine's ``TensorField`` quantisation
(:func:`tensor_field_quantize`: mean features per voxel, the point -> voxel map) or
SPVNAS's (:func:`spvnas_quantize`: rounded coordinates shifted to start at 0, the first
point's features); :func:`slice_points` takes the voxel outputs back to the points
(``TensorField.slice``).

Example::

  import jax, jax.numpy as jnp
  from jax_sparseconv.models.minkunet import MinkUNet34C, tensor_field_quantize, slice_points
  x, p2v = tensor_field_quantize(points, colors, 0.02, batch=cloud_ids)
  model = MinkUNet34C(out_channels=20)
  variables = model.init(jax.random.key(0), x)
  logits = slice_points(jax.jit(model.apply)(variables, x).feats, p2v)   # (n_points, 20)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import SparseTensor
from jax_sparseconv.models.layers import SparseBatchNorm

__all__ = [
    "MinkUNet", "MinkUNet14", "MinkUNet18", "MinkUNet34", "MinkUNet50", "MinkUNet101",
    "MinkUNet14A", "MinkUNet14B", "MinkUNet14C", "MinkUNet14D", "MinkUNet18A", "MinkUNet18B",
    "MinkUNet18D", "MinkUNet34A", "MinkUNet34B", "MinkUNet34C", "SPVNASMinkUNet",
    "ME_MODELS", "spvnas_channels", "sparse_quantize", "tensor_field_quantize",
    "spvnas_quantize", "slice_points", "Quantized", "MinkowskiConv", "BasicBlock",
    "Bottleneck", "kaiming_fan_out", "torch_default_init",
]

#: torch's BatchNorm momentum 0.1 in Flax's convention (the running stats keep 0.9).
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

def _hash_uniform(key, shape):
  """Uniform ``[0, 1)`` float32 of ``shape`` from a counter-based integer hash of the key.

  ``jax.random``'s threefry takes minutes to compile on CPU for the ~100 differently
  shaped kernels of a MinkUNet (one unrolled generator per shape); this hash is a few
  elementwise ops (statistically fine for an initialisation, not for anything else)."""
  if jnp.issubdtype(jnp.asarray(key).dtype if not hasattr(key, "dtype") else key.dtype,
                    jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  data = jnp.asarray(key).ravel().astype(jnp.uint32)
  seed = data[0] ^ (data[-1] * jnp.uint32(0x9E3779B9)) ^ jnp.uint32(data.shape[0])
  n = int(np.prod(shape))

  def mix(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)

  h = mix(mix(jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + seed) ^ seed)
  u = (h >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))
  return u.reshape(shape)


def _fans(shape):
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  return shape[-2] * receptive, shape[-1] * receptive


def kaiming_fan_out(key, shape, dtype=jnp.float32):
  """MinkowskiEngine's MinkUNet initialisation (examples/minkunet.py: ``kaiming_normal_(
  kernel, mode="fan_out", nonlinearity="relu")``): normal, std ``sqrt(2 / fan_out)``,
  ``fan_out = K^3 * Cout`` (Box-Muller on :func:`_hash_uniform`)."""
  u = _hash_uniform(key, (2, *shape))
  z = jnp.sqrt(-2.0 * jnp.log1p(-u[0])) * jnp.cos(2 * np.pi * u[1])
  return (z * np.sqrt(2.0 / max(_fans(shape)[1], 1))).astype(dtype)


def torch_default_init(key, shape, dtype=jnp.float32):
  """torch's / TorchSparse's default: uniform in ``+-1/sqrt(fan_in)``."""
  bound = 1.0 / np.sqrt(max(_fans(shape)[0], 1))
  return ((2 * _hash_uniform(key, shape) - 1) * bound).astype(dtype)


# --------------------------------------------------------------------------- levels
class _Level(NamedTuple):
  """One resolution of the U-Net: the level (coordinates, validity, batch) and the maps
  its convs use: ``subm[K]`` the submanifold maps, ``down`` the map from the finer level
  to this one (None at the input)."""
  t: SparseTensor
  subm: dict
  down: Any


def _levels(x: SparseTensor, num_down: int, capacities, subm_sizes) -> list[_Level]:
  """The hierarchy of a MinkUNet: ``x`` and ``num_down`` ``k2 s2`` floor levels, each with
  its submanifold maps for the kernel sizes in ``subm_sizes[i]`` (built once, shared by
  all the level's layers)."""
  if capacities is None:
    capacities = (x.coords.shape[0],) * num_down
  capacities = tuple(int(c) for c in capacities)
  if len(capacities) != num_down:
    raise ValueError(f"capacities must give {num_down} ints (the rows of the levels at "
                     f"tensor stride 2, 4, 8, 16), got {capacities}")
  bare = x.replace(feats=jnp.zeros((x.coords.shape[0], 0), x.feats.dtype), maps={})
  levels, t, down = [], bare, None
  for i in range(num_down + 1):
    subm = {k: t.kernel_map(k) for k in subm_sizes[i]}
    levels.append(_Level(t, subm, down))
    if i < num_down:
      c = t.conv(2, 2, rule="floor", key="down", capacity=capacities[i])
      down = c.maps["down"].kernel_map
      t = c.replace(maps={})
  return levels


# --------------------------------------------------------------------------- layers
class MinkowskiConv(nn.Module):
  """A MinkowskiEngine / TorchSparse conv through a given map.

  ``kernel_map`` None: the kernel-1 stride-1 conv (``x @ kernel``, no map). Otherwise the
  conv of that map: a submanifold map, a ``k2 s2`` floor map (fine -> coarse), or with
  ``transpose=True`` the transposed conv through the forward map given
  (coarse -> fine, same slots). The kernel is ``(K, K, K, Cin, features)``.

  Attributes:
    features: output channels.
    kernel_size: ``K`` (the map's).
    use_bias: add a bias (MinkUNet's only biased conv is ME's ``final``).
    kernel_init, bias_init: initialisers.
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = False
  kernel_init: Any = kaiming_fan_out
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, feats, kernel_map=None, *, valid=None, transpose=False):
    """``feats (rows, Cin)`` -> ``(out rows, features)``."""
    k = int(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init, (k, k, k, feats.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
    if kernel_map is None:
      if k != 1:
        raise ValueError(f"a kernel_size {k} conv needs a kernel map")
      y = jnp.dot(feats, kernel[0, 0, 0].astype(feats.dtype))
      if bias is not None:
        y = y + bias.astype(y.dtype)
      return y if valid is None else jnp.where(valid[:, None], y, 0)
    params = {"kernel": kernel.astype(feats.dtype)}
    if bias is not None:
      params["bias"] = bias.astype(feats.dtype)
    if transpose:
      return sc.sparse_conv_transpose(params, feats, kernel_map=kernel_map.transposed())
    return sc.sparse_conv(params, feats, kernel_map=kernel_map)


def _bn(name):
  return SparseBatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, name=name)


class BasicBlock(nn.Module):
  """MinkowskiEngine's ``BasicBlock`` (``conv1, norm1, conv2, norm2``, ``downsample`` =
  kernel-1 conv + BN when the widths differ), submanifold ``K=3``."""
  planes: int
  downsample: bool = False
  kernel_init: Any = kaiming_fan_out
  expansion = 1

  @nn.compact
  def __call__(self, x, level: _Level, train: bool = False):
    v, km = level.t.valid, level.subm[3]
    out = nn.relu(_bn("norm1")(MinkowskiConv(self.planes, 3, kernel_init=self.kernel_init,
                                             name="conv1")(x, km), v, train))
    out = _bn("norm2")(MinkowskiConv(self.planes, 3, kernel_init=self.kernel_init,
                                     name="conv2")(out, km), v, train)
    res = x
    if self.downsample:
      res = _bn("downsample_1")(MinkowskiConv(self.planes * self.expansion, 1,
                                              kernel_init=self.kernel_init,
                                              name="downsample_0")(x, valid=v), v, train)
    return nn.relu(out + res)


class Bottleneck(nn.Module):
  """MinkowskiEngine's ``Bottleneck`` (kernel-1, ``K=3``, kernel-1 to ``4 * planes``)."""
  planes: int
  downsample: bool = False
  kernel_init: Any = kaiming_fan_out
  expansion = 4

  @nn.compact
  def __call__(self, x, level: _Level, train: bool = False):
    v, km = level.t.valid, level.subm[3]
    conv = lambda c, k, name: MinkowskiConv(c, k, kernel_init=self.kernel_init,  # noqa: E731
                                            name=name)
    out = nn.relu(_bn("norm1")(conv(self.planes, 1, "conv1")(x, valid=v), v, train))
    out = nn.relu(_bn("norm2")(conv(self.planes, 3, "conv2")(out, km), v, train))
    out = _bn("norm3")(conv(self.planes * 4, 1, "conv3")(out, valid=v), v, train)
    res = x
    if self.downsample:
      res = _bn("downsample_1")(conv(self.planes * 4, 1, "downsample_0")(x, valid=v), v, train)
    return nn.relu(out + res)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


# --------------------------------------------------------------------------- ME MinkUNet
class MinkUNet(nn.Module):
  """MinkowskiEngine's ``MinkUNetBase`` (examples/minkunet.py, v0.5.4), in 3D.

  A ``K=5`` stem, four ``k2 s2`` down convs each followed by ``layers[0..3]`` residual
  blocks of ``planes[0..3]``, four ``k2 s2`` transposed convs to ``planes[4..7]`` each
  concatenated with the skip of that level (upsampled channels first, as ``ME.cat``) and
  followed by ``layers[4..7]`` blocks, and a biased kernel-1 ``final`` conv.

  Attributes:
    out_channels: classes (ME's ``out_channels``).
    block: ``"basic"`` (MinkUNet14/18/34) or ``"bottleneck"`` (50/101).
    layers: blocks per stage, 8 ints (ME's ``LAYERS``).
    planes: channels per stage, 8 ints (ME's ``PLANES``).
    init_dim: the stem's channels (ME's ``INIT_DIM``).
    width: multiplies ``planes`` and ``init_dim`` (``int(width * p)``) for reduced
      networks; 1.0 is ME's.
    capacities: static rows of the levels at tensor stride 2, 4, 8, 16 (4 ints), or None
      for the input's capacity at every level (always enough). Overflow is
      ``CAPACITY_OVERFLOW`` under the error rule.
    kernel_init: conv kernel initialiser (ME's kaiming normal, fan out).

  Call ``model.apply(variables, x, train=False)`` with a :class:`SparseTensor` ``x`` of
  voxels (integer ``coords``, ``batch`` for packed clouds, ``valid``, features
  ``(rows, in_channels)``); returns ``x`` with ``feats`` the logits ``(rows,
  out_channels)`` (padding rows 0). ``train=True`` uses batch statistics; pass
  ``mutable=["batch_stats"]`` to update the running ones.
  """
  out_channels: int
  block: str = "basic"
  layers: Sequence[int] = (2, 2, 2, 2, 2, 2, 2, 2)
  planes: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96)
  init_dim: int = 32
  width: float = 1.0
  capacities: Sequence[int] | None = None
  kernel_init: Any = kaiming_fan_out

  def widths(self) -> tuple[tuple[int, ...], int]:
    """``(planes, init_dim)`` after ``width``."""
    if len(tuple(self.planes)) != 8 or len(tuple(self.layers)) != 8:
      raise ValueError(f"planes and layers need 8 entries, got {tuple(self.planes)} and "
                       f"{tuple(self.layers)}")
    w = float(self.width)
    return tuple(int(w * p) for p in self.planes), int(w * self.init_dim)

  @nn.compact
  def __call__(self, x: SparseTensor, train: bool = False) -> SparseTensor:
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
    B = _BLOCKS[self.block]
    P, init_dim = self.widths()
    L = tuple(int(n) for n in self.layers)
    lv = _levels(x, 4, self.capacities, [(5, 3), (3,), (3,), (3,), (3,)])
    ki = self.kernel_init
    conv = lambda c, k, name, **kw: MinkowskiConv(c, k, kernel_init=ki, name=name, **kw)  # noqa

    inplanes = init_dim

    def stage(h, level, planes, blocks, index):
      nonlocal inplanes
      for j in range(blocks):
        ds = j == 0 and inplanes != planes * B.expansion
        h = B(planes, downsample=ds, kernel_init=ki, name=f"block{index}_{j}")(h, level, train)
        inplanes = planes * B.expansion
      return h

    def down(h, i, c, name, bn):   # level i-1 -> level i
      return nn.relu(_bn(bn)(conv(c, 2, name)(h, lv[i].down), lv[i].t.valid, train))

    def up(h, i, c, name, bn):     # level i+1 -> level i
      y = conv(c, 2, name)(h, lv[i + 1].down, transpose=True)
      return nn.relu(_bn(bn)(y, lv[i].t.valid, train))

    feats = x.feats
    out = nn.relu(_bn("bn0")(conv(init_dim, 5, "conv0p1s1")(feats, lv[0].subm[5]),
                             lv[0].t.valid, train))
    out_p1 = out
    out = down(out_p1, 1, inplanes, "conv1p1s2", "bn1")
    out_b1p2 = stage(out, lv[1], P[0], L[0], 1)
    out = down(out_b1p2, 2, inplanes, "conv2p2s2", "bn2")
    out_b2p4 = stage(out, lv[2], P[1], L[1], 2)
    out = down(out_b2p4, 3, inplanes, "conv3p4s2", "bn3")
    out_b3p8 = stage(out, lv[3], P[2], L[2], 3)
    out = down(out_b3p8, 4, inplanes, "conv4p8s2", "bn4")
    out = stage(out, lv[4], P[3], L[3], 4)

    out = up(out, 3, P[4], "convtr4p16s2", "bntr4")
    inplanes = P[4] + P[2] * B.expansion
    out = stage(jnp.concatenate([out, out_b3p8], -1), lv[3], P[4], L[4], 5)
    out = up(out, 2, P[5], "convtr5p8s2", "bntr5")
    inplanes = P[5] + P[1] * B.expansion
    out = stage(jnp.concatenate([out, out_b2p4], -1), lv[2], P[5], L[5], 6)
    out = up(out, 1, P[6], "convtr6p4s2", "bntr6")
    inplanes = P[6] + P[0] * B.expansion
    out = stage(jnp.concatenate([out, out_b1p2], -1), lv[1], P[6], L[6], 7)
    out = up(out, 0, P[7], "convtr7p2s2", "bntr7")
    inplanes = P[7] + init_dim
    out = stage(jnp.concatenate([out, out_p1], -1), lv[0], P[7], L[7], 8)
    logits = conv(self.out_channels, 1, "final", use_bias=True)(out, valid=lv[0].t.valid)
    return x.replace(feats=logits)


def _variant(name, block, layers, planes, doc):
  cls = type(name, (MinkUNet,), {
      "__annotations__": {"block": str, "layers": Sequence[int], "planes": Sequence[int]},
      "block": block, "layers": tuple(layers), "planes": tuple(planes),
      "__doc__": f"MinkowskiEngine's ``{name}``: {doc}. Attributes as :class:`MinkUNet` "
                 f"(``block={block!r}``, ``layers={tuple(layers)}``, "
                 f"``planes={tuple(planes)}`` by default).",
      "__module__": __name__})
  return cls


_L14, _L18, _L34, _L101 = (1,) * 8, (2,) * 8, (2, 3, 4, 6, 2, 2, 2, 2), (2, 3, 4, 23, 2, 2, 2, 2)
_PBASE = (32, 64, 128, 256, 256, 128, 96, 96)
MinkUNet14 = _variant("MinkUNet14", "basic", _L14, _PBASE, "BasicBlock, one block per stage")
MinkUNet18 = _variant("MinkUNet18", "basic", _L18, _PBASE, "BasicBlock, two blocks per stage")
MinkUNet34 = _variant("MinkUNet34", "basic", _L34, _PBASE, "BasicBlock, ResNet-34 stages")
MinkUNet50 = _variant("MinkUNet50", "bottleneck", _L34, _PBASE, "Bottleneck, ResNet-50 stages")
MinkUNet101 = _variant("MinkUNet101", "bottleneck", _L101, _PBASE,
                       "Bottleneck, ResNet-101 stages")
MinkUNet14A = _variant("MinkUNet14A", "basic", _L14, (32, 64, 128, 256, 128, 128, 96, 96), "A")
MinkUNet14B = _variant("MinkUNet14B", "basic", _L14, (32, 64, 128, 256, 128, 128, 128, 128), "B")
MinkUNet14C = _variant("MinkUNet14C", "basic", _L14, (32, 64, 128, 256, 192, 192, 128, 128), "C")
MinkUNet14D = _variant("MinkUNet14D", "basic", _L14, (32, 64, 128, 256, 384, 384, 384, 384), "D")
MinkUNet18A = _variant("MinkUNet18A", "basic", _L18, (32, 64, 128, 256, 128, 128, 96, 96), "A")
MinkUNet18B = _variant("MinkUNet18B", "basic", _L18, (32, 64, 128, 256, 128, 128, 128, 128), "B")
MinkUNet18D = _variant("MinkUNet18D", "basic", _L18, (32, 64, 128, 256, 384, 384, 384, 384), "D")
MinkUNet34A = _variant("MinkUNet34A", "basic", _L34, (32, 64, 128, 256, 256, 128, 64, 64), "A")
MinkUNet34B = _variant("MinkUNet34B", "basic", _L34, (32, 64, 128, 256, 256, 128, 64, 32), "B")
MinkUNet34C = _variant("MinkUNet34C", "basic", _L34, (32, 64, 128, 256, 256, 128, 96, 96),
                       "C (the ScanNet weights)")

#: ``{name: class}`` of MinkowskiEngine's MinkUNet variants.
ME_MODELS = {c.__name__: c for c in (
    MinkUNet14, MinkUNet18, MinkUNet34, MinkUNet50, MinkUNet101, MinkUNet14A, MinkUNet14B,
    MinkUNet14C, MinkUNet14D, MinkUNet18A, MinkUNet18B, MinkUNet18D, MinkUNet34A,
    MinkUNet34B, MinkUNet34C)}


# --------------------------------------------------------------------------- SPVNAS
def spvnas_channels(cr: float = 1.0) -> tuple[int, ...]:
  """SPVNAS's ``cs = [int(cr * x) for x in (32, 32, 64, 128, 256, 256, 128, 96, 96)]``."""
  return tuple(int(cr * c) for c in (32, 32, 64, 128, 256, 256, 128, 96, 96))


class _SPVResidual(nn.Module):
  """SPVNAS's ``ResidualBlock`` (``net.0`` conv, ``net.1`` BN, ReLU, ``net.3`` conv,
  ``net.4`` BN; ``downsample.0/1`` kernel-1 conv + BN when the widths differ)."""
  features: int
  kernel_init: Any

  @nn.compact
  def __call__(self, x, level: _Level, train: bool):
    v, km = level.t.valid, level.subm[3]
    c = self.features
    out = nn.relu(_bn("net_1")(MinkowskiConv(c, 3, kernel_init=self.kernel_init,
                                             name="net_0")(x, km), v, train))
    out = _bn("net_4")(MinkowskiConv(c, 3, kernel_init=self.kernel_init,
                                     name="net_3")(out, km), v, train)
    res = x
    if x.shape[-1] != c:
      res = _bn("downsample_1")(MinkowskiConv(c, 1, kernel_init=self.kernel_init,
                                              name="downsample_0")(x, valid=v), v, train)
    return nn.relu(out + res)


class _SPVConvBlock(nn.Module):
  """SPVNAS's ``BasicConvolutionBlock`` / ``BasicDeconvolutionBlock`` with ``ks=2,
  stride=2`` (``net.0`` conv, ``net.1`` BN, ReLU)."""
  features: int
  kernel_init: Any
  transpose: bool = False

  @nn.compact
  def __call__(self, x, kernel_map, valid, train: bool):
    y = MinkowskiConv(self.features, 2, kernel_init=self.kernel_init, name="net_0")(
        x, kernel_map, transpose=self.transpose)
    return nn.relu(_bn("net_1")(y, valid, train))


class SPVNASMinkUNet(nn.Module):
  """SPVNAS's SemanticKITTI ``MinkUNet(num_classes=19, cr=1.0)``
  (``core/models/semantic_kitti/minkunet.py``, on TorchSparse).

  Named ``SPVNASMinkUNet`` here because :class:`MinkUNet` is MinkowskiEngine's (a
  different network: ``K=5`` stem, ``bn0``-style names, one residual stage per level).
  A ``K=3`` stem (``stem.0..5``), four stages (``stage1..4``: a ``k2 s2`` conv block and two
  residual blocks), four up stages (``up1..4``: a ``k2 s2`` transposed conv block, the
  skip concatenated after it, two residual blocks) and the ``classifier`` (a
  ``Linear`` on the voxel features). SPVNAS's ``point_transforms`` and ``dropout`` are
  in its state dict but unused by this voxel network's forward; they are not here.

  Attributes:
    num_classes: classes (19 for SemanticKITTI).
    cr: the channel ratio (``cs = int(cr * c)``).
    channels: 9 ints, instead of ``cr``'s (e.g. read from a checkpoint).
    capacities: static rows of the levels at tensor stride 2, 4, 8, 16, or None (the
      input's).
    kernel_init: conv kernel initialiser (torch's default, as TorchSparse).

  Call as :class:`MinkUNet` (input features: x, y, z, remission for SemanticKITTI).
  """
  num_classes: int = 19
  cr: float = 1.0
  channels: Sequence[int] | None = None
  capacities: Sequence[int] | None = None
  kernel_init: Any = torch_default_init

  def widths(self) -> tuple[int, ...]:
    """The 9 channel counts ``cs``."""
    cs = spvnas_channels(self.cr) if self.channels is None else tuple(int(c) for c in
                                                                     self.channels)
    if len(cs) != 9:
      raise ValueError(f"channels needs 9 entries, got {cs}")
    return cs

  @nn.compact
  def __call__(self, x: SparseTensor, train: bool = False) -> SparseTensor:
    cs = self.widths()
    ki = self.kernel_init
    lv = _levels(x, 4, self.capacities, [(3,)] * 5)
    v0 = lv[0].t.valid
    h = x.feats
    h = nn.relu(_bn("stem_1")(MinkowskiConv(cs[0], 3, kernel_init=ki, name="stem_0")(
        h, lv[0].subm[3]), v0, train))
    h = nn.relu(_bn("stem_4")(MinkowskiConv(cs[0], 3, kernel_init=ki, name="stem_3")(
        h, lv[0].subm[3]), v0, train))
    skips = [h]
    for i in range(1, 5):
      h = _SPVConvBlock(h.shape[-1], ki, name=f"stage{i}_0")(h, lv[i].down, lv[i].t.valid,
                                                             train)
      h = _SPVResidual(cs[i], ki, name=f"stage{i}_1")(h, lv[i], train)
      h = _SPVResidual(cs[i], ki, name=f"stage{i}_2")(h, lv[i], train)
      skips.append(h)
    for i in range(1, 5):
      lvl = lv[4 - i]
      h = _SPVConvBlock(cs[4 + i], ki, transpose=True, name=f"up{i}_0")(
          h, lv[5 - i].down, lvl.t.valid, train)
      h = jnp.concatenate([h, skips[4 - i]], -1)
      h = _SPVResidual(cs[4 + i], ki, name=f"up{i}_1_0")(h, lvl, train)
      h = _SPVResidual(cs[4 + i], ki, name=f"up{i}_1_1")(h, lvl, train)
    logits = nn.Dense(self.num_classes, kernel_init=torch_default_init,
                      name="classifier_0")(h)
    return x.replace(feats=jnp.where(v0[:, None], logits, 0))


# --------------------------------------------------------------------------- input side
class Quantized(NamedTuple):
  """The result of :func:`sparse_quantize`."""
  tensor: SparseTensor   #: the voxels (``capacity`` rows, the first ``count`` valid)
  point_to_voxel: jax.Array  #: int32 ``(n_points,)`` row of each point's voxel; -1 for
  #: padding points (and points dropped by a capacity overflow)


def sparse_quantize(points, feats, voxel_size, *, batch=None, valid=None, capacity=None,
                    reduce: str = "mean", rounding: str = "floor",
                    shift_to_zero: bool = False) -> Quantized:
  """Points to unique voxels, as the model zoos quantise a cloud (jit-able).

  Voxel coordinates ``floor(p / voxel_size)`` (``rounding="floor"``, MinkowskiEngine) or
  ``round(p / voxel_size)`` (half to even, ``"round"``, SPVNAS), per cloud shifted so
  that their minimum is 0 when ``shift_to_zero`` (SPVNAS's ``pc_ -= pc_.min(0)``); the
  voxel's features the mean of its points' (``reduce="mean"``, ME's
  ``UNWEIGHTED_AVERAGE``) or the first point's (``"first"``, TorchSparse's
  ``sparse_quantize`` ``return_index``). Voxels are sorted by ``(batch, x, y, z)``.

  Args:
    points: ``(n, 3)`` float positions.
    feats: ``(n, C)`` point features.
    voxel_size: scalar (float32 division as the zoos).
    batch: int ``(n,)`` cloud of each point (packed batch), or None (one cloud).
    valid: bool ``(n,)`` or count: the real points of a padded array (None: all).
    capacity: static rows of the result (default ``n``); more voxels is
      ``CAPACITY_OVERFLOW`` (raised outside ``jit``; inside, the tensor's flags).
    reduce, rounding, shift_to_zero: the zoo's rule, see above.

  Returns:
    :class:`Quantized` ``(tensor, point_to_voxel)``: a :class:`SparseTensor` (level 1,
    voxel size ``voxel_size``, ``batch`` set when given) and each point's row.
  """
  from jax_sparseconv._src import checks, errors  # noqa: PLC0415
  if reduce not in ("mean", "first"):
    raise ValueError(f"reduce must be 'mean' or 'first', got {reduce!r}")
  if rounding not in ("floor", "round"):
    raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
  points = jnp.asarray(points)
  feats = jnp.asarray(feats)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"points must have shape (n, 3), got {points.shape}")
  n = points.shape[0]
  if feats.ndim != 2 or feats.shape[0] != n:
    raise ValueError(f"feats must have shape ({n}, C), got {feats.shape}")
  cap = n if capacity is None else checks.check_capacity(capacity)
  mask = checks.valid_mask(valid, (n,), "valid")
  b = jnp.zeros((n,), jnp.int32) if batch is None else jnp.asarray(batch, jnp.int32)
  tensor, p2v, flags = _quantize(points.astype(jnp.float32), feats, jnp.float32(voxel_size),
                                 mask, b, cap=cap, reduce=reduce, rounding=rounding,
                                 shift=bool(shift_to_zero), packed=batch is not None)
  errors.report(flags, "sparse_quantize")
  return Quantized(tensor, p2v)


@functools.partial(jax.jit, static_argnames=("cap", "reduce", "rounding", "shift", "packed"))
def _quantize(points, feats, vs, mask, b, *, cap, reduce, rounding, shift, packed):
  from jax_sparseconv._src import errors  # noqa: PLC0415
  from jax_sparseconv._src.errors import ErrorCode  # noqa: PLC0415
  n = points.shape[0]
  q = points / vs
  q = jnp.floor(q) if rounding == "floor" else jnp.round(q)
  finite = jnp.all(jnp.isfinite(q), -1)
  flags = errors.bit(mask & ~finite, ErrorCode.NONFINITE_POSITION)
  m = mask & finite
  c = jnp.where(m[:, None], q, 0).astype(jnp.int32)
  if shift:
    nb = n  # batch ids are < n for a meaningful packed batch
    big = jnp.iinfo(jnp.int32).max
    lo = jax.ops.segment_min(jnp.where(m[:, None], c, big), jnp.where(m, b, nb),
                             num_segments=nb + 1)[:nb]
    c = jnp.where(m[:, None], c - lo[jnp.clip(b, 0, nb - 1)], 0)
  pad = (~m).astype(jnp.int32)
  order = jnp.lexsort((jnp.arange(n), c[:, 2], c[:, 1], c[:, 0], b, pad))
  cs, bs, ms = c[order], b[order], m[order]
  same = jnp.concatenate([jnp.zeros((1,), bool),
                          jnp.all(cs[1:] == cs[:-1], -1) & (bs[1:] == bs[:-1])])
  new = ms & ~same
  count = jnp.sum(new, dtype=jnp.int32)
  flags |= errors.bit(count > cap, ErrorCode.CAPACITY_OVERFLOW)
  seg = jnp.cumsum(new) - 1
  seg = jnp.where(ms & (seg < cap), seg, cap)
  if reduce == "mean":
    num = jax.ops.segment_sum(jnp.ones((n,), feats.dtype), seg, num_segments=cap + 1)[:cap]
    vf = jax.ops.segment_sum(feats[order], seg, num_segments=cap + 1)[:cap]
    vf = vf / jnp.maximum(num, 1)[:, None]
  else:
    vf = jnp.zeros((cap + 1, feats.shape[1]), feats.dtype).at[jnp.where(new, seg, cap)].set(
        feats[order])[:cap]
  coords = jnp.zeros((cap, 3), jnp.int32).at[seg].set(cs, mode="drop")
  vb = jnp.zeros((cap,), jnp.int32).at[seg].set(bs, mode="drop")
  p2v = jnp.full((n,), -1, jnp.int32).at[order].set(jnp.where(seg < cap, seg, -1))
  valid = jnp.arange(cap) < jnp.minimum(count, cap)
  vsv = jnp.broadcast_to(vs, (3,)).astype(jnp.float32)
  origin = 0.5 * vsv if rounding == "floor" else jnp.zeros((3,), jnp.float32)
  t = SparseTensor(feats=errors.poison(vf, flags), coords=coords, valid=valid,
                   batch=vb if packed else None, voxel_size=vsv, origin=origin,
                   flags=flags, maps={})
  return t, p2v, flags


def tensor_field_quantize(points, feats, voxel_size, *, batch=None, valid=None,
                          capacity=None) -> Quantized:
  """MinkowskiEngine's input side: ``TensorField(feats, batched_coordinates([p / vs]),
  quantization_mode=UNWEIGHTED_AVERAGE).sparse()``: voxels ``floor(p / voxel_size)``
  (negatives kept), mean features. Pair with :func:`slice_points` (``.slice(field)``).
  See :func:`sparse_quantize` for the arguments.

  >>> import jax.numpy as jnp
  >>> x, p2v = tensor_field_quantize(jnp.array([[0.01, 0, 0], [0.02, 0, 0], [-0.01, 0, 0]]),
  ...                                jnp.array([[1.0], [3.0], [5.0]]), 0.05)
  >>> x.coords[:2, 0].tolist(), x.feats[:2, 0].tolist(), p2v.tolist()
  ([-1, 0], [5.0, 2.0], [1, 1, 0])
  """
  return sparse_quantize(points, feats, voxel_size, batch=batch, valid=valid,
                         capacity=capacity, reduce="mean", rounding="floor")


def spvnas_quantize(points, feats, voxel_size, *, batch=None, valid=None,
                    capacity=None) -> Quantized:
  """SPVNAS's input side (``core/datasets/semantic_kitti.py`` + TorchSparse's
  ``sparse_quantize``): ``round(p / voxel_size)`` shifted per cloud to start at 0, the
  first point's features per voxel, the inverse map for the per-point output. See
  :func:`sparse_quantize`."""
  return sparse_quantize(points, feats, voxel_size, batch=batch, valid=valid,
                         capacity=capacity, reduce="first", rounding="round",
                         shift_to_zero=True)


def slice_points(voxel_values, point_to_voxel):
  """Per-point values from per-voxel ones (``TensorField.slice``, SPVNAS's
  ``outputs[inverse_map]``); points with ``point_to_voxel == -1`` (padding) get 0.

  Args:
    voxel_values: ``(rows, ...)`` array, or a :class:`SparseTensor` (its ``feats``).
    point_to_voxel: int ``(n,)`` from :func:`sparse_quantize`.
  """
  if isinstance(voxel_values, SparseTensor):
    voxel_values = voxel_values.feats
  p2v = jnp.asarray(point_to_voxel)
  out = jnp.take(voxel_values, jnp.maximum(p2v, 0), axis=0)
  keep = (p2v >= 0).reshape((-1,) + (1,) * (out.ndim - 1))
  return jnp.where(keep, out, 0)
