"""The conv's two inner ops as primitives, with their differentiation rules.

* ``sparse_gather_matmul``: ``y[m] = sum_s x[nbr[m, s]] @ w[s]`` (the forward pass).
* ``sparse_weight_grad``: ``dw[s] = sum_m x[nbr[m, s]]^T ct[m]`` (the weight gradient).

Each has one section below, in the order of jax's ``experimental/sparse/coo.py``:
public function, jnp implementation, abstract evaluation, lowering, JVP, transpose and
batching rules.

Why primitives: autodiff of a gather is a scatter-add, slow on CPU and
nondeterministic on GPU. Both ops are bilinear. The transpose of the gather-matmul
with respect to ``x`` is the same op over the *inverse* map (``inv[n, s]`` = the output
that reads input ``n`` at slot ``s``) with ``w`` transposed: a gather again. Its
transpose with respect to ``w`` is the weight gradient, whose own transposes are
gather-matmuls. Primitives with JVP and transpose rules keep forward mode and every
higher derivative. The inverse exists when no two outputs read the same input
through the same slot, i.e. when output positions are unique (``unique``); otherwise
the feature cotangent falls back to the scatter-add of autodiff (:func:`_x_cotangent`).

Both primitives lower through ``backend.dispatch``: the jnp implementation, or on the
platforms that have them the compiled kernels of ``ffi/`` (XLA FFI).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import backend, ffi, sharding

#: Memory budget of one gathered chunk, in bytes (rows * slots * Cin * itemsize).
CHUNK_BYTES = 16 * 2**20
#: Bounds on the number of output rows in one chunk.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 8192
# Full float32 matmuls on GPUs too (their default is TF32, ~1e-3 relative error).
_EXACT = jax.lax.Precision.HIGHEST

# ------------------------------------------------------------------ shared helpers


def chunk_rows(num_slots: int, in_channels: int, itemsize: int) -> int:
  """Outputs per chunk: the largest power of two with the gather under ``CHUNK_BYTES``."""
  per_row = max(1, num_slots * in_channels * itemsize)
  rows = 1 << max(0, int(np.floor(np.log2(max(1, CHUNK_BYTES // per_row)))))
  return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows)))


def accum_dtype(dtype):
  """float32 for half types, else the type itself."""
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def _is_f32(*dtypes):
  return all(jnp.dtype(t) == jnp.float32 for t in dtypes)


def _chunks(nbr, rows, sentinel):
  """``nbr`` padded with sentinel rows and split into ``(num_chunks, rows, S)``."""
  m, s = nbr.shape
  nchunks = -(-m // rows)
  padded = jnp.pad(nbr, ((0, nchunks * rows - m), (0, 0)), constant_values=sentinel)
  return padded.reshape(nchunks, rows, s)


def _gather_rows(x_padded, idx):
  """``x_padded[idx]`` flattened to ``(len(idx), S * Cin)``. ``take(mode="clip")``:
  indices are in bounds by construction, and XLA's CPU gather is ~3x faster without
  the bounds handling that ``x[idx]`` adds."""
  return jnp.take(x_padded, idx, axis=0, mode="clip").reshape(idx.shape[0], -1)


def _with_zero_row(x):
  """``x`` with a zero row appended: the sentinel index reads it."""
  return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])


def _x_cotangent(x_aval, rows, kernel, nbr, inv, unique, jnp_op, backend_name):
  """Cotangent of the gathered operand ``x`` of an op that reads ``x[nbr]``:
  ``x_bar[n] = sum_s rows[inv[n, s]] @ kernel[s]^T`` through the inverse map (a gather,
  deterministic) when it is exact, else the scatter-add of autodiff through
  ``jnp_op(x) -> rows-shaped``, whose cotangent ``rows`` is."""
  kernel_t = transpose_kernel(kernel, x_aval.shape[1] // max(kernel.shape[1], 1))

  def by_gather(rows):  # both branches vary like `rows` (shard_map)
    return sharding.match(gather_matmul(rows, kernel_t, inv, nbr, unique, x_aval.dtype, backend_name),
                     rows)[0]

  def by_scatter(rows):
    # The primal point varies like `rows`: the vjp of an invariant one would psum it.
    x0 = sharding.match(jnp.zeros(x_aval.shape, x_aval.dtype), rows)[0]
    x_bar = jax.vjp(jnp_op, x0)[1](rows)[0]
    return sharding.match(x_bar.astype(x_aval.dtype), rows)[0]

  return jax.lax.cond(unique, by_gather, by_scatter, rows)


def num_groups(cin: int, w) -> int:
  """The groups of a kernel ``w`` ``(S, Cin // G, Cout)`` for ``cin`` input channels."""
  return cin // w.shape[1] if w.shape[1] else 1


def transpose_kernel(w, groups: int):
  """The kernel of the transposed op: ``(S, Cin // G, Cout)`` -> ``(S, Cout // G, Cin)``,
  group by group (``swapaxes(w, 1, 2)`` for one group)."""
  if groups == 1:
    return jnp.swapaxes(w, 1, 2)
  s, cg, cout = w.shape
  return (w.reshape(s, cg, groups, cout // groups).transpose(0, 3, 2, 1)
          .reshape(s, cout // groups, groups * cg))


def _grouped_dot(rows, w, groups, acc):
  """``rows (m, S * Cin) @ w`` with ``w`` ``(S, Cin // G, Cout)`` acting group by group."""
  s, cg, cout = w.shape
  if groups == 1:
    return jnp.dot(rows, w.reshape(s * cg, cout), preferred_element_type=acc, precision=_EXACT)
  g = rows.reshape(rows.shape[0], s, groups, cg)
  y = jnp.einsum("msgc,scgo->mgo", g, w.reshape(s, cg, groups, cout // groups),
                 preferred_element_type=acc, precision=_EXACT)
  return y.reshape(rows.shape[0], cout)


def _zero_cotangents(a, b):
  return (ad.Zero(a.aval) if ad.is_undefined_primal(a) else None,
          ad.Zero(b.aval) if ad.is_undefined_primal(b) else None, None, None, None)


def _dispatch(jnp_impl, cuda_impl, cpu_impl, a, b, nbr, dtype, chosen, groups):
  """``backend.dispatch`` of one primitive's three implementations over ``(a, b, nbr)``
  under the backend the primitive was bound with; the native CPU kernels are float32 only;
  grouped convs have native CPU kernels (``cpu_impl`` is then the grouped one) and run as
  jnp elsewhere."""
  f32 = _is_f32(a.dtype, b.dtype, dtype)
  return backend.dispatch(jnp_impl, cuda_impl if groups == 1 else None, a, b, nbr,
                          cpu_fn=cpu_impl if f32 else None, backend=chosen)


def _register(prim, lowered, abstract_eval, static_names):
  """Implementation (jitted lowering) and lowering of a primitive from one function."""
  prim.def_impl(functools.partial(jax.jit, static_argnames=static_names)(lowered))
  prim.def_abstract_eval(abstract_eval)
  mlir.register_lowering(prim, mlir.lower_fun(lowered, multiple_results=False))


# ------------------------------------------------------------------ gather-matmul

gather_matmul_p = Primitive("sparse_gather_matmul")


def gather_matmul(x, w, nbr, inv, unique, out_dtype, backend_name=None):
  """``y[m] = sum_s x[nbr[m, s]] @ w[s]`` with sentinel ``len(x)`` reading zeros.

  Args:
    x: ``(N, Cin)``. w: ``(S, Cin, Cout)``.
    nbr: int32 ``(M, S)``, entries in ``[0, N]`` (``N`` = none).
    inv: int32 ``(N, S)``, the inverse map, entries in ``[0, M]`` (``M`` = none).
    unique: bool scalar, whether ``inv`` is an exact inverse of ``nbr``.
    out_dtype: result dtype (static); half types accumulate in float32.
    backend_name: the kernel backend to lower with (static; default: the one in effect,
      :func:`backend.get_kernel_backend`, read now so that a later lowering keeps it).

  Returns:
    ``(M, Cout)`` in ``out_dtype``.
  """
  return gather_matmul_p.bind(*sharding.match(*sharding.replicated(x, w, nbr, inv, unique)),
                              out_dtype=jnp.dtype(out_dtype),
                              backend_name=backend_name or backend.get_kernel_backend())


def gather_matmul_jnp(x, w, nbr, out_dtype):
  """The jnp implementation: gather a chunk of neighbour rows, one matmul per chunk."""
  m, s = nbr.shape
  cin, cout = x.shape[1], w.shape[2]
  groups = num_groups(cin, w)
  acc = accum_dtype(out_dtype)
  if m == 0 or s == 0 or cin == 0 or w.shape[1] == 0:
    return jnp.zeros((m, cout), out_dtype)
  xp = _with_zero_row(x)

  def block(idx):
    return _grouped_dot(_gather_rows(xp, idx), w, groups, acc)

  rows = chunk_rows(s, cin, jnp.dtype(x.dtype).itemsize)
  if m <= rows:
    return block(nbr).astype(out_dtype)
  y = jax.lax.map(block, _chunks(nbr, rows, x.shape[0]))
  return y.reshape(-1, cout)[:m].astype(out_dtype)


def _gm_abstract_eval(x, w, nbr, inv, unique, *, out_dtype, backend_name):
  (n, cin), (s, cin_w, cout), (m, s_nbr) = x.shape, w.shape, nbr.shape
  groups = cin // cin_w if cin_w else 1
  if (cin != cin_w * groups or cout % groups or s != s_nbr or inv.shape != (n, s)
      or unique.shape != ()):
    raise ValueError(f"gather_matmul: inconsistent shapes x {x.shape}, w {w.shape}, "
                     f"nbr {nbr.shape}, inv {inv.shape}, unique {unique.shape}")
  return sharding.aval(x, (m, cout), out_dtype)


def _gm_lowered(x, w, nbr, inv, unique, *, out_dtype, backend_name):
  del inv, unique  # for the transpose rules only
  groups = num_groups(x.shape[1], w)
  return _dispatch(functools.partial(gather_matmul_jnp, out_dtype=out_dtype),
                   functools.partial(ffi.gather_matmul, out_dtype=out_dtype),
                   ffi.cpu_gather_matmul if groups == 1 else ffi.cpu_grouped_gather_matmul,
                   x, w, nbr, out_dtype, backend_name, groups)


def _gm_jvp_x(dx, x, w, nbr, inv, unique, *, out_dtype, backend_name):
  return gather_matmul(dx, w, nbr, inv, unique, out_dtype, backend_name)


def _gm_jvp_w(dw, x, w, nbr, inv, unique, *, out_dtype, backend_name):
  return gather_matmul(x, dw, nbr, inv, unique, out_dtype, backend_name)


def _gm_transpose(ct, x, w, nbr, inv, unique, *, out_dtype, backend_name):
  if type(ct) is ad.Zero:
    return _zero_cotangents(x, w)
  if ad.is_undefined_primal(x):
    assert not ad.is_undefined_primal(w)
    x_bar = _x_cotangent(x.aval, ct, w, nbr, inv, unique,
                         lambda x_: gather_matmul_jnp(x_, w, nbr, out_dtype), backend_name)
    return x_bar, None, None, None, None
  groups = x.shape[1] // w.aval.shape[1] if w.aval.shape[1] else 1
  return (None, weight_grad(x, ct, nbr, inv, unique, w.aval.dtype, backend_name, groups), None,
          None, None)


def _gm_batch(args, dims, *, out_dtype, backend_name):
  """vmap: fold the batch into one big call (offset indices, per-batch sentinels); per
  shard when the batch axis is sharded over Explicit mesh axes (``sharding.py``)."""
  axes = sharding.batch_axes(args, dims)
  if axes:
    return sharding.per_shard(jax.vmap(functools.partial(gather_matmul, out_dtype=out_dtype,
                                                    backend_name=backend_name),
                                  in_axes=tuple(dims)), axes, args, dims), 0
  x, w, nbr, inv, unique = args
  if dims[1] is not None:  # batched kernels (rare): plain vmap of the jnp version
    return jax.vmap(lambda x, w, nbr, inv, unique: gather_matmul_jnp(x, w, nbr, out_dtype),
                    in_axes=dims)(*args), 0
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  x, nbr, inv = (batching.bdim_at_front(a, d, size) for a, d in zip((x, nbr, inv),
                                                                    (dims[0], dims[2], dims[3])))
  unique = jnp.all(batching.bdim_at_front(unique, dims[4], size))
  b, n, cin = x.shape
  m = nbr.shape[1]
  batch = jnp.arange(b, dtype=jnp.int32)[:, None, None]
  nbr_b = jnp.where(nbr == n, b * n, nbr + batch * n)  # sentinels -> the folded sentinel
  inv_b = jnp.where(inv == m, b * m, inv + batch * m)
  y = gather_matmul(x.reshape(b * n, cin), w, nbr_b.reshape(b * m, -1),
                    inv_b.reshape(b * n, -1), unique, out_dtype, backend_name)
  return y.reshape(b, m, -1), 0


_register(gather_matmul_p, _gm_lowered, _gm_abstract_eval, ("out_dtype", "backend_name"))
ad.defjvp(gather_matmul_p, _gm_jvp_x, _gm_jvp_w, None, None, None)
ad.primitive_transposes[gather_matmul_p] = _gm_transpose
batching.primitive_batchers[gather_matmul_p] = _gm_batch


# ------------------------------------------------------------------ weight gradient

weight_grad_p = Primitive("sparse_weight_grad")


def weight_grad(x, ct, nbr, inv, unique, w_dtype, backend_name=None, groups=1):
  """``dw[s] = sum_m x[nbr[m, s]]^T ct[m]``: ``(S, Cin // groups, Cout)`` in ``w_dtype``,
  group ``g``'s outputs pairing with group ``g``'s inputs (``backend_name`` as
  :func:`gather_matmul`)."""
  return weight_grad_p.bind(*sharding.match(*sharding.replicated(x, ct, nbr, inv, unique)),
                            w_dtype=jnp.dtype(w_dtype),
                            backend_name=backend_name or backend.get_kernel_backend(),
                            groups=int(groups))


def weight_grad_jnp(x, ct, nbr, w_dtype, groups=1):
  """The jnp implementation, accumulated chunk by chunk in a fixed order."""
  m, s = nbr.shape
  cin, cout = x.shape[1], ct.shape[1]
  cg = cin // groups
  acc = accum_dtype(jnp.result_type(x.dtype, ct.dtype))
  if m == 0 or s == 0 or cin == 0:
    return jnp.zeros((s, cg, cout), w_dtype)
  xp = _with_zero_row(x)

  def partial_grad(idx, ct_chunk):  # (Cout, S * Cin): ct^T g is faster on CPU than g^T ct
    rows = _gather_rows(xp, idx)
    if groups == 1:
      return jax.lax.dot_general(ct_chunk, rows, (((0,), (0,)), ((), ())),
                                 preferred_element_type=acc, precision=_EXACT)
    g = jnp.einsum("msgc,mgo->scgo", rows.reshape(-1, s, groups, cg),
                   ct_chunk.reshape(-1, groups, cout // groups),
                   preferred_element_type=acc, precision=_EXACT)
    return g.reshape(s * cg, cout).T

  rows = chunk_rows(s, cin, jnp.dtype(x.dtype).itemsize)
  if m <= rows:
    g = partial_grad(nbr, ct)
  else:
    idx = _chunks(nbr, rows, x.shape[0])
    cts = jnp.pad(ct, ((0, idx.shape[0] * rows - m), (0, 0))).reshape(idx.shape[0], rows, cout)
    g, _ = jax.lax.scan(lambda g, a: (g + partial_grad(*a), None),
                        jnp.zeros((cout, s * cg), acc), (idx, cts))
  return g.T.reshape(s, cg, cout).astype(w_dtype)


def _kg_abstract_eval(x, ct, nbr, inv, unique, *, w_dtype, backend_name, groups):
  (n, cin), (m, cout), (m_nbr, s) = x.shape, ct.shape, nbr.shape
  if m != m_nbr or inv.shape != (n, s) or cin % groups or cout % groups:
    raise ValueError(f"weight_grad: inconsistent shapes x {x.shape}, ct {ct.shape}, "
                     f"nbr {nbr.shape}, inv {inv.shape} (groups {groups})")
  return sharding.aval(x, (s, cin // groups, cout), w_dtype)


def _kg_lowered(x, ct, nbr, inv, unique, *, w_dtype, backend_name, groups):
  del inv, unique  # for the transpose rules only
  return _dispatch(functools.partial(weight_grad_jnp, w_dtype=w_dtype, groups=groups),
                   functools.partial(ffi.weight_grad, w_dtype=w_dtype),
                   ffi.cpu_weight_grad if groups == 1 else
                   functools.partial(ffi.cpu_grouped_weight_grad, groups=groups),
                   x, ct, nbr, w_dtype, backend_name, groups)


def _kg_jvp_x(dx, x, ct, nbr, inv, unique, *, w_dtype, backend_name, groups):
  return weight_grad(dx, ct, nbr, inv, unique, w_dtype, backend_name, groups)


def _kg_jvp_ct(dct, x, ct, nbr, inv, unique, *, w_dtype, backend_name, groups):
  return weight_grad(x, dct, nbr, inv, unique, w_dtype, backend_name, groups)


def _kg_transpose(g, x, ct, nbr, inv, unique, *, w_dtype, backend_name, groups):
  """Bilinear in (x, ct): each transpose is a gather-matmul with the cotangent ``g``
  of ``dw`` as the kernel."""
  if type(g) is ad.Zero:
    return _zero_cotangents(x, ct)
  if ad.is_undefined_primal(ct):  # ct_bar[m] = sum_s x[nbr[m, s]] @ g[s]
    return (None, gather_matmul(x, g, nbr, inv, unique, ct.aval.dtype, backend_name), None,
            None, None)
  # x_bar[n] = sum_s ct[inv[n, s]] @ g[s]^T
  x_bar = _x_cotangent(x.aval, ct, g, nbr, inv, unique,
                       lambda x_: gather_matmul_jnp(x_, g, nbr, ct.dtype), backend_name)
  return x_bar, None, None, None, None


def _kg_batch(args, dims, *, w_dtype, backend_name, groups):
  """vmap (per-example weight gradients): one primitive call per example, in turn; per
  shard when the batch axis is sharded over Explicit mesh axes (``sharding.py``)."""
  axes = sharding.batch_axes(args, dims)
  if axes:
    return sharding.per_shard(jax.vmap(functools.partial(weight_grad, w_dtype=w_dtype,
                                                    backend_name=backend_name, groups=groups),
                                  in_axes=tuple(dims)), axes, args, dims), 0
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [batching.bdim_at_front(a, d, size) if d is not None else
          jnp.broadcast_to(a, (size, *a.shape)) for a, d in zip(args, dims)]
  return jax.lax.map(lambda a: weight_grad(*a, w_dtype, backend_name, groups), tuple(args)), 0


_register(weight_grad_p, _kg_lowered, _kg_abstract_eval, ("w_dtype", "backend_name", "groups"))
ad.defjvp(weight_grad_p, _kg_jvp_x, _kg_jvp_ct, None, None, None)
ad.primitive_transposes[weight_grad_p] = _kg_transpose
batching.primitive_batchers[weight_grad_p] = _kg_batch
