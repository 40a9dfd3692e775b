"""The bodies of the conv layers, shared by the Flax Linen and NNX wrappers (no Flax here).

A layer is a :class:`ConvSpec` (its static configuration) plus its parameters
``{"kernel", "bias"}``. The spec says which parameter shapes the layer has
(:meth:`ConvSpec.shapes`), checks given parameters against them
(:meth:`ConvSpec.check_params`) and runs the layer (:meth:`ConvSpec.apply` for Open3D's
point layers, :func:`level_call` for the layers over :class:`SparseTensor` levels). The
wrappers in ``linen.py`` and ``nnx.py`` only create the parameters; the maths is the
pure functions of ``conv.py``, the maps come from the level.

Op kinds (``ConvSpec.op``):

* ``"conv"`` / ``"conv_transpose"``: Open3D-ML's ``SparseConv`` / ``SparseConvTranspose``
  on explicit positions (``kernel_size`` in kernel-array order ``(Kz, Ky, Kx)``).
* ``"subm"``, ``"down"``, ``"up"``: the level layers of Open3D-ML style networks
  (``SubMConv``, ``DownConv``, ``UpConv``).
* ``"spconv_subm"``, ``"spconv_conv"``, ``"spconv_inverse"``, ``"spconv_transpose"``:
  spconv's ``SubMConv3d``, ``SparseConv3d``, ``SparseInverseConv3d``,
  ``SparseConvTranspose3d``; their per-axis arguments and the kernel's leading axes are
  in the level's index order (spconv's ``(k0, k1, k2)`` acting on index columns
  ``d0, d1, d2``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from . import checks, conv
from .geometry import per_axis
from .tensor import SparseTensor, subm_key

OPS = ("conv", "conv_transpose", "subm", "down", "up", "spconv_subm", "spconv_conv",
       "spconv_inverse", "spconv_transpose")
_SPCONV = ("spconv_subm", "spconv_conv", "spconv_inverse", "spconv_transpose")


def uniform_init(scale: float = 0.05) -> Callable:
  """Uniform in ``[-scale, scale]``: Open3D's (Keras ``'uniform'``) kernel initialiser."""
  import jax  # noqa: PLC0415 - keeps this module importable without running jax code

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def promote(dtype, *xs):
  """``xs`` cast to ``dtype``, or to their common type when ``dtype`` is None (Flax's
  ``promote_dtype``); None entries stay None."""
  dtype = dtype or jnp.result_type(*[x for x in xs if x is not None])
  return [None if x is None else jnp.asarray(x, dtype) for x in xs]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A conv layer's static configuration.

  Attributes:
    layer: the layer's class name (for messages).
    op: one of :data:`OPS`.
    filters: output channels.
    kernel_size: int or 3 ints (kernel-array order for Open3D ops, index order for
      spconv ops).
    in_channels: expected input channels, or None (inferred).
    use_bias, groups, activation, normalize, offset, dtype: as the pure functions.
    stride, padding, dilation, key, capacity, rule: of the spconv ops (``key``: the
      ``indice_key``; ``capacity``: the generated level's rows).
  """
  layer: str
  op: str
  filters: int
  kernel_size: Any = 3
  in_channels: int | None = None
  use_bias: bool = True
  groups: int = 1
  activation: Callable | None = None
  normalize: bool = False
  offset: Any = None
  dtype: Any = None
  stride: Any = 1
  padding: Any = 0
  dilation: Any = 1
  key: str | None = None
  capacity: int | None = None

  def __post_init__(self):
    if self.op not in OPS:
      raise ValueError(f"op must be one of {OPS}, got {self.op!r}")

  @property
  def kernel_axes(self) -> tuple[int, int, int]:
    """The kernel's leading axes, as the parameter holds them."""
    return checks.normalize_kernel_size(self.kernel_size)

  def shapes(self, cin: int) -> dict[str, tuple[int, ...]]:
    """The parameter shapes for ``cin`` input channels."""
    if cin % self.groups or self.filters % self.groups:
      raise ValueError(f"{self.layer}: groups={self.groups} must divide the input channels "
                       f"({cin}) and the output channels ({self.filters})")
    shapes = {"kernel": (*self.kernel_axes, cin // self.groups, self.filters)}
    if self.use_bias:
      shapes["bias"] = (self.filters,)
    return shapes

  def channels(self, feats) -> int:
    """The input channels of ``feats``, checked against ``in_channels``."""
    shape = jnp.shape(feats)
    if self.in_channels is not None and (not shape or self.in_channels != shape[-1]):
      raise ValueError(f"{self.layer}: in_channels={self.in_channels} but feats has shape "
                       f"{shape}")
    checks.check_float_array("feats", feats, 2)
    return shape[-1]

  def check_params(self, params, cin: int) -> None:
    """Given parameters (loaded weights) against the shapes this layer creates."""
    kernel = params.get("kernel")
    if kernel is not None and jnp.ndim(kernel) == 5 and self.groups == 1 and \
        jnp.shape(kernel)[3] != cin:
      raise ValueError(f"{self.layer}: feats has {cin} channels but the kernel "
                       f"{jnp.shape(kernel)} (Kz, Ky, Kx, Cin, Cout) expects "
                       f"Cin={jnp.shape(kernel)[3]}")
    checks.check_layer_params(self.layer, params, self.shapes(cin))

  def apply(self, params, feats, in_pos=None, out_pos=None, voxel_size=None, *,
            importance=None, kernel_map=None, transpose=None):
    """The layer on features (the pure function, with dtype promotion)."""
    kernel, bias, feats, importance = promote(self.dtype, params["kernel"], params.get("bias"),
                                              feats, importance)
    p = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    if transpose is None:
      transpose = self.op in ("conv_transpose", "up")
    return conv.conv(p, feats, in_pos, out_pos, voxel_size, transpose=transpose,
                     offset=self.offset, normalize=self.normalize, importance=importance,
                     kernel_map=kernel_map, activation=self.activation, groups=self.groups)


def _index_to_array_order(values, name, t: SparseTensor, minimum):
  """spconv's per-axis arguments (index order ``d0, d1, d2``) in kernel-array order."""
  v = per_axis(name, values, minimum)
  return v if t.axis_order == "zyx" else v[::-1]


def _kernel_in_array_order(kernel, t: SparseTensor):
  """An index-order kernel ``(k0, k1, k2, ...)`` as ``(Kz, Ky, Kx, ...)``."""
  return kernel if t.axis_order == "zyx" else jnp.transpose(kernel, (2, 1, 0, 3, 4))


def level_call(spec: ConvSpec, params, src: SparseTensor, dst: SparseTensor | None = None,
               importance=None) -> SparseTensor:
  """A level layer: the level its output lives on, with the new features.

  ``"subm"`` / ``"spconv_subm"``: ``src`` to itself through its submanifold map (cached
  under the key, built and cached in the result otherwise); ``"down"``: fine ``src`` to
  coarse ``dst`` through ``dst.maps["down"]``; ``"up"``: coarse ``src`` to fine ``dst``
  through ``src.maps["up"]``; ``"spconv_conv"`` / ``"spconv_transpose"``: the level
  :meth:`SparseTensor.conv` generates from ``src`` (its map under ``key``);
  ``"spconv_inverse"``: the level the conv under ``key`` started from.
  """
  if spec.op == "down":
    return dst.replace(feats=spec.apply(params, src.feats, kernel_map=dst.maps["down"]))
  if spec.op == "up":
    return dst.replace(feats=spec.apply(params, src.feats, kernel_map=src.maps["up"]))
  if spec.op == "subm":
    key = subm_key(spec.kernel_size)
    km = src.kernel_map(spec.kernel_size, key=key)
    y = spec.apply(params, src.feats, importance=importance, kernel_map=km)
    return src.replace(feats=y, maps={**src.maps, key: km})
  if spec.op not in _SPCONV:
    raise ValueError(f"{spec.layer}: op {spec.op!r} does not take a level")
  p = dict(params, kernel=_kernel_in_array_order(params["kernel"], src))
  ks = _index_to_array_order(spec.kernel_size, "kernel_size", src, 1)
  dil = _index_to_array_order(spec.dilation, "dilation", src, 1)
  if spec.op == "spconv_subm":
    key = subm_key(ks, dil, "spconv") if spec.key is None else spec.key
    km = src.kernel_map(ks, dilation=dil, convention="spconv", key=key)
    y = spec.apply(p, src.feats, kernel_map=km, transpose=False)
    return src.replace(feats=y, maps={**src.maps, key: km})
  if spec.op == "spconv_inverse":
    if spec.key is None:
      raise ValueError(f"{spec.layer} needs the indice_key of the conv it inverts")
    link = src.link(spec.key)
    km = link.kernel_map.transposed()
    if km.kernel_size != ks:
      raise ValueError(f"{spec.layer}: kernel_size {spec.kernel_size} differs from the conv "
                       f"under indice_key {spec.key!r} (kernel {km.kernel_size} (Kz, Ky, Kx))")
    y = spec.apply(p, src.feats, kernel_map=km, transpose=True)
    return link.source.replace(feats=y)
  rule = "conv" if spec.op == "spconv_conv" else "transpose"
  out = src.conv(ks, _index_to_array_order(spec.stride, "stride", src, 1),
                 _index_to_array_order(spec.padding, "padding", src, 0), dil, rule=rule,
                 key=spec.key, capacity=spec.capacity)
  (link,) = out.maps.values()
  y = spec.apply(p, src.feats, kernel_map=link.kernel_map, transpose=False)
  return out.replace(feats=y)
