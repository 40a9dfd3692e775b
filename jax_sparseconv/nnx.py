"""Flax NNX layers: ``SparseConv``, ``SparseConvTranspose`` and the level layers
``SubMConv``, ``DownConv``, ``UpConv``.

The NNX twins of :mod:`jax_sparseconv.linen`: the same arguments, semantics and
parameters (``kernel`` ``(Kz, Ky, Kx, in_channels, filters)`` and ``bias``
``(filters,)``, Open3D's names, shapes and layout, so Open3D and Linen weights load
unchanged). Each call is the pure function (:func:`jax_sparseconv.sparse_conv` /
:func:`jax_sparseconv.sparse_conv_transpose`), which stays the single source of truth:
the layers add no maths.

NNX creates parameters when the layer is constructed, so ``in_channels`` is required
(first argument, as in Open3D-ML's PyTorch ``SparseConv(in_channels, filters, ...)`` and
NNX's ``nnx.Conv(in_features, out_features, ...)``), and a call checks it against the
features. Weights of a Linen layer (or Open3D's) load with
``layer.kernel[...] = params["kernel"]`` and ``layer.bias[...] = params["bias"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from jax_sparseconv._src import checks
from jax_sparseconv._src.conv import sparse_conv, sparse_conv_transpose
from jax_sparseconv._src.tensor import SparseTensor, level_conv
from jax_sparseconv.linen import uniform_init

__all__ = ["SparseConv", "SparseConvTranspose", "SubMConv", "DownConv", "UpConv"]

_data = getattr(nnx, "data", lambda value: value)  # flax >= 0.11 marks pytree data


class _SparseConvLayer(nnx.Module):
  """Parameters and fields shared by every layer; ``_run`` calls the pure function."""

  def __init__(self, in_channels: int, filters: int, kernel_size: int | Sequence[int] = 3, *,
               activation: Callable | None = None, use_bias: bool = True,
               normalize: bool = False, offset: Sequence[float] | None = None,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               kernel_init: Callable = uniform_init(0.05),
               bias_init: Callable = nnx.initializers.zeros_init(),
               rngs: nnx.Rngs):
    ks = checks.normalize_kernel_size(kernel_size)
    self.in_channels = int(in_channels)
    self.filters = int(filters)
    self.kernel_size = ks
    self.activation = activation
    self.use_bias = use_bias
    self.normalize = normalize
    self.offset = None if offset is None else tuple(offset)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (*ks, self.in_channels, self.filters), param_dtype))
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (self.filters,), param_dtype))
    else:
      self.bias = _data(None)

  def _run(self, fn, feats, inp_positions, out_positions, voxel_size, importance, kernel_map,
           importance_name):
    name = type(self).__name__
    if jnp.ndim(feats) < 1 or jnp.shape(feats)[-1] != self.in_channels:
      raise ValueError(f"{name}: in_channels={self.in_channels} but feats has "
                       f"shape {jnp.shape(feats)}")
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    # Parameters replaced after construction (loaded weights): checked, not silently cast.
    given, shapes = {"kernel": kernel}, {"kernel": (*self.kernel_size, self.in_channels,
                                                    self.filters)}
    if self.use_bias:
      given["bias"], shapes["bias"] = bias, (self.filters,)
    checks.check_layer_params(name, given, shapes)
    feats, kernel, bias, importance = promote_dtype(
        (feats, kernel, bias, importance), dtype=self.dtype)
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    return fn(params, feats, inp_positions, out_positions, voxel_size, offset=self.offset,
              normalize=self.normalize, kernel_map=kernel_map, activation=self.activation,
              **{importance_name: importance})


class SparseConv(_SparseConvLayer):
  """Sparse 3D convolution layer (Open3D-ML's ``SparseConv``) for Flax NNX.

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

  Args:
    in_channels: number of input channels (required: NNX creates the parameters now).
    filters: number of output channels.
    kernel_size: int or ``(Kz, Ky, Kx)`` (kernel-array order); default 3.
    activation: callable applied to the output, or None (default).
    use_bias: add a bias (default True).
    normalize: divide by the number of neighbours (default False).
    offset: static ``[x, y, z]`` offset in voxels, None for Open3D's default.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype (default float32).
    kernel_init: default uniform in ``[-0.05, 0.05]`` as in Open3D.
    bias_init: default zeros.
    rngs: ``nnx.Rngs`` for the initialisers (its ``params`` stream).
  """

  def __call__(self, feats, inp_positions, out_positions, voxel_size, inp_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)`` features; see :func:`jax_sparseconv.sparse_conv`."""
    return self._run(sparse_conv, feats, inp_positions, out_positions, voxel_size,
                     inp_importance, kernel_map, "inp_importance")


class SparseConvTranspose(_SparseConvLayer):
  """Sparse 3D transposed convolution layer (Open3D-ML's ``SparseConvTranspose``) for
  Flax NNX.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_sparseconv.nnx import SparseConvTranspose
    >>> coarse = jnp.array([[0.5, 0.5, 0.5]])
    >>> fine = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
    >>> layer = SparseConvTranspose(3, 2, kernel_size=2, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape
    ((2, 2, 2, 3, 2), (2,))
    >>> layer(jnp.ones((1, 3)), coarse, fine, 1.0).shape
    (2, 2)

  Args: as :class:`SparseConv`. The call takes ``out_importance`` in place of
  ``inp_importance``; a given ``kernel_map`` must be built with ``transpose=True``.
  """

  def __call__(self, feats, inp_positions, out_positions, voxel_size, out_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)``; see :func:`jax_sparseconv.sparse_conv_transpose`."""
    return self._run(sparse_conv_transpose, feats, inp_positions, out_positions, voxel_size,
                     out_importance, kernel_map, "out_importance")


# ------------------------------------------------------- layers over SparseTensor levels
# spconv-style: a layer takes and returns a SparseTensor, using the maps it carries.
# Same arguments, parameters and maths as the two layers above.


class SubMConv(SparseConv):
  """Submanifold conv on a :class:`~jax_sparseconv.SparseTensor` (spconv's
  ``SubMConv3d``): outputs at the input voxels, through the tensor's cached map
  (``t.with_kernel_map(kernel_size)``; built on the fly otherwise).

  Example usage::

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> from flax import nnx
    >>> from jax_sparseconv.nnx import SubMConv
    >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
    >>> t = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25).with_kernel_map(3)
    >>> layer = SubMConv(4, 8, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape
    (3, 3, 3, 4, 8)
    >>> layer(t).feats.shape
    (3, 8)
  """

  def __call__(self, t: SparseTensor, inp_importance=None) -> SparseTensor:
    *args, km = level_conv("subm", t, t, self.kernel_size)
    return t.replace(feats=self._run(sparse_conv, *args, inp_importance, km, "inp_importance"))


class DownConv(SparseConv):
  """Strided conv from a level to its coarse level (spconv's ``SparseConv3d(k=2, s=2)``),
  through ``coarse.maps["down"]`` (made by ``fine.down()``); ``kernel_size`` must match
  the one given to ``down`` (default 2). Returns ``coarse`` with the new features.

  Example usage::

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> from flax import nnx
    >>> from jax_sparseconv.nnx import DownConv
    >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
    >>> fine = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25)
    >>> layer = DownConv(4, 8, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape
    (2, 2, 2, 4, 8)
    >>> layer(fine, fine.down()).feats.shape
    (3, 8)
  """

  def __init__(self, in_channels: int, filters: int, kernel_size: int | Sequence[int] = 2,
               **kwargs):
    super().__init__(in_channels, filters, kernel_size, **kwargs)

  def __call__(self, fine: SparseTensor, coarse: SparseTensor) -> SparseTensor:
    *args, km = level_conv("down", fine, coarse)
    return coarse.replace(feats=self._run(sparse_conv, *args, None, km, "inp_importance"))


class UpConv(SparseConvTranspose):
  """Transposed conv from a coarse level back to its fine level (spconv's
  ``SparseInverseConv3d``), through ``coarse.maps["up"]`` (the down map's transpose: no
  second search); default ``kernel_size`` 2. Returns ``fine`` with the new features.

  Example usage::

    >>> import jax.numpy as jnp, jax_sparseconv as sc
    >>> from flax import nnx
    >>> from jax_sparseconv.nnx import UpConv
    >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
    >>> fine = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25)
    >>> coarse = fine.down().replace(feats=jnp.ones((3, 6)))
    >>> layer = UpConv(6, 4, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape
    (2, 2, 2, 6, 4)
    >>> layer(coarse, fine).feats.shape
    (3, 4)
  """

  def __init__(self, in_channels: int, filters: int, kernel_size: int | Sequence[int] = 2,
               **kwargs):
    super().__init__(in_channels, filters, kernel_size, **kwargs)

  def __call__(self, coarse: SparseTensor, fine: SparseTensor) -> SparseTensor:
    *args, km = level_conv("up", coarse, fine)
    return fine.replace(feats=self._run(sparse_conv_transpose, *args, None, km, "out_importance"))
