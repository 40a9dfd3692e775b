"""Flax Linen layers.

* Open3D-ML's layers on explicit positions: :class:`SparseConv`, :class:`SparseConvTranspose`
  (``kernel`` ``(Kz, Ky, Kx, Cin, filters)`` and ``bias`` ``(filters,)``: Open3D's names,
  shapes and layout, so Open3D weights load unchanged).
* Layers over :class:`~jax_sparseconv.SparseTensor` levels: :class:`SubMConv`,
  :class:`DownConv`, :class:`UpConv` (Open3D-ML / MinkowskiEngine style, explicit levels),
  and spconv's :class:`SubMConv3d`, :class:`SparseConv3d`, :class:`SparseInverseConv3d`,
  :class:`SparseConvTranspose3d` (spconv's names and arguments; maps kept under
  ``indice_key`` in the level), plus :class:`SparseMaxPool3d` and :class:`SparseAvgPool3d`.

Each layer only creates its parameters; the body it runs is shared with the NNX layers
(``_src/layers.py``) and calls the pure functions, the single source of truth.

Open3D's ``kernel_regularizer`` / ``bias_regularizer`` have no layer argument here:
in JAX a regulariser is a term of the loss over the parameter tree, e.g.
``loss + 1e-4 * sum(jnp.sum(p["kernel"] ** 2) for p in params_of_conv_layers)``,
or ``optax.add_decayed_weights`` masked to the kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jax_sparseconv._src import pooling
from jax_sparseconv._src.layers import ConvSpec, level_call, uniform_init
from jax_sparseconv._src.tensor import SparseTensor

__all__ = ["SparseConv", "SparseConvTranspose", "SubMConv", "DownConv", "UpConv", "SubMConv3d",
           "SparseConv3d", "SparseInverseConv3d", "SparseConvTranspose3d", "SparseMaxPool3d",
           "SparseAvgPool3d", "uniform_init"]

#: spconv's (torch's) default kernel initialiser: uniform in +-1/sqrt(fan_in).
spconv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class _Params:
  """Creates (at ``init``) or checks (at ``apply``) a layer's ``kernel`` and ``bias``."""

  def _params(self, spec: ConvSpec, cin: int) -> dict:
    shapes = spec.shapes(cin)
    if not self.is_initializing():  # given parameters: checked before Flax reads them
      spec.check_params(self.variables.get("params", {}), cin)
    params = {"kernel": self.param("kernel", self.kernel_init, shapes["kernel"],
                                   self.param_dtype)}
    if "bias" in shapes:
      params["bias"] = self.param("bias", self.bias_init, shapes["bias"], self.param_dtype)
    return params


class SparseConv(_Params, nn.Module):
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

  _op = "conv"

  def _spec(self) -> ConvSpec:
    return ConvSpec(type(self).__name__, self._op, self.filters, self.kernel_size,
                    self.in_channels, self.use_bias, activation=self.activation,
                    normalize=self.normalize, offset=self.offset, dtype=self.dtype)

  @nn.compact
  def __call__(self, feats, inp_positions, out_positions, voxel_size, inp_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)`` features; see :func:`jax_sparseconv.sparse_conv`."""
    spec = self._spec()
    params = self._params(spec, spec.channels(feats))
    return spec.apply(params, feats, inp_positions, out_positions, voxel_size,
                      importance=inp_importance, kernel_map=kernel_map)


class SparseConvTranspose(SparseConv):
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
  _op = "conv_transpose"

  @nn.compact
  def __call__(self, feats, inp_positions, out_positions, voxel_size, out_importance=None,
               kernel_map=None):
    """Returns ``(num_out, filters)``; see :func:`jax_sparseconv.sparse_conv_transpose`."""
    spec = self._spec()
    params = self._params(spec, spec.channels(feats))
    return spec.apply(params, feats, inp_positions, out_positions, voxel_size,
                      importance=out_importance, kernel_map=kernel_map)


# ------------------------------------------------------- layers over SparseTensor levels


class SubMConv(SparseConv):
  """Submanifold conv on a :class:`~jax_sparseconv.SparseTensor`: outputs at the input
  voxels, through the level's map for ``kernel_size`` (``t.with_kernel_map(kernel_size)``;
  otherwise built here and kept in the returned level, so the next layer reuses it).
  Same fields and parameters as :class:`SparseConv`.

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
  _op = "subm"

  @nn.compact
  def __call__(self, t: SparseTensor, inp_importance=None) -> SparseTensor:
    spec = self._spec()
    return level_call(spec, self._params(spec, spec.channels(t.feats)), t,
                      importance=inp_importance)


class DownConv(SparseConv):
  """Strided conv from a level to its coarse level, through ``coarse.maps["down"]`` (made
  by ``fine.down()``); ``kernel_size`` must match the one given to ``down`` (default 2).
  Returns ``coarse`` with the new features."""
  kernel_size: int | Sequence[int] = 2
  _op = "down"

  @nn.compact
  def __call__(self, fine: SparseTensor, coarse: SparseTensor) -> SparseTensor:
    spec = self._spec()
    return level_call(spec, self._params(spec, spec.channels(fine.feats)), fine, coarse)


class UpConv(SparseConv):
  """Transposed conv from a coarse level back to its fine level, through
  ``coarse.maps["up"]`` (the down map's transpose: no second search). Returns ``fine``
  with the new features."""
  kernel_size: int | Sequence[int] = 2
  _op = "up"

  @nn.compact
  def __call__(self, coarse: SparseTensor, fine: SparseTensor) -> SparseTensor:
    spec = self._spec()
    return level_call(spec, self._params(spec, spec.channels(coarse.feats)), coarse, fine)


