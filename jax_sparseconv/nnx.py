"""Flax NNX layers: the twins of :mod:`jax_sparseconv.linen`, the same body and parameters.

:class:`SparseConv`, :class:`SparseConvTranspose`, the level layers :class:`SubMConv`,
:class:`DownConv`, :class:`UpConv`, and spconv's :class:`SubMConv3d`,
:class:`SparseConv3d`, :class:`SparseInverseConv3d`, :class:`SparseConvTranspose3d`,
:class:`SparseMaxPool3d`, :class:`SparseAvgPool3d`. Each is the Linen layer of the same
name (its arguments, semantics and parameters ``kernel`` / ``bias``: see there), run by
the same body (``_src/layers.py``); only the parameter creation differs.

NNX creates parameters when the layer is constructed, so ``in_channels`` is required
(first argument, as in Open3D-ML's PyTorch ``SparseConv(in_channels, filters, ...)``,
spconv's ``SubMConv3d(in_channels, out_channels, ...)`` and NNX's
``nnx.Conv(in_features, out_features, ...)``), and a call checks it against the features.
Weights of a Linen layer (or Open3D's) load with ``layer.kernel[...] = params["kernel"]``
and ``layer.bias[...] = params["bias"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jax_sparseconv import linen
from jax_sparseconv._src import pooling
from jax_sparseconv._src.layers import ConvSpec, level_call, uniform_init
from jax_sparseconv._src.tensor import SparseTensor

__all__ = ["SparseConv", "SparseConvTranspose", "SubMConv", "DownConv", "UpConv", "SubMConv3d",
           "SparseConv3d", "SparseInverseConv3d", "SparseConvTranspose3d", "SparseMaxPool3d",
           "SparseAvgPool3d"]

_data = getattr(nnx, "data", lambda value: value)  # flax >= 0.11 marks pytree data


class _Layer(nnx.Module):
  """A layer: its :class:`ConvSpec` and its parameters, created from the spec's shapes."""

  def _create(self, spec: ConvSpec, in_channels: int, param_dtype, kernel_init, bias_init,
              rngs: nnx.Rngs):
    self.spec = spec
    self.in_channels = int(in_channels)
    shapes = spec.shapes(self.in_channels)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shapes["kernel"], param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), shapes["bias"], param_dtype))
                 if "bias" in shapes else _data(None))

  def _params(self, feats) -> dict:
    """The parameters, checked against the features and the shapes they were made with
    (loaded weights: never silently cast)."""
    cin = self.spec.channels(feats)
    params = {"kernel": self.kernel[...]}
    if self.bias is not None:
      params["bias"] = self.bias[...]
    self.spec.check_params(params, cin)
    return params


