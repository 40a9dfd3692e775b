"""Varying manual axes (``jax.shard_map`` with ``check_vma=True``) for our primitives and FFI calls.

Inside ``shard_map`` every value's type says over which mesh axes it varies. jnp
operations propagate that type; our primitives and ``ffi_call`` must do it themselves,
or the branches of ``platform_dependent`` disagree and, worse, autodiff loses the
reduction of a replicated operand's gradient. The rule here is the one of jax's own
binary ops: operands are cast to the union of their varying axes before the op
(:func:`match`: ``pcast(..., to="varying")``, whose transpose is the ``psum`` that sums a
replicated kernel's gradient over the devices exactly once), and results vary over that
union (:func:`aval` for abstract evaluation, :func:`result` for ``ffi_call`` results).
Outside ``shard_map`` all of this is the identity.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def _mat(aval):
  return getattr(aval, "manual_axis_type", None)


def varying(x) -> frozenset:
  """The mesh axes over which ``x`` varies (empty outside ``shard_map``)."""
  mat = _mat(jax.typeof(x))
  return frozenset(mat.varying) if mat is not None else frozenset()


def match(*xs):
  """``xs`` cast to vary over the union of their varying axes."""
  axes = [varying(x) for x in xs]
  union = frozenset().union(*axes)
  if not union:
    return xs
  return tuple(x if a == union else jax.lax.pcast(x, tuple(sorted(union - a)), to="varying")
               for x, a in zip(xs, axes))


def aval(like, shape, dtype) -> jax.core.ShapedArray:
  """An abstract value of ``shape``/``dtype`` varying like the abstract value ``like``."""
  mat = _mat(like)
  if mat is None or mat.empty:
    return jax.core.ShapedArray(shape, dtype)
  return jax.core.ShapedArray(shape, dtype, sharding=like.sharding.update(spec=P()),
                              manual_axis_type=mat)


def result(like, shape, dtype) -> jax.ShapeDtypeStruct:
  """An ``ffi_call`` result type of ``shape``/``dtype`` varying like the array ``like``."""
  like = jax.typeof(like)
  mat = _mat(like)
  if mat is None or mat.empty:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=like.sharding.update(spec=P()),
                              manual_axis_type=mat)
