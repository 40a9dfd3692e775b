"""The public ops: Open3D's sparse convolution and transposed convolution.

Argument checks, the kernel map (built here unless given), then one compiled program:
importance and normalisation around one primitive, :func:`gather_matmul.gather_matmul`
(``y[m] = sum_s x[neighbors[m, s]] @ W[cell[s]]``, a zero row for the sentinel), bias,
activation, the padding mask and the error poison. ``jit``, ``vmap``, ``grad``, ``jvp``
and higher derivatives work with respect to features, kernel, bias and importance
(positions are integer-quantised and get no gradient).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, errors
from .errors import ErrorCode
from .gather_matmul import gather_matmul
from .kernel_map import KernelMap, float_map


def _unpack_params(params, feats, transpose, groups):
  name = "sparse_conv_transpose" if transpose else "sparse_conv"
  if not isinstance(params, Mapping) or "kernel" not in params:
    raise TypeError("params must be a mapping with a 'kernel' entry (and optionally 'bias')")
  extra = set(params) - {"kernel", "bias"}
  if extra:
    raise ValueError(f"params has unknown entries {sorted(extra)}; expected 'kernel' and 'bias'")
  kernel = checks.check_float_array("params['kernel']", params["kernel"], 5)
  bias = params.get("bias")
  if bias is not None:
    bias = checks.check_float_array("params['bias']", bias, 1)
    if bias.shape != (kernel.shape[4],):
      raise ValueError(f"params['bias'] must have shape ({kernel.shape[4]},) to match kernel "
                       f"{kernel.shape}, got {bias.shape}")
  cin, cout = feats.shape[1], kernel.shape[4]
  if groups == 1 and cin != kernel.shape[3]:
    raise ValueError(f"{name}: feats has {cin} channels but the kernel {kernel.shape} "
                     f"(Kz, Ky, Kx, Cin, Cout) expects Cin={kernel.shape[3]}")
  if groups != 1 and (cin % groups or cout % groups or kernel.shape[3] * groups != cin):
    raise ValueError(f"{name}: groups={groups} needs Cin and Cout divisible by it and a kernel "
                     f"(Kz, Ky, Kx, Cin // groups, Cout); feats has {cin} channels, kernel "
                     f"{kernel.shape}")
  return kernel, bias


def _check_groups(groups) -> int:
  if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)) or groups < 1:
    raise ValueError(f"groups must be a positive int, got {groups!r}")
  return int(groups)


def _check_importance(name, imp, n):
  if imp is None:
    return None
  imp = checks.check_float_array(name, imp, 1)
  if imp.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},), got {imp.shape}")
  return imp


def _check_map(km, ks, offset, transpose, num_in):
  """A given kernel map against the kernel and the features it is used with."""
  if not isinstance(km, KernelMap):
    raise TypeError(f"kernel_map must be a KernelMap, got {type(km).__name__}")
  if km.transpose != transpose:
    want = "transpose=True" if transpose else "transpose=False"
    raise ValueError(f"kernel_map was built with transpose={km.transpose}; "
                     f"build it with {want} for this function")
  if km.kernel_size != ks:
    raise ValueError(f"kernel_map was built for kernel_size {km.kernel_size} but the kernel "
                     f"has shape {ks} (Kz, Ky, Kx) in front")
  if offset is not None and checks.normalize_offset(offset, ks) != km.offset:
    raise ValueError(f"offset {offset} differs from the kernel_map's {km.offset}")
  if km.num_in != num_in:
    raise ValueError(f"kernel_map is for {km.num_in} inputs but feats has {num_in} rows")


def _prepare(params, feats, in_pos, out_pos, voxel_size, offset, kernel_map, transpose, groups):
  """Argument checks (each once), and the kernel map (built unless given)."""
  feats = checks.check_float_array("feats", feats, 2)
  groups = _check_groups(groups)
  kernel, bias = _unpack_params(params, feats, transpose, groups)
  ks = tuple(kernel.shape[:3])
  given = [a is not None for a in (in_pos, out_pos, voxel_size)]
  if not any(given):  # a kernel map alone (the level layers)
    if kernel_map is None:
      raise ValueError("give in_pos, out_pos and voxel_size, or a kernel_map (or both)")
    _check_map(kernel_map, ks, offset, transpose, feats.shape[0])
    return feats, kernel_map, kernel, bias, groups
  if not all(given):
    raise ValueError("give all of in_pos, out_pos and voxel_size, or none of them (with a "
                     "kernel_map)")
  in_pos = checks.check_positions("in_pos", in_pos)
  out_pos = checks.check_positions("out_pos", out_pos)
  if feats.shape[0] != in_pos.shape[0]:
    raise ValueError(f"feats has {feats.shape[0]} rows but in_pos has {in_pos.shape[0]} "
                     f"(shapes {feats.shape} and {in_pos.shape})")
  checks.check_voxel_size(voxel_size)
  if kernel_map is None:
    km = float_map(in_pos, out_pos, voxel_size, ks, offset=offset, transpose=transpose)
    return feats, km, kernel, bias, groups
  _check_map(kernel_map, ks, offset, transpose, feats.shape[0])
  if kernel_map.num_out != out_pos.shape[0]:
    raise ValueError(f"kernel_map is for {kernel_map.num_in} inputs and {kernel_map.num_out} "
                     f"outputs, got in_pos {in_pos.shape} and out_pos {out_pos.shape}")
  return feats, _check_voxel_size_matches(kernel_map, voxel_size), kernel, bias, groups


def _check_voxel_size_matches(km, voxel_size):
  """A map used with another voxel size than it was built with is an error (it would
  silently change which neighbours exist): raised now when both are concrete, else
  added to the map's flags (``MAP_MISMATCH``) under the error rule."""
  vs = jnp.asarray(voxel_size, jnp.float32)
  differs = jnp.abs(vs - km.voxel_size) > 1e-6 * jnp.abs(km.voxel_size)
  if checks.is_concrete(differs) and checks.is_concrete(km.voxel_size):
    if bool(differs):
      raise ValueError(f"voxel_size {float(vs)} differs from the {float(km.voxel_size)} the "
                       "kernel_map was built with")
    return km
  flags = km.flags | errors.bit(differs, ErrorCode.MAP_MISMATCH)
  errors.report(flags, "sparse_conv")
  return dataclasses.replace(km, flags=flags)