class SparseConv(_Layer):
  """:class:`jax_sparseconv.linen.SparseConv` for Flax NNX.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_sparseconv.nnx import SparseConv
    >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [1.5, 1.5, 0.5]])
    >>> layer = SparseConv(4, 8, kernel_size=3, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape
    ((3, 3, 3, 4, 8), (8,))
    >>> layer(jnp.ones((3, 4)), pos, pos, 1.0).shape
    (3, 8)

  Args: ``in_channels``, ``filters``, then the Linen layer's attributes as keywords, and
  ``rngs`` (``nnx.Rngs`` for the initialisers: its ``params`` stream).
  """
  _op = "conv"
  _kernel_size: int | Sequence[int] = 3

  def __init__(self, in_channels: int, filters: int, kernel_size=None, *,
               activation: Callable | None = None, use_bias: bool = True,
               normalize: bool = False, offset: Sequence[float] | None = None,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               kernel_init: Callable = uniform_init(0.05),
               bias_init: Callable = nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    ks = self._kernel_size if kernel_size is None else kernel_size
    spec = ConvSpec(type(self).__name__, self._op, int(filters), ks, int(in_channels), use_bias,
                    activation=activation, normalize=normalize,
                    offset=None if offset is None else tuple(offset), dtype=dtype)
    self._create(spec, in_channels, param_dtype, kernel_init, bias_init, rngs)

  def __call__(self, feats, inp_positions, out_positions, voxel_size, inp_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)`` features; see :func:`jax_sparseconv.sparse_conv`."""
    return self.spec.apply(self._params(feats), feats, inp_positions, out_positions,
                           voxel_size, importance=inp_importance, kernel_map=kernel_map)


class SparseConvTranspose(SparseConv):
  """:class:`jax_sparseconv.linen.SparseConvTranspose` for Flax NNX (arguments as
  :class:`SparseConv`).

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jax_sparseconv.nnx import SparseConvTranspose
  >>> coarse = jnp.array([[0.5, 0.5, 0.5]])
  >>> fine = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
  >>> layer = SparseConvTranspose(3, 2, kernel_size=2, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((1, 3)), coarse, fine, 1.0).shape
  (2, 2)
  """
  _op = "conv_transpose"

  def __call__(self, feats, inp_positions, out_positions, voxel_size, out_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)``; see :func:`jax_sparseconv.sparse_conv_transpose`."""
    return self.spec.apply(self._params(feats), feats, inp_positions, out_positions,
                           voxel_size, importance=out_importance, kernel_map=kernel_map)


class SubMConv(SparseConv):
  """:class:`jax_sparseconv.linen.SubMConv` for Flax NNX.

  >>> import jax.numpy as jnp, jax_sparseconv as sc
  >>> from flax import nnx
  >>> from jax_sparseconv.nnx import SubMConv
  >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
  >>> t = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25).with_kernel_map(3)
  >>> SubMConv(4, 8, rngs=nnx.Rngs(0))(t).feats.shape
  (3, 8)
  """
  _op = "subm"

  def __call__(self, t: SparseTensor, inp_importance=None) -> SparseTensor:
    return level_call(self.spec, self._params(t.feats), t, importance=inp_importance)


class DownConv(SparseConv):
  """:class:`jax_sparseconv.linen.DownConv` for Flax NNX (default ``kernel_size`` 2).

  >>> import jax.numpy as jnp, jax_sparseconv as sc
  >>> from flax import nnx
  >>> from jax_sparseconv.nnx import DownConv
  >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
  >>> fine = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25)
  >>> DownConv(4, 8, rngs=nnx.Rngs(0))(fine, fine.down()).feats.shape
  (3, 8)
  """
  _op = "down"
  _kernel_size = 2

  def __call__(self, fine: SparseTensor, coarse: SparseTensor) -> SparseTensor:
    return level_call(self.spec, self._params(fine.feats), fine, coarse)


class UpConv(SparseConv):
  """:class:`jax_sparseconv.linen.UpConv` for Flax NNX (default ``kernel_size`` 2).

  >>> import jax.numpy as jnp, jax_sparseconv as sc
  >>> from flax import nnx
  >>> from jax_sparseconv.nnx import UpConv
  >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
  >>> fine = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25)
  >>> coarse = fine.down().replace(feats=jnp.ones((3, 6)))
  >>> UpConv(6, 4, rngs=nnx.Rngs(0))(coarse, fine).feats.shape
  (3, 4)
  """
  _op = "up"
  _kernel_size = 2

  def __call__(self, coarse: SparseTensor, fine: SparseTensor) -> SparseTensor:
    return level_call(self.spec, self._params(coarse.feats), coarse, fine)


class SubMConv3d(_Layer):
  """:class:`jax_sparseconv.linen.SubMConv3d` for Flax NNX: spconv's signature,
  ``SubMConv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1,
  groups=1, bias=True, indice_key=None, *, rngs)``.

  >>> import jax.numpy as jnp, jax_sparseconv as sc
  >>> from flax import nnx
  >>> from jax_sparseconv.nnx import SubMConv3d
  >>> idx = jnp.array([[0, 0, 1, 2], [0, 0, 1, 3], [1, 3, 0, 0]])  # [b, z, y, x]
  >>> t = sc.SparseTensor.from_indices(idx, jnp.ones((3, 4)), [4, 5, 6], 2)
  >>> SubMConv3d(4, 16, 3, indice_key="subm1", rngs=nnx.Rngs(0))(t).feats.shape
  (3, 16)
  """
  _op = "spconv_subm"

  def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0,
               dilation=1, groups: int = 1, bias: bool = True, indice_key: str | None = None,
               *, capacity: int | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32, kernel_init: Callable = linen.spconv_init,
               bias_init: Callable = nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    spec = ConvSpec(type(self).__name__, self._op, int(out_channels), kernel_size,
                    int(in_channels), bias, int(groups), dtype=dtype, stride=stride,
                    padding=padding, dilation=dilation, key=indice_key, capacity=capacity)
    self._create(spec, in_channels, param_dtype, kernel_init, bias_init, rngs)

  def __call__(self, x: SparseTensor) -> SparseTensor:
    return level_call(self.spec, self._params(x.feats), x)


class SparseConv3d(SubMConv3d):
  """:class:`jax_sparseconv.linen.SparseConv3d` for Flax NNX (``capacity`` keyword)."""
  _op = "spconv_conv"


class SparseConvTranspose3d(SubMConv3d):
  """:class:`jax_sparseconv.linen.SparseConvTranspose3d` for Flax NNX."""
  _op = "spconv_transpose"


class SparseInverseConv3d(SubMConv3d):
  """:class:`jax_sparseconv.linen.SparseInverseConv3d` for Flax NNX."""
  _op = "spconv_inverse"


class SparseMaxPool3d(nnx.Module):
  """:class:`jax_sparseconv.linen.SparseMaxPool3d` for Flax NNX (no parameters)."""
  _mode = "max"

  def __init__(self, kernel_size=2, stride=None, padding=0, dilation=1,
               indice_key: str | None = None, *, capacity: int | None = None):
    self.args = (kernel_size, stride, padding, dilation)
    self.indice_key, self.capacity = indice_key, capacity

  def __call__(self, x: SparseTensor) -> SparseTensor:
    return pooling.level_pool(self._mode, x, *self.args, key=self.indice_key,
                              capacity=self.capacity)


class SparseAvgPool3d(SparseMaxPool3d):
  """:class:`jax_sparseconv.linen.SparseAvgPool3d` for Flax NNX."""
  _mode = "avg"
