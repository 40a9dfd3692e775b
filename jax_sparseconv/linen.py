"""Flax Linen layers: ``SparseConv`` and ``SparseConvTranspose``.

Thin wrappers: each creates ``kernel`` ``(Kz, Ky, Kx, Cin, filters)`` and ``bias``
``(filters,)`` parameters (Open3D's names, shapes and layout, so Open3D weights load
unchanged) and calls the pure function, which is the single source of truth.

Open3D's ``kernel_regularizer`` / ``bias_regularizer`` have no layer argument here:
in JAX a regulariser is a term of the loss over the parameter tree, e.g.
``loss + 1e-4 * sum(jnp.sum(p["kernel"] ** 2) for p in params_of_conv_layers)``,
or ``optax.add_decayed_weights`` masked to the kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jax_sparseconv._src import checks
from jax_sparseconv._src.conv import sparse_conv, sparse_conv_transpose
from jax_sparseconv._src.tensor import SparseTensor, level_conv

__all__ = ["SparseConv", "SparseConvTranspose", "SubMConv", "DownConv", "UpConv", "uniform_init"]


def uniform_init(scale: float = 0.05) -> Callable:
  """Uniform in ``[-scale, scale]``: Open3D's (Keras ``'uniform'``) kernel initialiser."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class _SparseConvLayer(nn.Module):
  """Fields shared by both layers; ``_run`` creates the parameters and calls ``fn``."""
  filters: int
  kernel_size: int | Sequence[int] = 3
  activation: Callable | None = None
  use_bias: bool = True
  normalize: bool = False
  offset: Sequence[float] | None = None
  in_channels: int | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = uniform_init(0.05)
  bias_init: Callable = nn.initializers.zeros_init()

  def _run(self, fn, feats, inp_positions, out_positions, voxel_size, importance, kernel_map,
           importance_name):
    name = type(self).__name__
    feats = checks.check_float_array("feats", feats, 2)
    cin = feats.shape[-1]
    if self.in_channels is not None and self.in_channels != cin:
      raise ValueError(f"{name}: in_channels={self.in_channels} but feats has "
                       f"shape {jnp.shape(feats)}")
    ks = checks.normalize_kernel_size(self.kernel_size)
    if not self.is_initializing():  # given parameters: checked before Flax reads them
      shapes = {"kernel": None, "bias": (self.filters,)} if self.use_bias else {"kernel": None}
      given = self.variables.get("params", {})
      kernel = given.get("kernel")
      if kernel is not None and jnp.ndim(kernel) == 5 and jnp.shape(kernel)[3] != cin:
        raise ValueError(f"{name}: feats has {cin} channels but the kernel "
                         f"{jnp.shape(kernel)} (Kz, Ky, Kx, Cin, Cout) expects "
                         f"Cin={jnp.shape(kernel)[3]}")
      shapes["kernel"] = (*ks, cin, self.filters)
      checks.check_layer_params(name, given, shapes)
    kernel = self.param("kernel", self.kernel_init, (*ks, cin, self.filters), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.filters,), self.param_dtype)
            if self.use_bias else None)
    feats, kernel, bias, importance = promote_dtype(
        feats, kernel, bias, importance, dtype=self.dtype)
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    return fn(params, feats, inp_positions, out_positions, voxel_size, offset=self.offset,
              normalize=self.normalize, kernel_map=kernel_map, activation=self.activation,
              **{importance_name: importance})