@functools.partial(jax.jit, static_argnames=("normalize", "activation", "transpose"))
def _conv(kernel, bias, feats, importance, km, *, normalize, activation, transpose):
  """Both ops after argument checks, as one compiled program (groups: the kernel's
  ``Cin`` is ``feats``' divided by them)."""
  dtype = jnp.result_type(feats.dtype, kernel.dtype)
  w = kernel.reshape(int(np.prod(kernel.shape[:3])), *kernel.shape[3:])  # -1 fails for C = 0
  if km.slot_cells != tuple(range(w.shape[0])):  # unusual offsets: slots share or skip cells
    w = w[np.asarray(km.slot_cells, np.int32)]
  x = feats
  if not transpose and importance is not None:
    x = feats * importance[:, None].astype(feats.dtype)
  if transpose and normalize:
    x = feats / jnp.maximum(km.input_counts(), 1)[:, None].astype(feats.dtype)
  if w.shape[1] and w.shape[2]:
    y = gather_matmul(x, w, km.neighbors, km.inverse, km.out_unique, dtype)
  else:  # no input or no output channels: nothing to gather (the kernels need C >= 1)
    y = jnp.zeros((km.num_out, w.shape[2]), dtype)
  if not transpose and normalize:
    y = y / jnp.maximum(km.neighbor_counts(), 1)[:, None].astype(y.dtype)
  if transpose and importance is not None:
    y = y * importance[:, None].astype(y.dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  if activation is not None:
    y = activation(y)
  y = jnp.where(km.out_mask[:, None], y, jnp.zeros((), y.dtype))
  # Under jit an invalid map cannot raise here: poison the result (errors.py).
  return errors.poison(y, km.flags)


def conv(params, feats, in_pos=None, out_pos=None, voxel_size=None, *, transpose=False,
         offset=None, normalize=False, importance=None, kernel_map=None, activation=None,
         groups=1):
  """:func:`sparse_conv` (``transpose=False``, ``importance`` the inputs') or
  :func:`sparse_conv_transpose` (``transpose=True``, ``importance`` the outputs'): the one
  entry point of both, for the layers."""
  feats, km, kernel, bias, _ = _prepare(params, feats, in_pos, out_pos, voxel_size, offset,
                                        kernel_map, bool(transpose), groups)
  name = "out_importance" if transpose else "inp_importance"
  imp = _check_importance(name, importance, km.num_out if transpose else feats.shape[0])
  return _conv(kernel, bias, feats, imp, km, normalize=bool(normalize), activation=activation,
               transpose=bool(transpose))


def sparse_conv(params, feats, in_pos=None, out_pos=None, voxel_size=None, *, offset=None,
                normalize=False, inp_importance=None, kernel_map=None, activation=None,
                groups=1):
  """Open3D-ML's ``SparseConv``, as a pure function.

  For each output point ``m``::

      y[m] = s[m] * sum_{n in N(m)} imp[n] * feats[n] @ kernel[cell(n, m)] + bias

  where ``N(m)`` are the inputs in the kernel's window around ``out_pos[m]``
  (offset by ``-offset * voxel_size``), ``cell`` follows Open3D's rounding, and
  ``s[m] = 1 / |N(m)|`` when ``normalize`` (1 for outputs without neighbours, which
  therefore get exactly ``bias``). On a regular grid this equals a dense
  ``padding='same'`` convolution read at the output voxels.

  Args:
    params: ``{"kernel": (Kz, Ky, Kx, Cin // groups, Cout), "bias": (Cout,)}``, bias
      optional. Open3D's layout: the first kernel axis is z. Non-cubic kernels are allowed.
    feats: ``(num_in, Cin)`` input features (float32/float64/bfloat16/float16; half
      types accumulate in float32).
    in_pos: ``(num_in, 3)`` input positions ``[x, y, z]``.
    out_pos: ``(num_out, 3)`` output positions on the same lattice.
    voxel_size: positive scalar. ``in_pos``, ``out_pos`` and ``voxel_size`` may all be
      left out when ``kernel_map`` is given (it holds the neighbours).
    offset: static ``[x, y, z]`` offset in voxels; default 0 (odd K) / -0.5 (even K).
    normalize: divide each output by its number of neighbours.
    inp_importance: optional ``(num_in,)`` weights multiplying the input features.
    kernel_map: optional :class:`KernelMap` from :func:`build_kernel_map` (with the
      same points, kernel size and offset) or a :class:`SparseTensor` level. Required
      for padded point sets or packed batches: validity and batch indices are given
      when building it.
    activation: optional callable applied to the result.
    groups: grouped conv (static): the channels split into ``groups`` groups, group
      ``g``'s outputs reading only group ``g``'s inputs (``groups = Cin``: depthwise).

  Returns:
    ``(num_out, Cout)`` output features, dtype ``result_type(feats, kernel)``.

  >>> import jax, jax.numpy as jnp
  >>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5]])
  >>> params = {"kernel": jnp.ones((3, 3, 3, 2, 4)), "bias": jnp.zeros(4)}
  >>> sparse_conv(params, jnp.ones((2, 2)), pos, pos, 1.0).tolist()[0]
  [4.0, 4.0, 4.0, 4.0]
  """
  return conv(params, feats, in_pos, out_pos, voxel_size, transpose=False, offset=offset,
              normalize=normalize, importance=inp_importance, kernel_map=kernel_map,
              activation=activation, groups=groups)


def sparse_conv_transpose(params, feats, in_pos=None, out_pos=None, voxel_size=None, *,
                          offset=None, normalize=False, out_importance=None, kernel_map=None,
                          activation=None, groups=1):
  """Open3D-ML's ``SparseConvTranspose``, as a pure function.

  Each input ``n`` spreads ``t[n] * feats[n] @ kernel[cell]`` to the outputs ``M(n)``
  in the kernel's window around ``in_pos[n] - offset * voxel_size``, with the
  relative position reversed (``d = out_pos - in_pos``)::

      y[m] = out_importance[m] * sum_{n : m in M(n)} t[n] * feats[n] @ kernel[cell] + bias

  where ``t[n] = 1 / |M(n)|`` when ``normalize`` (and ``|M(n)| > 0``), else 1. It is
  the adjoint of :func:`sparse_conv` from the output set to the input set.

  Args: as :func:`sparse_conv`, with ``out_importance`` ``(num_out,)`` in place of
  ``inp_importance``; a given ``kernel_map`` must be built with ``transpose=True``.

  Returns:
    ``(num_out, Cout)`` output features.

  >>> import jax.numpy as jnp
  >>> coarse = jnp.array([[0.5, 0.5, 0.5]])
  >>> fine = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
  >>> params = {"kernel": jnp.ones((2, 2, 2, 1, 1))}
  >>> sparse_conv_transpose(params, jnp.ones((1, 1)), coarse, fine, 1.0).ravel().tolist()
  [1.0, 1.0, 0.0]
  """
  return conv(params, feats, in_pos, out_pos, voxel_size, transpose=True, offset=offset,
              normalize=normalize, importance=out_importance, kernel_map=kernel_map,
              activation=activation, groups=groups)
