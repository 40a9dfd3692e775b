"""Argument checks shared by the public functions.

Everything here runs at trace time on static information (shapes, dtypes, Python
values) and raises at once. Checks that need array values (NaN positions, a traced
voxel size) follow the error rule of ``errors.py`` instead.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """True when ``x`` holds a value now (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_float_array(name: str, x, ndim: int | None = None):
  """Returns ``jnp.asarray(x)``; raises if it is not a floating array of rank ``ndim``."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype} shape {x.shape}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")
  return x


def check_positions(name: str, pos):
  """Positions: float32 or float64 array of shape ``(n, 3)`` holding ``[x, y, z]``
  (half precision cannot hold lattice coordinates: 11 significant bits put a point
  of a 0.05 m grid at 10 m a tenth of a voxel off)."""
  pos = check_float_array(name, pos, 2)
  if pos.shape[1] != 3:
    raise ValueError(f"{name} must have shape (num_points, 3), got {pos.shape}")
  if jnp.finfo(pos.dtype).bits < 32:
    raise TypeError(f"{name} must be float32 or float64 positions, got dtype {pos.dtype} shape "
                    f"{pos.shape} (half precision cannot hold lattice coordinates)")
  return pos


def check_voxel_size(voxel_size):
  """``voxel_size`` must be a positive, finite scalar (checked now when concrete)."""
  if isinstance(voxel_size, (bool, np.bool_)) or not (
      isinstance(voxel_size, numbers.Real) or hasattr(voxel_size, "shape")):
    raise TypeError(f"voxel_size must be a real scalar, got {type(voxel_size).__name__}")
  if np.ndim(voxel_size) != 0:
    raise ValueError(f"voxel_size must be a scalar, got shape {np.shape(voxel_size)}")
  if is_concrete(voxel_size):
    v = float(np.asarray(voxel_size))
    if not (np.isfinite(v) and v > 0):
      raise ValueError(f"voxel_size must be positive and finite, got {v}")
  return voxel_size


def normalize_kernel_size(kernel_size) -> tuple[int, int, int]:
  """An int ``K`` or a 3-sequence in kernel-array order ``(Kz, Ky, Kx)``."""
  if isinstance(kernel_size, numbers.Integral):
    ks = (int(kernel_size),) * 3
  else:
    ks = tuple(kernel_size)
    if len(ks) != 3 or not all(isinstance(k, numbers.Integral) for k in ks):
      raise ValueError(f"kernel_size must be an int or 3 ints (Kz, Ky, Kx), got {kernel_size!r}")
    ks = tuple(int(k) for k in ks)
  if min(ks) < 1:
    raise ValueError(f"kernel_size entries must be >= 1, got {ks}")
  return ks


def default_offset(kernel_size) -> tuple[float, float, float]:
  """Open3D's default offset in position order ``[x, y, z]``: 0 for odd, -0.5 for even K."""
  kz, ky, kx = kernel_size
  return tuple(0.0 if k % 2 else -0.5 for k in (kx, ky, kz))


def normalize_offset(offset, kernel_size) -> tuple[float, float, float]:
  """``None`` (Open3D's default) or a static 3-vector ``[x, y, z]`` in voxel units."""
  if offset is None:
    return default_offset(kernel_size)
  if not is_concrete(offset):
    raise ValueError(
        "offset must be static (a Python sequence or NumPy array), not a traced value: "
        "it decides which voxel offsets the kernel map searches")
  off = np.asarray(offset, dtype=np.float64)
  if off.shape != (3,):
    raise ValueError(f"offset must have shape (3,) ([x, y, z]), got {off.shape}")
  if not np.all(np.isfinite(off)):
    raise ValueError(f"offset must be finite, got {off.tolist()}")
  return tuple(float(o) for o in off)


def check_batch(name: str, batch, n: int):
  """Packed-batch ids: integer array of shape ``(n,)``."""
  batch = jnp.asarray(batch)
  if not jnp.issubdtype(batch.dtype, jnp.integer) or batch.shape != (n,):
    raise ValueError(
        f"{name} must be an integer array of shape ({n},), got dtype {batch.dtype} shape {batch.shape}")
  return batch.astype(jnp.int32)


def check_factor(factor) -> int:
  """A static, positive integer factor (``True`` is not one)."""
  if isinstance(factor, (bool, np.bool_)) or not isinstance(factor, numbers.Integral) or factor < 1:
    raise ValueError(f"factor must be a positive int, got {factor!r}")
  return int(factor)


def check_capacity(capacity) -> int:
  """A static, non-negative row count."""
  if isinstance(capacity, (bool, np.bool_)) or not isinstance(capacity, numbers.Integral):
    raise TypeError(f"capacity must be a static int (it sets the result's shape), got "
                    f"{type(capacity).__name__}")
  if capacity < 0:
    raise ValueError(f"capacity must be >= 0, got {capacity}")
  return int(capacity)


def valid_mask(valid, shape, name: str = "valid"):
  """Validity of padded rows as a bool mask of ``shape``: ``(n,)`` for one set, ``(B, n)``
  for a batch. ``valid`` is ``None`` (all rows), an integer count per set (shape
  ``shape[:-1]``: the first rows are valid), or a bool mask of ``shape``."""
  shape = tuple(shape)
  if valid is None:
    return jnp.ones(shape, bool)
  valid = jnp.asarray(valid)
  counts = shape[:-1]
  if valid.shape == counts and valid.dtype != jnp.bool_:
    if not jnp.issubdtype(valid.dtype, jnp.integer):
      raise TypeError(f"{name} as a count must be an integer, got dtype {valid.dtype}")
    return jnp.arange(shape[-1], dtype=jnp.int32) < valid[..., None]
  if valid.shape != shape or valid.dtype != jnp.bool_:
    what = "an integer count" if not counts else f"integer counts of shape {counts}"
    raise ValueError(f"{name} must be {what} or a bool mask of shape {shape}, "
                     f"got dtype {valid.dtype} shape {valid.shape}")
  return valid


def check_layer_params(layer: str, params, shapes: dict):
  """The parameters a layer was given (``apply``'s variables, or NNX attributes) against
  the ``shapes`` it creates: missing or extra entries, non-float dtypes and other shapes
  raise now, naming the entry and its shape (instead of a silent cast or Flax's error)."""
  params = dict(params)
  missing = [k for k in shapes if params.get(k) is None]
  if missing:
    raise ValueError(f"{layer}: params has no entry {missing[0]!r} (expected {sorted(shapes)})")
  extra = sorted(set(params) - set(shapes))
  if extra:
    raise ValueError(f"{layer}: params has unknown entries {extra}; expected {sorted(shapes)}")
  for k, want in shapes.items():
    v = params[k]
    dtype, shape = jnp.result_type(v), tuple(np.shape(v))
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{layer}: params[{k!r}] must be floating-point, got dtype {dtype} "
                      f"shape {shape}")
    if shape != tuple(want):
      raise ValueError(f"{layer}: params[{k!r}] must have shape {tuple(want)}, got {shape}")