class SparseConv(_SparseConvLayer):
  """Sparse 3D convolution layer (Open3D-ML's ``SparseConv``) for Flax Linen.

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from jax_sparseconv.linen import SparseConv
    >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [1.5, 1.5, 0.5]])
    >>> layer = SparseConv(filters=8, kernel_size=3)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((3, 4)), pos, pos, 1.0)
    >>> jax.tree_util.tree_map(jnp.shape, variables["params"])
    {'bias': (8,), 'kernel': (3, 3, 3, 4, 8)}

  Attributes:
    filters: number of output channels.
    kernel_size: int or ``(Kz, Ky, Kx)`` (kernel-array order); default 3.
    activation: callable applied to the output, or None (default).
    use_bias: add a bias (default True).
    normalize: divide by the number of neighbours (default False).
    offset: static ``[x, y, z]`` offset in voxels, None for Open3D's default.
    in_channels: accepted for Open3D/PyTorch compatibility; inferred from ``feats``
      and checked when given.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype (default float32).
    kernel_init: default uniform in ``[-0.05, 0.05]`` as in Open3D.
    bias_init: default zeros.
  """

  @nn.compact
  def __call__(self, feats, inp_positions, out_positions, voxel_size, inp_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)`` features; see :func:`jax_sparseconv.sparse_conv`."""
    return self._run(sparse_conv, feats, inp_positions, out_positions, voxel_size,
                     inp_importance, kernel_map, "inp_importance")


class SparseConvTranspose(_SparseConvLayer):
  """Sparse 3D transposed convolution layer (Open3D-ML's ``SparseConvTranspose``).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from jax_sparseconv.linen import SparseConvTranspose
    >>> coarse = jnp.array([[0.5, 0.5, 0.5]])
    >>> fine = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
    >>> layer = SparseConvTranspose(filters=2, kernel_size=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 3)), coarse, fine, 1.0)
    >>> jax.tree_util.tree_map(jnp.shape, variables["params"])
    {'bias': (2,), 'kernel': (2, 2, 2, 3, 2)}

  Attributes: as :class:`SparseConv`. The call takes ``out_importance`` in place of
  ``inp_importance``; a given ``kernel_map`` must be built with ``transpose=True``.
  """

  @nn.compact
  def __call__(self, feats, inp_positions, out_positions, voxel_size, out_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)``; see :func:`jax_sparseconv.sparse_conv_transpose`."""
    return self._run(sparse_conv_transpose, feats, inp_positions, out_positions, voxel_size,
                     out_importance, kernel_map, "out_importance")


# ------------------------------------------------------- layers over SparseTensor levels
# spconv-style: a layer takes and returns a SparseTensor, using the maps it carries.
# Same fields, parameters and maths as the two layers above (they call them).


class SubMConv(SparseConv):
  """Submanifold conv on a :class:`~jax_sparseconv.SparseTensor` (spconv's
  ``SubMConv3d``): outputs at the input voxels, through the tensor's cached map
  (``t.with_kernel_map(kernel_size)``; built on the fly otherwise).

  Example usage::

    >>> import jax, jax.numpy as jnp, jax_sparseconv as sc
    >>> from jax_sparseconv.linen import SubMConv
    >>> pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1]])
    >>> t = sc.SparseTensor.from_points(pts, jnp.ones((3, 4)), 0.25).with_kernel_map(3)
    >>> layer = SubMConv(filters=8)
    >>> variables = layer.init(jax.random.key(0), t)
    >>> layer.apply(variables, t).feats.shape
    (3, 8)
  """

  @nn.compact
  def __call__(self, t: SparseTensor, inp_importance=None) -> SparseTensor:
    *args, km = level_conv("subm", t, t, checks.normalize_kernel_size(self.kernel_size))
    return t.replace(feats=self._run(sparse_conv, *args, inp_importance, km, "inp_importance"))


class DownConv(SparseConv):
  """Strided conv from a level to its coarse level (spconv's ``SparseConv3d(k=2, s=2)``),
  through ``coarse.maps["down"]`` (made by ``fine.down()``); ``kernel_size`` must match
  the one given to ``down`` (default 2). Returns ``coarse`` with the new features."""
  kernel_size: int | Sequence[int] = 2

  @nn.compact
  def __call__(self, fine: SparseTensor, coarse: SparseTensor) -> SparseTensor:
    *args, km = level_conv("down", fine, coarse)
    return coarse.replace(feats=self._run(sparse_conv, *args, None, km, "inp_importance"))


class UpConv(SparseConvTranspose):
  """Transposed conv from a coarse level back to its fine level (spconv's
  ``SparseInverseConv3d``), through ``coarse.maps["up"]`` (the down map's transpose: no
  second search). Returns ``fine`` with the new features."""
  kernel_size: int | Sequence[int] = 2

  @nn.compact
  def __call__(self, coarse: SparseTensor, fine: SparseTensor) -> SparseTensor:
    *args, km = level_conv("up", coarse, fine)
    return fine.replace(feats=self._run(sparse_conv_transpose, *args, None, km, "out_importance"))