# ------------------------------------------------------- spconv's layers


class SubMConv3d(_Params, nn.Module):
  """spconv's ``SubMConv3d``: a submanifold conv on a level (outputs = inputs), the map
  kept in the level under ``indice_key`` and reused by the layers with the same key.

  Per-axis arguments and the kernel's leading axes follow the level's
  :attr:`~jax_sparseconv.SparseTensor.axis_order` (spconv's index columns ``d0, d1, d2``):
  spconv's weight ``(Cout, k0, k1, k2, Cin)`` is ``kernel = weight.permute(1, 2, 3, 4, 0)``
  here for either order. As in spconv, ``stride`` and ``padding`` are accepted and
  ignored (the window is centred: ``o + (k - K // 2) * d``).

  Example usage::

    >>> import jax, jax.numpy as jnp, jax_sparseconv as sc
    >>> from jax_sparseconv.linen import SubMConv3d
    >>> idx = jnp.array([[0, 0, 1, 2], [0, 0, 1, 3], [1, 3, 0, 0]])  # [b, z, y, x]
    >>> t = sc.SparseTensor.from_indices(idx, jnp.ones((3, 4)), [4, 5, 6], 2)
    >>> layer = SubMConv3d(4, 16, 3, indice_key="subm1")
    >>> variables = layer.init(jax.random.key(0), t)
    >>> y = layer.apply(variables, t)
    >>> y.feats.shape, sorted(y.maps)
    ((3, 16), ['subm1'])

  Attributes:
    in_channels: input channels (checked), or None (inferred).
    out_channels: output channels.
    kernel_size: int or 3 ints in the level's index order.
    stride: int or 3 ints (ignored by the submanifold conv, as in spconv).
    padding: int or 3 ints (ignored by the submanifold conv, as in spconv).
    dilation: int or 3 ints.
    groups: grouped conv (``in_channels`` = groups: depthwise).
    bias: add a bias (default True).
    indice_key: the key of the map in the level (spconv's); None: one per geometry.
    dtype: the computation dtype (None: the inputs').
    param_dtype: the parameters' dtype.
    kernel_init: default spconv's (uniform in +-1/sqrt(fan_in)).
    bias_init: default zeros.
  """
  in_channels: int | None
  out_channels: int
  kernel_size: int | Sequence[int] = 3
  stride: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  dilation: int | Sequence[int] = 1
  groups: int = 1
  bias: bool = True
  indice_key: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = spconv_init
  bias_init: Callable = nn.initializers.zeros_init()

  _op = "spconv_subm"

  def _spec(self) -> ConvSpec:
    return ConvSpec(type(self).__name__, self._op, self.out_channels, self.kernel_size,
                    self.in_channels, self.bias, self.groups, dtype=self.dtype,
                    stride=self.stride, padding=self.padding, dilation=self.dilation,
                    key=self.indice_key, capacity=getattr(self, "capacity", None))

  @nn.compact
  def __call__(self, x: SparseTensor) -> SparseTensor:
    spec = self._spec()
    return level_call(spec, self._params(spec, spec.channels(x.feats)), x)


class SparseConv3d(SubMConv3d):
  """spconv's ``SparseConv3d``: a regular conv that generates its output level (every
  voxel ``o`` with an input at ``o*s - p + k*d``, clipped to the level's grid), the map
  kept in the new level under ``indice_key`` (for :class:`SparseInverseConv3d`).
  Attributes as :class:`SubMConv3d`, plus ``capacity`` (static rows of the new level;
  see :meth:`jax_sparseconv.SparseTensor.conv`)."""
  capacity: int | None = None
  _op = "spconv_conv"


class SparseConvTranspose3d(SparseConv3d):
  """spconv's ``SparseConvTranspose3d``: the generative transposed conv (input ``i`` writes
  ``i*s - p + k*d`` for every ``k``), a new level. Attributes as :class:`SparseConv3d`."""
  _op = "spconv_transpose"


class SparseInverseConv3d(SubMConv3d):
  """spconv's ``SparseInverseConv3d``: back to the level that the conv under
  ``indice_key`` started from (its voxels in their order; rows that conv dropped get
  exactly the bias), through that conv's map transposed, slot ``k`` reading slot ``k``.
  ``kernel_size`` must be the conv's; ``stride``/``padding``/``dilation`` are its."""
  _op = "spconv_inverse"


class _Pool(nn.Module):
  kernel_size: int | Sequence[int] = 2
  stride: int | Sequence[int] | None = None
  padding: int | Sequence[int] = 0
  dilation: int | Sequence[int] = 1
  indice_key: str | None = None
  capacity: int | None = None

  _mode = "max"

  def __call__(self, x: SparseTensor) -> SparseTensor:
    return pooling.level_pool(self._mode, x, self.kernel_size, self.stride, self.padding,
                              self.dilation, key=self.indice_key, capacity=self.capacity)


class SparseMaxPool3d(_Pool):
  """spconv's ``SparseMaxPool3d`` on a level (:func:`jax_sparseconv.pooling.level_pool`):
  the output level of the regular conv rule, the maximum over each window's voxels
  (negative maxima kept, unlike spconv's CPU build). Attributes in the level's index
  order; ``stride`` defaults to ``kernel_size``."""


class SparseAvgPool3d(_Pool):
  """spconv's ``SparseAvgPool3d``: as :class:`SparseMaxPool3d`, the mean over each window's
  voxels (divided by the number present)."""
  _mode = "avg"
