"""Sharded operands for our primitives and FFI calls: varying manual axes (``jax.shard_map``
with ``check_vma=True``), then sharding in types (Explicit mesh axes, below).

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
  # Replicated, on the operands' mesh (the context mesh under sharding in types).
  sharding = like.sharding.update(spec=P())
  if mat is None or mat.empty:
    return jax.core.ShapedArray(shape, dtype, sharding=sharding)
  return jax.core.ShapedArray(shape, dtype, sharding=sharding, manual_axis_type=mat)


def result(like, shape, dtype) -> jax.ShapeDtypeStruct:
  """An ``ffi_call`` result type of ``shape``/``dtype`` varying like the array ``like``."""
  like = jax.typeof(like)
  mat = _mat(like)
  if mat is None or mat.empty:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=like.sharding.update(spec=P()),
                              manual_axis_type=mat)


# ------------------------------------------------------------------ sharding in types
# Under a mesh with *Explicit* axes (jax's default for ``jax.make_mesh`` since 0.7, used
# with ``jax.set_mesh``) an array's type says how it is sharded. jnp operations propagate
# that type; custom calls and our primitives cannot (a kernel map's search, a gather by
# neighbour index, are not elementwise in the batch). The rule, one for every op of the
# search and the conv:
#
# * vmapped over a batch axis that is sharded over Explicit mesh axes, an op runs per
#   shard: :func:`per_shard` wraps its batched version in ``jax.shard_map`` over those
#   axes (each device handles its clouds; results are sharded like the batch);
# * an operand sharded over Explicit axes along any other axis (the points of a packed
#   batch, say) is resharded to replicated first (:func:`replicated`): a search or a
#   gather by index needs all the rows.
#
# Under Auto axes the types carry no sharding and XLA's partitioner decides; inside
# ``jax.shard_map`` the axes are manual (the varying-axes rule above).


def _explicit_names(aval) -> frozenset:
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return frozenset()
  return frozenset(name for name, t in zip(mesh.axis_names, mesh.axis_types)
                   if t == jax.sharding.AxisType.Explicit)


def explicit_axes(x, dim: int | None = None) -> tuple:
  """The Explicit mesh axes over which ``x`` is sharded (along ``dim``, or any axis), in
  its type; ``()`` outside an Explicit mesh context."""
  aval = jax.typeof(x)
  explicit = _explicit_names(aval)
  if not explicit:
    return ()
  spec = aval.sharding.spec
  entries = spec if dim is None else (spec[dim] if dim < len(spec) else None,)
  names = []
  for entry in entries:
    for name in (entry if isinstance(entry, tuple) else (entry,)):
      if name in explicit and name not in names:
        names.append(name)
  return tuple(names)


def replicated(*xs):
  """``xs`` (arrays or ``None``), each resharded to replicated where its type says it is
  sharded over Explicit mesh axes; otherwise unchanged."""
  out = []
  for x in xs:
    if x is not None and explicit_axes(x):
      aval = jax.typeof(x)
      x = jax.sharding.reshard(x, aval.sharding.update(spec=P()))
    out.append(x)
  return tuple(out)


def batch_axes(args, dims) -> tuple:
  """The Explicit mesh axes over which the batch axis of a batching rule's operands is
  sharded (``()`` when it is not)."""
  for a, d in zip(args, dims):
    if d is not None and a is not None:
      axes = explicit_axes(a, d)
      if axes:
        return axes
  return ()


def per_shard(batched_fn, axes, args, dims):
  """``batched_fn(*args)`` (a function of batched operands, batch axes ``dims``, whose
  results all have their batch axis first) run per shard: ``jax.shard_map`` over the
  Explicit mesh ``axes`` that shard the batch. Unbatched operands are replicated;
  ``None`` operands pass through."""
  names = axes if len(axes) > 1 else axes[0]
  present = [i for i, a in enumerate(args) if a is not None]
  operands = [args[i] if dims[i] is not None else replicated(args[i])[0] for i in present]
  specs = tuple(P() if dims[i] is None else P(*([None] * dims[i]), names) for i in present)
  mesh = jax.typeof(next(args[i] for i in present if dims[i] is not None)).sharding.mesh

  def local(*operands):
    full = list(args)
    for i, a in zip(present, operands):
      full[i] = a
    return batched_fn(*full)

  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(names),
                       axis_names=frozenset(axes))(*operands)


def vmap_per_shard(fn):
  """``fn`` (of arrays or ``None``s; every result batched under ``vmap``) whose ``vmap``
  runs per shard (:func:`per_shard`) when the batch axis is sharded over Explicit mesh
  axes, and as a plain ``vmap`` of ``fn`` otherwise. Not for differentiable operands:
  ``jax.custom_batching.custom_vmap`` has no transpose (give it integers, or apply
  ``stop_gradient`` first)."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    del axis_size
    flat, tree = jax.tree.flatten(args)
    dims = [0 if b else None for b in jax.tree.leaves(in_batched)]
    assert len(dims) == len(flat)

    def batched(*flat):
      return jax.vmap(lambda *fl: fn(*jax.tree.unflatten(tree, fl)), in_axes=dims)(*flat)

    axes = batch_axes(flat, dims)
    out = per_shard(batched, axes, flat, dims) if axes else batched(*flat)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped
