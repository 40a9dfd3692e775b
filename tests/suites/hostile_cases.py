"""Hostile inputs: ONE declarative list of cases (issue 12).

Each :class:`Case` names a public function or layer (``group``, a column of the README
table), an input category (``category``, a row), how the input is made (``make``: returns
``(fn, args)``, the call being ``fn(*args)``; ``args`` are the arrays that become tracers
under ``jit``, everything static is closed over), and the expected outcome:

* :class:`Raises`: a ``ValueError`` / ``TypeError`` whose message contains ``match`` (the
  argument's name and its shape or dtype), at once outside ``jit`` and at trace time
  inside;
* :class:`Invalid`: a value error under the one rule of ``errors.py``: outside ``jit``
  ``InvalidInputError`` carrying the :class:`ErrorCode` bit; under ``jit`` in error mode
  ``"raise"`` a ``JaxRuntimeError`` carrying the message; in mode ``"flag"`` the bit in
  every ``KernelMap.flags`` of the result and NaN in every floating result;
* :class:`Ok`: a result, checked by ``check`` (e.g. the right empty shape, bias only).

``eager`` is the outcome outside ``jit``; ``jit`` (default: the same) inside, where a
static check may become a value error (a traced voxel size). ``tests/test_hostile.py``
runs every case both ways, and ``tests/scripts/hostile_table.py`` renders the README's
"Hostile inputs" table from the same list.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import pooling
from jax_sparseconv._src.morton import MAX_COORD

E = sc.ErrorCode


# ----------------------------------------------------------------------------- outcomes


@dataclasses.dataclass(frozen=True)
class Raises:
  """An exception at once (outside jit) or at trace time (inside)."""
  exc: type
  match: str

  @property
  def label(self) -> str:
    return self.exc.__name__


@dataclasses.dataclass(frozen=True)
class Invalid:
  """A value error under the one rule (``code`` None: a model-level error without bits)."""
  code: E | None
  match: str | None = None

  @property
  def message(self) -> str:
    return self.match if self.match is not None else self.code.message

  @property
  def label(self) -> str:
    return self.code.name if self.code is not None else "ValueError (rule)"


@dataclasses.dataclass(frozen=True)
class Ok:
  """A result; ``check(out)`` asserts what it must be (``out`` converted to NumPy)."""
  check: Callable[[Any], None] | None = None
  label: str = "ok"


@dataclasses.dataclass(frozen=True)
class Case:
  group: str
  category: str
  name: str
  make: Callable[[], tuple[Callable, tuple]]
  eager: Raises | Invalid | Ok
  jit: Raises | Invalid | Ok | None = None
  xfail_jit: str | None = None  # a known gap under jit (raise mode), with the fix needed
  jit_run: bool = True  # False: outside jit only (where compiling the case costs too much)
  flag: bool = True  # run under jit in flag mode too (value errors; False: empty results
  #                    have nothing to carry the poison)

  @property
  def id(self) -> str:
    return f"{self.group}:{self.category}:{self.name}"

  @property
  def under_jit(self):
    return self.eager if self.jit is None else self.jit


# Columns (function groups) and rows (input categories) of the README table, in order.
GROUPS = {
    "conv": "`sparse_conv`",
    "conv_t": "`sparse_conv_transpose`",
    "kmap": "`build_kernel_map`",
    "transposed": "`KernelMap.transposed`",
    "voxel": "`unique_voxels` `voxelize` `downsample`",
    "tensor": "`SparseTensor`",
    "pool": "`pooling`",
    "linen": "Linen layers",
    "nnx": "NNX layers",
    "unet": "`SparseConvUnet`",
}
CATEGORIES = {
    "shape": "wrong rank or shape",
    "dtype": "int / bool / complex / float16 positions, int features",
    "nan_pos": "NaN / inf positions",
    "nan_val": "NaN / inf features or importance",
    "empty_pts": "0 points",
    "empty_out": "0 outputs / capacity 0",
    "empty_ch": "0 channels",
    "lengths": "mismatched lengths",
    "vs_arg": "voxel size non-scalar / not a number",
    "vs_value": "voxel size 0 / negative / NaN / inf",
    "vs_traced": "voxel size traced: bad / other than the map's",
    "range": "coordinates beyond the range",
    "reach": "beyond the range via the kernel's reach / offset",
    "dup": "duplicated inputs",
    "dup_out": "duplicated outputs",
    "off": "off-lattice points",
    "batch": "batch ids negative / out of range",
    "batch_order": "batch ids unsorted",
    "mask": "padding mask / count of the wrong length or dtype",
    "padding": "NaN positions in padded rows (with their mask)",
    "static": "bad static argument (kernel size, offset, capacity, factor)",
    "params": "params with extra / missing entries, wrong dtype or shape",
}


# ------------------------------------------------------------------------------ inputs

P = np.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [1.5, 1.5, 0.5]], np.float32)
F = np.ones((3, 2), np.float32)
W = {"kernel": np.full((3, 3, 3, 2, 4), 0.1, np.float32), "bias": np.arange(4, dtype=np.float32)}
W2 = {"kernel": np.full((2, 2, 2, 2, 4), 0.1, np.float32),
      "bias": np.arange(4, dtype=np.float32)}
COARSE = np.array([[0.5, 0.5, 0.5]], np.float32)  # downsample(P, 1.0)
EMPTY = np.zeros((0, 3), np.float32)
VS = np.asarray(1.0, np.float32)  # a voxel size that is traced under jit


def nan_row(p=P, row=1, value=np.nan):
  p = np.array(p)
  p[row, 0] = value
  return p


def moved(p=P, row=1, by=(0.3, 0.0, 0.0)):
  p = np.array(p)
  p[row] += np.asarray(by, np.float32)
  return p


DUP = P[[0, 1, 1]]                                    # input 1 twice
OFF = moved()                                         # 0.3 voxel off the lattice
FAR = np.array([[0.5, 0.5, 0.5], [MAX_COORD + 10.5, 0.5, 0.5], [1.5, 0.5, 0.5]], np.float32)
# Spans MAX_COORD - 1 voxels: inside the range alone, beyond it with a K=3 kernel's reach.
EDGE = np.array([[0.5, 0.5, 0.5], [MAX_COORD - 1.5, 0.5, 0.5], [1.5, 0.5, 0.5]], np.float32)
# Spans 2**19 voxels on x: with an x offset of 2**19 the kernel's reach spans more than 2**20.
HALF = np.array([[0.5, 0.5, 0.5], [MAX_COORD // 2 + 0.5, 0.5, 0.5], [1.5, 0.5, 0.5]], np.float32)
PADDED = nan_row(row=2)                               # row 2 is padding (NaN), valid = 2
BATCH = np.array([0, 0, 1], np.int32)
NEG_BATCH = np.array([0, -1, 0], np.int32)
UNSORTED = np.array([1, 0, 1], np.int32)


def traced(v):
  return isinstance(v, (np.ndarray, jax.Array, dict, sc.KernelMap))


def _key(v):
  try:
    hash(v)
    return (type(v), v)
  except TypeError:
    return (type(v), repr(v))


_FNS: dict = {}


def call(f, *, static=(), **kw):
  """``(fn, args)`` calling ``f(**kw)``: arrays (and dicts, maps) become arguments of ``fn``
  (tracers under jit), the rest (and every name in ``static``) is closed over.

  Cases that differ only in their array values get the same ``fn`` (and ``fn.jitted``),
  so under ``jit`` they share one compiled program: the module stays fast."""
  dyn = {k: v for k, v in kw.items() if traced(v) and k not in static}
  fixed = {k: v for k, v in kw.items() if k not in dyn}
  keys = tuple(dyn)
  key = (f, keys, tuple((k, _key(v)) for k, v in sorted(fixed.items())))
  fn = _FNS.get(key)
  if fn is None:
    def fn(*vals):
      return f(**dict(zip(keys, vals)), **fixed)
    fn.jitted = jax.jit(fn)
    _FNS[key] = fn
  return fn, tuple(dyn[k] for k in keys)


# ------------------------------------------------------------------------------ checks


def shape(*expected):
  def check(out):
    got = out.shape
    assert got == expected, f"shape {got}, expected {expected}"
  return check


def bias_only(rows):
  def check(out):
    np.testing.assert_array_equal(out, np.broadcast_to(W["bias"], (rows, 4)))
  return check


def zeros(*expected):
  def check(out):
    assert out.shape == expected, out.shape
    np.testing.assert_array_equal(out, 0)
  return check


def all_nan(out):
  assert np.all(np.isnan(np.asarray(out))), "expected NaN everywhere (NaN input used)"


def first_row_nan(out):
  assert np.isnan(out[0][0, 0]) and np.isfinite(out[0][0, 1]), out[0]


def rows_finite(k):
  """The first ``k`` rows of every 2-d floating result are finite (padding did no harm)."""
  def check(out):
    if isinstance(out, sc.KernelMap):
      assert int(out.flags) == 0
      return
    for leaf in jax.tree_util.tree_leaves(out):
      a = np.asarray(leaf)
      if np.issubdtype(a.dtype, np.floating) and a.ndim == 2:
        assert np.all(np.isfinite(a[:k])), a
  return check


def count_is(k):
  def check(out):
    assert int(out.count) == k, int(out.count)
  return check


def same_rows(a, b):
  def check(out):
    np.testing.assert_array_equal(out[a], out[b])
  return check


def map_flags_clear(out):
  assert int(out.flags) == 0


def empty_map(num_out, num_in):
  def check(km):
    assert km.neighbors.shape[0] == num_out and km.num_in == num_in
    assert int(km.flags) == 0
  return check


def batch_map_equal(out):
  """The unsorted packed batch gives the neighbours a loop over clouds gives."""
  nb = np.asarray(out.neighbors)
  # cloud 1: points 0 and 2 (each other's neighbours); cloud 0: point 1 alone
  assert sorted(nb[0][nb[0] < 3].tolist()) == [0, 2]
  assert nb[1][nb[1] < 3].tolist() == [1]


NaNs = Ok(all_nan, "NaN/inf out")
EMPTY_OK = "ok (empty)"


# ------------------------------------------------------------------ the calls, by group


def conv(*, transpose=False, **kw):
  base = dict(params=W, feats=F, in_pos=P, out_pos=P, voxel_size=1.0)
  base.update(kw)
  return call(sc.sparse_conv_transpose if transpose else sc.sparse_conv, **base)


def conv_t(**kw):
  base = dict(params=W2, feats=F[:1], in_pos=COARSE, out_pos=P)
  base.update(kw)
  return conv(transpose=True, **base)


def kmap(**kw):
  base = dict(in_pos=P, out_pos=P, voxel_size=1.0, kernel_size=3)
  base.update(kw)
  return call(sc.build_kernel_map, static=("kernel_size", "offset"), **base)


def _transposed(**a):
  return sc.build_kernel_map(**a).transposed()


def transposed(**kw):
  base = dict(in_pos=P, out_pos=P, voxel_size=1.0, kernel_size=2)
  base.update(kw)
  return call(_transposed, static=("kernel_size", "offset"), **base)


def uv(**kw):
  base = dict(positions=P, feats=F, voxel_size=1.0)
  base.update(kw)
  return call(sc.unique_voxels, static=("capacity",), **base)


def vox(**kw):
  base = dict(points=P + np.float32(0.2), feats=F, voxel_size=1.0)
  base.update(kw)
  return call(sc.voxelize, static=("capacity",), **base)


def down(**kw):
  base = dict(positions=P, voxel_size=1.0)
  base.update(kw)
  return call(sc.downsample, static=("factor", "capacity"), **base)


def _tensor_points(**a):
  return sc.SparseTensor.from_points(**a).with_kernel_map(3).down()


def tensor_points(**kw):
  base = dict(points=P, feats=F, voxel_size=1.0)
  base.update(kw)
  return call(_tensor_points, static=("capacity",), **base)


def _tensor_voxels(method, **a):
  t = sc.SparseTensor.from_voxels(**a)
  return t.with_kernel_map(3) if method == "with_kernel_map" else t.down()


def tensor_voxels(method="with_kernel_map", **kw):
  base = dict(positions=P, feats=F, voxel_size=1.0)
  base.update(kw)
  return call(_tensor_voxels, method=method, **base)


def max_pool(**kw):
  base = dict(feats=F, positions=P, voxel_size=1.0)
  base.update(kw)
  return call(pooling.sparse_max_pool, static=("kernel_size", "stride", "out_capacity"), **base)


def avg_pool(**kw):
  base = dict(feats=F, positions=P, voxel_size=1.0)
  base.update(kw)
  return call(pooling.sparse_avg_pool, static=("kernel_size", "stride", "out_capacity"), **base)


def gpool(mode="max", **kw):
  base = dict(feats=F)
  base.update(kw)
  f = pooling.global_max_pool if mode == "max" else pooling.global_avg_pool
  return call(f, static=("num_clouds",), **base)


@functools.lru_cache(maxsize=None)
def linen_layer(kind="conv", cin=2, filters=4, kernel_size=3):
  from jax_sparseconv import linen
  cls = {"conv": linen.SparseConv, "conv_t": linen.SparseConvTranspose,
         "subm": linen.SubMConv}[kind]
  layer = cls(filters=filters, kernel_size=kernel_size)
  if kind == "subm":
    t = sc.SparseTensor.from_voxels(P, np.ones((3, cin), np.float32), 1.0)
    variables = layer.init(jax.random.key(0), t)
  elif kind == "conv_t":
    variables = layer.init(jax.random.key(0), np.ones((1, cin), np.float32), COARSE, P, 1.0)
  else:
    variables = layer.init(jax.random.key(0), np.ones((3, cin), np.float32), P, P, 1.0)
  return layer, jax.tree_util.tree_map(np.asarray, variables)


_CALL_ARGS = ("feats", "inp_positions", "out_positions", "voxel_size")


def _linen_apply(variables, kind, **a):
  args = [a.pop(k) for k in _CALL_ARGS]
  return linen_layer(kind)[0].apply(variables, *args, **a)


def linen_conv(variables=None, kind="conv", **kw):
  _, v = linen_layer(kind)
  base = dict(feats=F, inp_positions=P, out_positions=P, voxel_size=1.0)
  if kind == "conv_t":
    base.update(feats=F[:1], inp_positions=COARSE)
  base.update(kw)
  return call(_linen_apply, variables=v if variables is None else variables, kind=kind, **base)


def linen_params(change):
  _, v = linen_layer()
  return linen_conv(variables={"params": change(dict(v["params"]))})


def _linen_subm(variables, **a):
  return linen_layer("subm")[0].apply(variables, sc.SparseTensor.from_voxels(**a)).feats


def linen_subm(**kw):
  _, v = linen_layer("subm")
  base = dict(positions=P, feats=F, voxel_size=1.0)
  base.update(kw)
  return call(_linen_subm, variables=v, **base)


@functools.lru_cache(maxsize=None)
def nnx_layer(kind="conv", cin=2):
  """One NNX layer per kind, shared by the eager and the jitted cases: built with concrete
  parameters even when first asked for inside a trace (else the cache would keep that
  trace's tracers, and whichever case ran next under jit would fail on a leaked tracer)."""
  from flax import nnx

  from jax_sparseconv import nnx as snnx
  cls = {"conv": snnx.SparseConv, "conv_t": snnx.SparseConvTranspose, "subm": snnx.SubMConv,
         "down": snnx.DownConv}[kind]
  with jax.ensure_compile_time_eval():
    return cls(cin, 4, rngs=nnx.Rngs(0))


def _nnx_call(kind, **a):
  args = [a.pop(k) for k in _CALL_ARGS]
  return nnx_layer(kind)(*args, **a)


def nnx_conv(kind="conv", **kw):
  base = dict(feats=F, inp_positions=P, out_positions=P, voxel_size=1.0)
  if kind == "conv_t":
    base.update(feats=F[:1], inp_positions=COARSE)
  base.update(kw)
  return call(_nnx_call, kind=kind, **base)


def _nnx_level(kind, **a):
  layer, t = nnx_layer(kind), sc.SparseTensor.from_voxels(**a)
  return (layer(t, t.down()) if kind == "down" else layer(t)).feats


def nnx_level(kind="subm", **kw):
  base = dict(positions=P, feats=F, voxel_size=1.0)
  base.update(kw)
  return call(_nnx_level, kind=kind, **base)


def nnx_params(change):
  """An NNX layer whose kernel was overwritten with ``change(kernel)``."""
  def make():
    from flax import nnx

    from jax_sparseconv import nnx as snnx
    layer = snnx.SparseConv(2, 4, rngs=nnx.Rngs(0))
    layer.kernel = nnx.Param(jnp.asarray(change(np.asarray(layer.kernel[...]))))

    def f(feats, pos):
      return layer(feats, pos, pos, 1.0)
    return f, (F, P)
  return make


UNET_PTS = np.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [3.5, 2.5, 0.5], [0.2, 0.7, 0.1]],
                    np.float32)
UNET_FEATS = np.ones((4, 3), np.float32)


@functools.lru_cache(maxsize=None)
def unet_model():
  """A tiny model with constant weights (shapes from ``eval_shape``: no compilation)."""
  from jax_sparseconv.models import SparseConvUnet
  model = SparseConvUnet(multiplier=2, num_classes=2, num_levels=2)
  shapes = jax.eval_shape(functools.partial(model.init, capacities=(4, 4)), jax.random.key(0),
                          UNET_PTS, UNET_FEATS)
  return model, jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.1, s.dtype), shapes)


def _unet_apply(variables, **a):
  return unet_model()[0].apply(variables, **a)


def unet(**kw):
  _, v = unet_model()
  base = dict(points=UNET_PTS, feats=UNET_FEATS, capacities=(4, 4))
  base.update(kw)
  return call(_unet_apply, static=("capacities",), variables=v, **base)



# --------------------------------------------------------------------------- the cases

C = Case
VS_MSG = "voxel_size must be positive and finite, got"

CASES: list[Case] = [
    # ---------------------------------------------------------------- sparse_conv
    C("conv", "shape", "feats (3,)", lambda: conv(feats=np.ones(3, np.float32)),
      Raises(ValueError, "feats must have rank 2, got shape (3,)")),
    C("conv", "shape", "in_pos (3, 2)", lambda: conv(in_pos=P[:, :2]),
      Raises(ValueError, "in_pos must have shape (num_points, 3), got (3, 2)")),
    C("conv", "shape", "out_pos (1, 3, 3)", lambda: conv(out_pos=P[None]),
      Raises(ValueError, "out_pos must have rank 2, got shape (1, 3, 3)")),
    C("conv", "dtype", "in_pos int32", lambda: conv(in_pos=P.astype(np.int32)),
      Raises(TypeError, "in_pos must be a floating-point array, got dtype int32 shape (3, 3)")),
    C("conv", "dtype", "in_pos bool", lambda: conv(in_pos=P > 1),
      Raises(TypeError, "in_pos must be a floating-point array, got dtype bool shape (3, 3)")),
    C("conv", "dtype", "out_pos complex64", lambda: conv(out_pos=P.astype(np.complex64)),
      Raises(TypeError, "out_pos must be a floating-point array, got dtype complex64")),
    C("conv", "dtype", "in_pos float16", lambda: conv(in_pos=P.astype(np.float16)),
      Raises(TypeError, "in_pos must be float32 or float64 positions, got dtype float16")),
    C("conv", "dtype", "out_pos bfloat16", lambda: conv(out_pos=P.astype(jnp.bfloat16)),
      Raises(TypeError, "out_pos must be float32 or float64 positions, got dtype bfloat16")),
    C("conv", "dtype", "feats int32", lambda: conv(feats=F.astype(np.int32)),
      Raises(TypeError, "feats must be a floating-point array, got dtype int32 shape (3, 2)")),
    C("conv", "nan_pos", "in_pos NaN", lambda: conv(in_pos=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("conv", "nan_pos", "out_pos inf", lambda: conv(out_pos=nan_row(value=np.inf)),
      Invalid(E.NONFINITE_POSITION)),
    C("conv", "nan_val", "feats NaN", lambda: conv(feats=nan_row(F)), NaNs),
    C("conv", "nan_val", "inp_importance inf",
      lambda: conv(inp_importance=np.array([1, np.inf, 1], np.float32)),
      Ok(lambda y: np.testing.assert_(np.all(~np.isfinite(y[:, 0]))), "NaN/inf out")),
    C("conv", "empty_pts", "0 inputs", lambda: conv(feats=F[:0], in_pos=EMPTY),
      Ok(bias_only(3), "ok (bias)")),
    C("conv", "empty_out", "0 outputs", lambda: conv(out_pos=EMPTY), Ok(shape(0, 4), EMPTY_OK)),
    C("conv", "empty_out", "0 inputs, 0 outputs",
      lambda: conv(feats=F[:0], in_pos=EMPTY, out_pos=EMPTY), Ok(shape(0, 4), EMPTY_OK)),
    C("conv", "empty_ch", "Cin = 0",
      lambda: conv(params={"kernel": W["kernel"][..., :0, :], "bias": W["bias"]},
                   feats=F[:, :0]), Ok(bias_only(3), "ok (bias)")),
    C("conv", "empty_ch", "Cout = 0",
      lambda: conv(params={"kernel": W["kernel"][..., :0], "bias": W["bias"][:0]}),
      Ok(shape(3, 0), EMPTY_OK)),
    C("conv", "lengths", "feats 4 rows, in_pos 3", lambda: conv(feats=np.ones((4, 2), np.float32)),
      Raises(ValueError, "feats has 4 rows but in_pos has 3 (shapes (4, 2) and (3, 3))")),
    C("conv", "lengths", "inp_importance (2,)",
      lambda: conv(inp_importance=np.ones(2, np.float32)),
      Raises(ValueError, "inp_importance must have shape (3,), got (2,)")),
    C("conv", "lengths", "kernel_map of 2 outputs",
      lambda: conv(kernel_map=sc.build_kernel_map(P, P[:2], 1.0, 3)),
      Raises(ValueError, "kernel_map is for 3 inputs and 2 outputs, got in_pos (3, 3) and "
                         "out_pos (3, 3)")),
    C("conv", "vs_arg", "voxel_size (3,)", lambda: conv(voxel_size=np.ones(3, np.float32)),
      Raises(ValueError, "voxel_size must be a scalar, got shape (3,)")),
    C("conv", "vs_arg", "voxel_size '1'", lambda: conv(voxel_size="1"),
      Raises(TypeError, "voxel_size must be a real scalar, got str")),
    C("conv", "vs_value", "voxel_size 0", lambda: conv(voxel_size=0.0),
      Raises(ValueError, VS_MSG + " 0.0")),
    C("conv", "vs_value", "voxel_size -1", lambda: conv(voxel_size=-1.0),
      Raises(ValueError, VS_MSG + " -1.0")),
    C("conv", "vs_value", "voxel_size NaN", lambda: conv(voxel_size=float("nan")),
      Raises(ValueError, VS_MSG + " nan")),
    C("conv", "vs_traced", "traced voxel_size 1", lambda: conv(voxel_size=VS),
      Ok(lambda y: np.testing.assert_(np.all(np.isfinite(y))))),
    C("conv", "vs_traced", "traced voxel_size -1",
      lambda: conv(voxel_size=np.asarray(-1.0, np.float32)),
      Raises(ValueError, VS_MSG + " -1.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("conv", "vs_traced", "traced voxel_size inf",
      lambda: conv(voxel_size=np.asarray(np.inf, np.float32)),
      Raises(ValueError, VS_MSG + " inf"), Invalid(E.BAD_VOXEL_SIZE)),
    C("conv", "vs_traced", "voxel_size 2 with a map built at 1",
      lambda: conv(voxel_size=np.asarray(2.0, np.float32),
                   kernel_map=sc.build_kernel_map(P, P, 1.0, 3)),
      Raises(ValueError, "voxel_size 2.0 differs from the 1.0 the kernel_map was built with"),
      Invalid(E.MAP_MISMATCH)),
    C("conv", "range", "a point 2**20 voxels away", lambda: conv(in_pos=FAR),
      Invalid(E.OUT_OF_RANGE)),
    C("conv", "reach", "span 2**20 - 1 plus K=3 reach", lambda: conv(in_pos=EDGE),
      Invalid(E.OUT_OF_RANGE)),
    C("conv", "reach", "offset 2**20", lambda: conv(offset=[float(MAX_COORD), 0, 0]),
      Invalid(E.OUT_OF_RANGE)),
    C("conv", "dup", "input voxel twice", lambda: conv(in_pos=DUP), Invalid(E.DUPLICATE_INPUT)),
    C("conv", "dup_out", "output voxel twice", lambda: conv(out_pos=DUP),
      Ok(same_rows(1, 2), "ok (equal rows)")),
    C("conv", "off", "in_pos 0.3 voxel off", lambda: conv(in_pos=OFF), Invalid(E.OFF_LATTICE)),
    C("conv", "off", "out_pos 0.3 voxel off", lambda: conv(out_pos=OFF), Invalid(E.OFF_LATTICE)),
    C("conv", "padding", "NaN padded input (in_valid=2)",
      lambda: conv(in_pos=PADDED,
                   kernel_map=sc.build_kernel_map(PADDED, P, 1.0, 3, in_valid=2)),
      Ok(rows_finite(3))),
    C("conv", "params", "extra entry", lambda: conv(params={**W, "extra": np.ones(1)}),
      Raises(ValueError, "params has unknown entries ['extra']")),
    C("conv", "params", "no kernel", lambda: conv(params={"bias": W["bias"]}),
      Raises(TypeError, "params must be a mapping with a 'kernel' entry")),
    C("conv", "params", "not a mapping", lambda: conv(params=[W["kernel"]]),
      Raises(TypeError, "params must be a mapping with a 'kernel' entry")),
    C("conv", "params", "int kernel",
      lambda: conv(params={**W, "kernel": W["kernel"].astype(np.int32)}),
      Raises(TypeError, "params['kernel'] must be a floating-point array, got dtype int32 "
                        "shape (3, 3, 3, 2, 4)")),
    C("conv", "params", "complex bias",
      lambda: conv(params={**W, "bias": W["bias"].astype(np.complex64)}),
      Raises(TypeError, "params['bias'] must be a floating-point array, got dtype complex64")),
    C("conv", "params", "bias (3,)", lambda: conv(params={**W, "bias": W["bias"][:3]}),
      Raises(ValueError, "params['bias'] must have shape (4,) to match kernel (3, 3, 3, 2, 4), "
                         "got (3,)")),
    C("conv", "params", "kernel rank 4", lambda: conv(params={"kernel": W["kernel"][0]}),
      Raises(ValueError, "params['kernel'] must have rank 5, got shape (3, 3, 2, 4)")),
    C("conv", "params", "kernel Cin 5 for 2 channels",
      lambda: conv(params={"kernel": np.ones((3, 3, 3, 5, 4), np.float32)}),
      Raises(ValueError, "feats has 2 channels but the kernel (3, 3, 3, 5, 4)")),

    # ------------------------------------------------------- sparse_conv_transpose
    C("conv_t", "shape", "feats (1, 2, 1)", lambda: conv_t(feats=F[:1, :, None]),
      Raises(ValueError, "feats must have rank 2, got shape (1, 2, 1)")),
    C("conv_t", "shape", "out_pos (3, 4)", lambda: conv_t(out_pos=np.ones((3, 4), np.float32)),
      Raises(ValueError, "out_pos must have shape (num_points, 3), got (3, 4)")),
    C("conv_t", "dtype", "in_pos int64", lambda: conv_t(in_pos=COARSE.astype(np.int64)),
      Raises(TypeError, "in_pos must be a floating-point array")),
    C("conv_t", "dtype", "in_pos float16", lambda: conv_t(in_pos=COARSE.astype(np.float16)),
      Raises(TypeError, "in_pos must be float32 or float64 positions, got dtype float16")),
    C("conv_t", "nan_pos", "out_pos NaN", lambda: conv_t(out_pos=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("conv_t", "nan_val", "out_importance NaN",
      lambda: conv_t(out_importance=np.full(3, np.nan, np.float32)), NaNs),
    C("conv_t", "empty_pts", "0 inputs", lambda: conv_t(feats=F[:0], in_pos=EMPTY),
      Ok(bias_only(3), "ok (bias)")),
    C("conv_t", "empty_out", "0 outputs", lambda: conv_t(out_pos=EMPTY),
      Ok(shape(0, 4), EMPTY_OK)),
    C("conv_t", "empty_ch", "Cin = 0",
      lambda: conv_t(params={"kernel": W2["kernel"][..., :0, :], "bias": W2["bias"]},
                     feats=F[:1, :0]), Ok(bias_only(3), "ok (bias)")),
    C("conv_t", "lengths", "out_importance (2,)",
      lambda: conv_t(out_importance=np.ones(2, np.float32)),
      Raises(ValueError, "out_importance must have shape (3,), got (2,)")),
    C("conv_t", "lengths", "a map built with transpose=False",
      lambda: conv_t(kernel_map=sc.build_kernel_map(COARSE, P, 1.0, 2)),
      Raises(ValueError, "kernel_map was built with transpose=False")),
    C("conv_t", "vs_value", "voxel_size -2", lambda: conv_t(voxel_size=-2.0),
      Raises(ValueError, VS_MSG + " -2.0")),
    C("conv_t", "vs_traced", "traced voxel_size NaN",
      lambda: conv_t(voxel_size=np.asarray(np.nan, np.float32)),
      Raises(ValueError, VS_MSG + " nan"), Invalid(E.BAD_VOXEL_SIZE)),
    C("conv_t", "reach", "offset -2**20", lambda: conv_t(offset=[0, -float(MAX_COORD), 0]),
      Invalid(E.OUT_OF_RANGE)),
    C("conv_t", "dup", "input voxel twice",
      lambda: conv_t(feats=F[:2], in_pos=COARSE[[0, 0]]), Invalid(E.DUPLICATE_INPUT)),
    C("conv_t", "off", "out_pos off", lambda: conv_t(out_pos=OFF), Invalid(E.OFF_LATTICE)),
    C("conv_t", "params", "float64 bias for float32 kernel",
      lambda: conv_t(params={**W2, "bias": np.ones(4, np.float64)}),
      Ok(lambda y: np.testing.assert_(np.all(np.isfinite(y))))),

    # ----------------------------------------------------------- build_kernel_map
    C("kmap", "shape", "in_pos (3,)", lambda: kmap(in_pos=P[0]),
      Raises(ValueError, "in_pos must have rank 2, got shape (3,)")),
    C("kmap", "dtype", "out_pos int32", lambda: kmap(out_pos=P.astype(np.int32)),
      Raises(TypeError, "out_pos must be a floating-point array, got dtype int32")),
    C("kmap", "dtype", "in_pos float16", lambda: kmap(in_pos=P.astype(np.float16)),
      Raises(TypeError, "in_pos must be float32 or float64 positions, got dtype float16")),
    C("kmap", "nan_pos", "in_pos -inf", lambda: kmap(in_pos=nan_row(value=-np.inf)),
      Invalid(E.NONFINITE_POSITION)),
    C("kmap", "empty_pts", "0 inputs", lambda: kmap(in_pos=EMPTY), Ok(empty_map(3, 0), EMPTY_OK)),
    C("kmap", "empty_out", "0 outputs", lambda: kmap(out_pos=EMPTY),
      Ok(empty_map(0, 3), EMPTY_OK)),
    C("kmap", "lengths", "in_batch without out_batch", lambda: kmap(in_batch=BATCH),
      Raises(ValueError, "give both in_batch and out_batch, or neither")),
    C("kmap", "lengths", "out_batch (2,)", lambda: kmap(in_batch=BATCH, out_batch=BATCH[:2]),
      Raises(ValueError, "out_batch must be an integer array of shape (3,), got dtype int32 "
                         "shape (2,)")),
    C("kmap", "vs_arg", "voxel_size (1, 1)",
      lambda: kmap(voxel_size=np.ones((1, 1), np.float32)),
      Raises(ValueError, "voxel_size must be a scalar, got shape (1, 1)")),
    C("kmap", "vs_arg", "voxel_size True", lambda: kmap(voxel_size=True),
      Raises(TypeError, "voxel_size must be a real scalar, got bool")),
    C("kmap", "vs_value", "voxel_size inf", lambda: kmap(voxel_size=float("inf")),
      Raises(ValueError, VS_MSG + " inf")),
    C("kmap", "vs_traced", "traced voxel_size 0",
      lambda: kmap(voxel_size=np.asarray(0.0, np.float32)),
      Raises(ValueError, VS_MSG + " 0.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("kmap", "range", "a point 2**20 voxels away", lambda: kmap(out_pos=FAR),
      Invalid(E.OUT_OF_RANGE)),
    C("kmap", "reach", "span 2**20 - 1 plus K=3 reach", lambda: kmap(in_pos=EDGE, out_pos=EDGE),
      Invalid(E.OUT_OF_RANGE)),
    C("kmap", "reach", "span 2**20 - 1, K=1 (no reach)",
      lambda: kmap(in_pos=EDGE, out_pos=EDGE, kernel_size=1), Ok(map_flags_clear)),
    C("kmap", "reach", "x offset 2**19 + 8 on an x span of 2**19",
      lambda: kmap(in_pos=HALF, out_pos=HALF, offset=[float(MAX_COORD // 2 + 8), 0, 0]),
      Invalid(E.OUT_OF_RANGE)),
    C("kmap", "dup", "input voxel twice", lambda: kmap(in_pos=DUP), Invalid(E.DUPLICATE_INPUT)),
    C("kmap", "dup", "twice, but one copy padded",
      lambda: kmap(in_pos=DUP, in_valid=np.array([True, True, False])), Ok(map_flags_clear)),
    C("kmap", "dup", "twice, in two clouds",
      lambda: kmap(in_pos=DUP, in_batch=np.array([0, 0, 1], np.int32),
                   out_batch=np.zeros(3, np.int32)), Ok(map_flags_clear)),
    C("kmap", "dup_out", "output voxel twice", lambda: kmap(out_pos=DUP), Ok(map_flags_clear)),
    C("kmap", "off", "corner and centre lattices mixed",
      lambda: kmap(out_pos=P - np.float32(0.5)), Invalid(E.OFF_LATTICE)),
    C("kmap", "batch", "negative in_batch", lambda: kmap(in_batch=NEG_BATCH, out_batch=BATCH),
      Invalid(E.BAD_BATCH)),
    C("kmap", "batch", "negative batch of a padded row",
      lambda: kmap(in_batch=np.array([0, 0, -1], np.int32), out_batch=BATCH, in_valid=2),
      Ok(map_flags_clear)),
    C("kmap", "batch", "float batch", lambda: kmap(in_batch=BATCH * 1.0, out_batch=BATCH),
      Raises(ValueError, "in_batch must be an integer array of shape (3,), got dtype float")),
    C("kmap", "batch_order", "unsorted cloud ids",
      lambda: kmap(in_batch=UNSORTED, out_batch=UNSORTED), Ok(batch_map_equal)),
    C("kmap", "mask", "in_valid mask (2,)", lambda: kmap(in_valid=np.ones(2, bool)),
      Raises(ValueError, "in_valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype bool shape (2,)")),
    C("kmap", "mask", "out_valid float mask", lambda: kmap(out_valid=np.ones(3, np.float32)),
      Raises(ValueError, "out_valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype float32")),
    C("kmap", "mask", "in_valid float count", lambda: kmap(in_valid=np.float32(2)),
      Raises(TypeError, "in_valid as a count must be an integer, got dtype float32")),
    C("kmap", "mask", "count larger than the rows", lambda: kmap(in_valid=np.int32(7)),
      Ok(map_flags_clear, "ok (all valid)")),
    C("kmap", "padding", "NaN padded rows (in_valid=2, out_valid=2)",
      lambda: kmap(in_pos=PADDED, out_pos=PADDED, in_valid=np.int32(2),
                   out_valid=np.int32(2)), Ok(map_flags_clear)),
    C("kmap", "static", "kernel_size 0", lambda: kmap(kernel_size=0),
      Raises(ValueError, "kernel_size entries must be >= 1, got (0, 0, 0)")),
    C("kmap", "static", "kernel_size (3, 3)", lambda: kmap(kernel_size=(3, 3)),
      Raises(ValueError, "kernel_size must be an int or 3 ints (Kz, Ky, Kx), got (3, 3)")),
    C("kmap", "static", "offset (2,)", lambda: kmap(offset=[0.0, 0.0]),
      Raises(ValueError, "offset must have shape (3,) ([x, y, z]), got (2,)")),
    C("kmap", "static", "offset NaN", lambda: kmap(offset=[0.0, np.nan, 0.0]),
      Raises(ValueError, "offset must be finite")),

    # ------------------------------------------------------- KernelMap.transposed
    C("transposed", "empty_pts", "0 points", lambda: transposed(in_pos=EMPTY, out_pos=EMPTY),
      Ok(empty_map(0, 0), EMPTY_OK)),
    C("transposed", "dup_out", "outputs twice (inputs of the transpose)",
      lambda: transposed(out_pos=DUP), Invalid(E.DUPLICATE_INPUT)),
    C("transposed", "dup_out", "outputs twice, one padded",
      lambda: transposed(out_pos=DUP, out_valid=np.array([True, True, False])),
      Ok(map_flags_clear)),
    C("transposed", "padding", "NaN padded rows",
      lambda: transposed(in_pos=PADDED, out_pos=PADDED, in_valid=np.int32(2),
                         out_valid=np.int32(2)), Ok(map_flags_clear)),
    C("transposed", "nan_pos", "map of NaN positions", lambda: transposed(in_pos=nan_row()),
      Invalid(E.NONFINITE_POSITION)),

    # ----------------------------------------------------------- voxel utilities
    C("voxel", "shape", "unique_voxels positions (3, 2)", lambda: uv(positions=P[:, :2]),
      Raises(ValueError, "positions must have shape (num_points, 3), got (3, 2)")),
    C("voxel", "shape", "voxelize feats (3,)", lambda: vox(feats=F[:, 0]),
      Raises(ValueError, "feats must have rank 2, got shape (3,)")),
    C("voxel", "shape", "downsample positions (3,)", lambda: down(positions=P[0]),
      Raises(ValueError, "positions must have rank 2, got shape (3,)")),
    C("voxel", "dtype", "voxelize points int32", lambda: vox(points=P.astype(np.int32)),
      Raises(TypeError, "points must be a floating-point array, got dtype int32")),
    C("voxel", "dtype", "unique_voxels feats bool", lambda: uv(feats=F > 0),
      Raises(TypeError, "feats must be a floating-point array, got dtype bool shape (3, 2)")),
    C("voxel", "dtype", "downsample positions float16",
      lambda: down(positions=P.astype(np.float16)),
      Raises(TypeError, "positions must be float32 or float64 positions, got dtype float16")),
    C("voxel", "nan_pos", "unique_voxels NaN", lambda: uv(positions=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("voxel", "nan_pos", "voxelize inf", lambda: vox(points=nan_row(value=np.inf)),
      Invalid(E.NONFINITE_POSITION)),
    C("voxel", "nan_pos", "downsample NaN", lambda: down(positions=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("voxel", "nan_val", "unique_voxels NaN feature", lambda: uv(feats=nan_row(F)),
      Ok(lambda o: np.testing.assert_(np.isnan(o.feats).any() and np.isfinite(o.feats[0]).all()),
         "NaN/inf out")),
    C("voxel", "empty_pts", "unique_voxels 0 points", lambda: uv(positions=EMPTY, feats=F[:0]),
      Ok(count_is(0), EMPTY_OK)),
    C("voxel", "empty_pts", "voxelize 0 points", lambda: vox(points=EMPTY, feats=F[:0]),
      Ok(count_is(0), EMPTY_OK)),
    C("voxel", "empty_pts", "downsample 0 points", lambda: down(positions=EMPTY),
      Ok(count_is(0), EMPTY_OK)),
    C("voxel", "empty_out", "capacity 1 for 3 voxels", lambda: uv(capacity=1),
      Invalid(E.CAPACITY_OVERFLOW)),
    C("voxel", "empty_out", "capacity 0 for 3 voxels", lambda: vox(capacity=0),
      Invalid(E.CAPACITY_OVERFLOW), flag=False),
    C("voxel", "empty_out", "capacity 0 for 0 points",
      lambda: vox(points=EMPTY, feats=F[:0], capacity=0), Ok(count_is(0), EMPTY_OK)),
    C("voxel", "empty_ch", "0 feature channels", lambda: uv(feats=F[:, :0]),
      Ok(count_is(3), EMPTY_OK)),
    C("voxel", "lengths", "feats 2 rows, positions 3", lambda: uv(feats=F[:2]),
      Raises(ValueError, "feats has 2 rows but positions has 3 (shapes (2, 2) and (3, 3))")),
    C("voxel", "lengths", "batch (2,)", lambda: vox(batch=BATCH[:2]),
      Raises(ValueError, "batch must be an integer array of shape (3,), got dtype int32 "
                         "shape (2,)")),
    C("voxel", "vs_arg", "voxel_size (3,)", lambda: vox(voxel_size=np.ones(3, np.float32)),
      Raises(ValueError, "voxel_size must be a scalar, got shape (3,)")),
    C("voxel", "vs_value", "voxelize voxel_size 0", lambda: vox(voxel_size=0.0),
      Raises(ValueError, VS_MSG + " 0.0")),
    C("voxel", "vs_value", "downsample voxel_size -1", lambda: down(voxel_size=-1.0),
      Raises(ValueError, VS_MSG + " -1.0")),
    C("voxel", "vs_traced", "voxelize traced voxel_size -1",
      lambda: vox(voxel_size=np.asarray(-1.0, np.float32)),
      Raises(ValueError, VS_MSG + " -1.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("voxel", "vs_traced", "unique_voxels traced voxel_size NaN",
      lambda: uv(voxel_size=np.asarray(np.nan, np.float32)),
      Raises(ValueError, VS_MSG + " nan"), Invalid(E.BAD_VOXEL_SIZE)),
    C("voxel", "vs_traced", "downsample traced voxel_size 0",
      lambda: down(voxel_size=np.asarray(0.0, np.float32)),
      Raises(ValueError, VS_MSG + " 0.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("voxel", "vs_traced", "voxelize traced voxel_size 1", lambda: vox(voxel_size=VS),
      Ok(count_is(3))),
    C("voxel", "range", "voxelize 1e7", lambda: vox(points=P * np.float32(1e7)),
      Invalid(E.OUT_OF_RANGE)),
    C("voxel", "range", "downsample 2**20 apart", lambda: down(positions=FAR),
      Invalid(E.OUT_OF_RANGE)),
    C("voxel", "dup", "unique_voxels merges", lambda: uv(positions=DUP), Ok(count_is(2),
                                                                            "ok (merged)")),
    C("voxel", "dup", "downsample of duplicates", lambda: down(positions=DUP),
      Ok(count_is(1), "ok (merged)")),
    C("voxel", "off", "unique_voxels off", lambda: uv(positions=OFF), Invalid(E.OFF_LATTICE)),
    C("voxel", "off", "downsample off", lambda: down(positions=OFF), Invalid(E.OFF_LATTICE)),
    C("voxel", "off", "voxelize snaps anything", lambda: vox(points=OFF),
      Ok(count_is(3), "ok (snapped)")),
    C("voxel", "batch", "unique_voxels negative batch", lambda: uv(batch=NEG_BATCH),
      Invalid(E.BAD_BATCH)),
    C("voxel", "batch", "downsample negative batch", lambda: down(batch=NEG_BATCH),
      Invalid(E.BAD_BATCH)),
    C("voxel", "batch", "voxelize float batch", lambda: vox(batch=BATCH * 1.0),
      Raises(ValueError, "batch must be an integer array of shape (3,), got dtype float")),
    C("voxel", "batch_order", "unique_voxels unsorted batch",
      lambda: uv(positions=DUP, batch=UNSORTED), Ok(count_is(3))),
    C("voxel", "mask", "valid mask (4,)", lambda: uv(valid=np.ones(4, bool)),
      Raises(ValueError, "valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype bool shape (4,)")),
    C("voxel", "mask", "downsample valid int mask", lambda: down(valid=np.ones(3, np.int32)),
      Raises(ValueError, "valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype int32 shape (3,)")),
    C("voxel", "padding", "NaN padded rows (valid=2)",
      lambda: uv(positions=PADDED, valid=np.int32(2)), Ok(count_is(2))),
    C("voxel", "padding", "downsample NaN padded rows",
      lambda: down(positions=PADDED, valid=np.array([True, True, False])), Ok(count_is(1))),
    C("voxel", "static", "capacity -1", lambda: uv(capacity=-1),
      Raises(ValueError, "capacity must be >= 0, got -1")),
    C("voxel", "static", "capacity 2.5", lambda: vox(capacity=2.5),
      Raises(TypeError, "capacity must be a static int (it sets the result's shape), got float")),
    C("voxel", "static", "factor 0", lambda: down(factor=0),
      Raises(ValueError, "factor must be a positive int, got 0")),
    C("voxel", "static", "factor True", lambda: down(factor=True),
      Raises(ValueError, "factor must be a positive int, got True")),

    # --------------------------------------------------------------- SparseTensor
    C("tensor", "shape", "from_points points (3, 2)",
      lambda: tensor_points(points=P[:, :2]),
      Raises(ValueError, "points must have shape (num_points, 3), got (3, 2)")),
    C("tensor", "shape", "from_voxels feats (3,)", lambda: tensor_voxels(feats=F[:, 0]),
      Raises(ValueError, "feats must have rank 2, got shape (3,)")),
    C("tensor", "dtype", "from_voxels positions int32",
      lambda: tensor_voxels(positions=P.astype(np.int32)),
      Raises(TypeError, "positions must be a floating-point array, got dtype int32")),
    C("tensor", "dtype", "from_voxels feats int32", lambda: tensor_voxels(feats=F.astype(int)),
      Raises(TypeError, "feats must be a floating-point array, got dtype int")),
    C("tensor", "nan_pos", "from_points NaN", lambda: tensor_points(points=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("tensor", "nan_pos", "from_voxels NaN, with_kernel_map",
      lambda: tensor_voxels(positions=nan_row()), Invalid(E.NONFINITE_POSITION)),
    C("tensor", "empty_pts", "from_points 0 points, maps, down",
      lambda: tensor_points(points=EMPTY, feats=F[:0]),
      Ok(lambda t: np.testing.assert_equal(t.positions.shape, (0, 3)), EMPTY_OK)),
    C("tensor", "lengths", "from_voxels feats 2 rows",
      lambda: tensor_voxels(feats=F[:2]),
      Raises(ValueError, "feats has 2 rows but positions has 3 (shapes (2, 2) and (3, 3))")),
    C("tensor", "vs_value", "from_voxels voxel_size 0", lambda: tensor_voxels(voxel_size=0.0),
      Raises(ValueError, VS_MSG + " 0.0")),
    C("tensor", "vs_arg", "from_voxels voxel_size (2,)",
      lambda: tensor_voxels(voxel_size=np.ones(2, np.float32)),
      Raises(ValueError, "voxel_size must be a scalar, got shape (2,)")),
    C("tensor", "vs_traced", "from_voxels traced voxel_size -1, with_kernel_map",
      lambda: tensor_voxels(voxel_size=np.asarray(-1.0, np.float32)),
      Raises(ValueError, VS_MSG + " -1.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("tensor", "range", "from_points 1e7", lambda: tensor_points(points=P * np.float32(1e7)),
      Invalid(E.OUT_OF_RANGE)),
    C("tensor", "dup", "from_voxels duplicates, with_kernel_map",
      lambda: tensor_voxels(positions=DUP), Invalid(E.DUPLICATE_INPUT)),
    C("tensor", "dup", "from_voxels duplicates, down",
      lambda: tensor_voxels(positions=DUP, method="down"), Invalid(E.DUPLICATE_INPUT)),
    C("tensor", "off", "from_voxels off-lattice, with_kernel_map",
      lambda: tensor_voxels(positions=OFF), Invalid(E.OFF_LATTICE)),
    C("tensor", "batch", "from_points negative batch",
      lambda: tensor_points(batch=NEG_BATCH), Invalid(E.BAD_BATCH)),
    C("tensor", "batch", "from_voxels negative batch, with_kernel_map",
      lambda: tensor_voxels(batch=NEG_BATCH), Invalid(E.BAD_BATCH)),
    C("tensor", "batch_order", "from_voxels unsorted batch, down",
      lambda: tensor_voxels(batch=UNSORTED, method="down"),
      Ok(lambda t: np.testing.assert_equal(int(t.count), 2))),
    C("tensor", "mask", "from_voxels valid (2,)",
      lambda: tensor_voxels(valid=np.ones(2, bool)),
      Raises(ValueError, "valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype bool shape (2,)")),
    C("tensor", "padding", "from_voxels NaN padding (valid=2), down",
      lambda: tensor_voxels(positions=PADDED, valid=np.int32(2), method="down"),
      Ok(lambda t: np.testing.assert_equal(int(t.count), 1))),

    # -------------------------------------------------------------------- pooling
    C("pool", "shape", "max_pool positions (3, 2)", lambda: max_pool(positions=P[:, :2]),
      Raises(ValueError, "positions must have shape (num_points, 3), got (3, 2)")),
    C("pool", "shape", "global_max_pool feats (3,)", lambda: gpool(feats=F[:, 0]),
      Raises(ValueError, "feats must have shape (n, C) or (B, n, C), got (3,)")),
    C("pool", "dtype", "max_pool positions int32", lambda: max_pool(positions=P.astype(np.int32)),
      Raises(TypeError, "positions must be a floating-point array, got dtype int32")),
    C("pool", "dtype", "avg_pool feats int32", lambda: avg_pool(feats=F.astype(np.int32)),
      Raises(TypeError, "feats must be a floating-point array, got dtype int32 shape (3, 2)")),
    C("pool", "dtype", "global_avg_pool feats int32", lambda: gpool("avg", feats=F.astype(int)),
      Raises(TypeError, "feats must be a floating-point array, got dtype int")),
    C("pool", "nan_pos", "max_pool NaN position", lambda: max_pool(positions=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("pool", "nan_val", "max_pool NaN feature", lambda: max_pool(feats=nan_row(F)),
      Ok(first_row_nan, "NaN/inf out")),
    C("pool", "nan_val", "global_avg_pool inf feature",
      lambda: gpool("avg", feats=nan_row(F, value=np.inf)),
      Ok(lambda y: np.testing.assert_(not np.isfinite(y[0])), "NaN/inf out")),
    C("pool", "empty_pts", "max_pool 0 points",
      lambda: max_pool(feats=F[:0], positions=EMPTY),
      Ok(lambda o: np.testing.assert_equal((o[0].shape, int(o[2])), ((0, 2), 0)), EMPTY_OK)),
    C("pool", "empty_pts", "global_max_pool 0 rows", lambda: gpool(feats=F[:0]),
      Ok(zeros(2), "ok (zeros)")),
    C("pool", "empty_pts", "global_avg_pool 0 rows, 2 clouds",
      lambda: gpool("avg", feats=F[:0], batch=BATCH[:0], num_clouds=2),
      Ok(zeros(2, 2), "ok (zeros)")),
    C("pool", "empty_out", "out_capacity 1 for 3 outputs",
      lambda: avg_pool(kernel_size=1, out_capacity=1), Invalid(E.CAPACITY_OVERFLOW)),
    C("pool", "empty_ch", "avg_pool 0 channels", lambda: avg_pool(feats=F[:, :0]),
      Ok(lambda o: np.testing.assert_equal(o[0].shape, (3, 0)), EMPTY_OK)),
    C("pool", "lengths", "max_pool feats 2 rows", lambda: max_pool(feats=F[:2]),
      Raises(ValueError, "feats must have shape (3, C), got (2, 2)")),
    C("pool", "lengths", "global_max_pool batch (2,)",
      lambda: gpool(batch=BATCH[:2], num_clouds=2),
      Raises(ValueError, "batch must be an integer array of shape (3,), got dtype int32 "
                         "shape (2,)")),
    C("pool", "vs_value", "max_pool voxel_size 0", lambda: max_pool(voxel_size=0.0),
      Raises(ValueError, VS_MSG + " 0.0")),
    C("pool", "vs_arg", "avg_pool voxel_size (3,)",
      lambda: avg_pool(voxel_size=np.ones(3, np.float32)),
      Raises(ValueError, "voxel_size must be a scalar, got shape (3,)")),
    C("pool", "vs_traced", "max_pool traced voxel_size -1",
      lambda: max_pool(voxel_size=np.asarray(-1.0, np.float32)),
      Raises(ValueError, VS_MSG + " -1.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("pool", "range", "max_pool 2**20 apart", lambda: max_pool(positions=FAR),
      Invalid(E.OUT_OF_RANGE)),
    C("pool", "dup", "max_pool duplicated voxel", lambda: max_pool(positions=DUP),
      Invalid(E.DUPLICATE_INPUT)),
    C("pool", "off", "avg_pool off-lattice", lambda: avg_pool(positions=OFF),
      Invalid(E.OFF_LATTICE)),
    C("pool", "batch", "max_pool negative batch", lambda: max_pool(batch=NEG_BATCH),
      Invalid(E.BAD_BATCH)),
    C("pool", "batch", "global_max_pool negative batch",
      lambda: gpool(batch=NEG_BATCH, num_clouds=2), Invalid(E.BAD_BATCH)),
    C("pool", "batch", "global_avg_pool batch >= num_clouds",
      lambda: gpool("avg", batch=np.array([0, 1, 2], np.int32), num_clouds=2),
      Invalid(E.BAD_BATCH)),
    C("pool", "batch", "global_max_pool float batch",
      lambda: gpool(batch=BATCH * 1.0, num_clouds=2),
      Raises(ValueError, "batch must be an integer array of shape (3,), got dtype float")),
    C("pool", "batch_order", "max_pool unsorted batch",
      lambda: max_pool(batch=UNSORTED), Ok(lambda o: np.testing.assert_equal(int(o[3]), 2))),
    C("pool", "mask", "max_pool valid (2,)", lambda: max_pool(valid=np.ones(2, bool)),
      Raises(ValueError, "valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype bool shape (2,)")),
    C("pool", "mask", "global_avg_pool valid counts (2,) for (3, C)",
      lambda: gpool("avg", valid=np.array([1, 2], np.int32)),
      Raises(ValueError, "valid must be an integer count or a bool mask of shape (3,), got "
                         "dtype int32 shape (2,)")),
    C("pool", "padding", "max_pool NaN padded rows (valid=2)",
      lambda: max_pool(positions=PADDED, valid=np.int32(2)), Ok(rows_finite(1))),
    C("pool", "static", "kernel_size 0", lambda: max_pool(kernel_size=0),
      Raises(ValueError, "kernel_size must be a positive int, got 0")),
    C("pool", "static", "global_max_pool batch without num_clouds",
      lambda: gpool(batch=BATCH), Raises(ValueError, "num_clouds (static, >= 1) is required")),

    # ----------------------------------------------------------------------- Linen
    C("linen", "shape", "SparseConv feats (3,)", lambda: linen_conv(feats=F[:, 0]),
      Raises(ValueError, "feats must have rank 2, got shape (3,)")),
    C("linen", "dtype", "SparseConv in_pos int32",
      lambda: linen_conv(inp_positions=P.astype(np.int32)),
      Raises(TypeError, "in_pos must be a floating-point array, got dtype int32")),
    C("linen", "nan_pos", "SparseConv NaN position", lambda: linen_conv(inp_positions=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("linen", "nan_val", "SparseConv NaN importance",
      lambda: linen_conv(inp_importance=np.full(3, np.nan, np.float32)), NaNs),
    C("linen", "empty_pts", "SparseConv 0 inputs",
      lambda: linen_conv(feats=F[:0], inp_positions=EMPTY), Ok(zeros(3, 4), "ok (bias)")),
    C("linen", "empty_out", "SparseConvTranspose 0 outputs",
      lambda: linen_conv(kind="conv_t", out_positions=EMPTY), Ok(shape(0, 4), EMPTY_OK)),
    C("linen", "lengths", "SparseConv feats 4 rows",
      lambda: linen_conv(feats=np.ones((4, 2), np.float32)),
      Raises(ValueError, "feats has 4 rows but in_pos has 3")),
    C("linen", "vs_traced", "SparseConv traced voxel_size 0",
      lambda: linen_conv(voxel_size=np.asarray(0.0, np.float32)),
      Raises(ValueError, VS_MSG + " 0.0"), Invalid(E.BAD_VOXEL_SIZE)),
    C("linen", "dup", "SubMConv on duplicated voxels", lambda: linen_subm(positions=DUP),
      Invalid(E.DUPLICATE_INPUT)),
    C("linen", "off", "SparseConvTranspose off-lattice outputs",
      lambda: linen_conv(kind="conv_t", out_positions=OFF), Invalid(E.OFF_LATTICE)),
    C("linen", "padding", "SubMConv NaN padding (valid=2)",
      lambda: linen_subm(positions=PADDED, valid=np.int32(2)), Ok(rows_finite(3))),
    C("linen", "params", "feats of 3 channels for Cin=2 params",
      lambda: linen_conv(feats=np.ones((3, 3), np.float32)),
      Raises(ValueError, "kernel (3, 3, 3, 2, 4)")),
    C("linen", "params", "missing bias", lambda: linen_params(lambda p: {"kernel": p["kernel"]}),
      Raises(ValueError, "SparseConv: params has no entry 'bias'")),
    C("linen", "params", "extra entry",
      lambda: linen_params(lambda p: {**p, "extra": np.ones(2, np.float32)}),
      Raises(ValueError, "SparseConv: params has unknown entries ['extra']")),
    C("linen", "params", "int kernel",
      lambda: linen_params(lambda p: {**p, "kernel": p["kernel"].astype(np.int32)}),
      Raises(TypeError, "SparseConv: params['kernel'] must be floating-point, got dtype int32 "
                        "shape (3, 3, 3, 2, 4)")),
    C("linen", "params", "kernel of another shape",
      lambda: linen_params(lambda p: {**p, "kernel": p["kernel"][:, :, :2]}),
      Raises(ValueError, "(3, 3, 2, 2, 4)")),

    # ------------------------------------------------------------------------- NNX
    C("nnx", "shape", "SparseConv feats (3,)", lambda: nnx_conv(feats=F[:, 0]),
      Raises(ValueError, "in_channels=2 but feats has shape (3,)")),
    C("nnx", "dtype", "SparseConv out_pos complex",
      lambda: nnx_conv(out_positions=P.astype(np.complex64)),
      Raises(TypeError, "out_pos must be a floating-point array, got dtype complex64")),
    C("nnx", "nan_pos", "SubMConv NaN position", lambda: nnx_level(positions=nan_row()),
      Invalid(E.NONFINITE_POSITION)),
    C("nnx", "empty_pts", "SubMConv 0 points",
      lambda: nnx_level(positions=EMPTY, feats=F[:0]), Ok(shape(0, 4), EMPTY_OK)),
    C("nnx", "empty_out", "SparseConv 0 outputs", lambda: nnx_conv(out_positions=EMPTY),
      Ok(shape(0, 4), EMPTY_OK)),
    C("nnx", "lengths", "SparseConvTranspose out_importance (2,)",
      lambda: nnx_conv(kind="conv_t", out_importance=np.ones(2, np.float32)),
      Raises(ValueError, "out_importance must have shape (3,), got (2,)")),
    C("nnx", "vs_traced", "DownConv traced voxel_size NaN",
      lambda: nnx_level("down", voxel_size=np.asarray(np.nan, np.float32)),
      Raises(ValueError, VS_MSG + " nan"), Invalid(E.BAD_VOXEL_SIZE)),
    C("nnx", "dup", "DownConv on duplicated voxels", lambda: nnx_level("down", positions=DUP),
      Invalid(E.DUPLICATE_INPUT)),
    C("nnx", "off", "SparseConv off-lattice", lambda: nnx_conv(inp_positions=OFF),
      Invalid(E.OFF_LATTICE)),
    C("nnx", "padding", "SubMConv NaN padding (valid=2)",
      lambda: nnx_level(positions=PADDED, valid=np.int32(2)), Ok(rows_finite(3))),
    C("nnx", "params", "feats of 3 channels for in_channels=2",
      lambda: nnx_conv(feats=np.ones((3, 3), np.float32)),
      Raises(ValueError, "in_channels=2 but feats has shape (3, 3)")),
    C("nnx", "params", "int kernel", nnx_params(lambda k: k.astype(np.int32)),
      Raises(TypeError, "SparseConv: params['kernel'] must be floating-point, got dtype int32 "
                        "shape (3, 3, 3, 2, 4)")),
    C("nnx", "params", "kernel of another shape", nnx_params(lambda k: k[:2]),
      Raises(ValueError, "SparseConv: params['kernel'] must have shape (3, 3, 3, 2, 4), got "
                         "(2, 3, 3, 2, 4)")),

    # ------------------------------------------------------------- SparseConvUnet
    C("unet", "shape", "points (4, 2)", lambda: unet(points=UNET_PTS[:, :2]),
      Raises(ValueError, "points must have 3 coordinates, got shape (1, 4, 2)")),
    C("unet", "lengths", "feats of 2 channels",
      lambda: unet(feats=UNET_FEATS[:, :2]),
      Raises(ValueError, "feats must have shape (1, 4, 3) (in_channels=3), got (1, 4, 2)")),
    C("unet", "nan_pos", "a NaN point", lambda: unet(points=nan_row(UNET_PTS)),
      Invalid(E.NONFINITE_POSITION)),
    C("unet", "mask", "valid mask (3,)", lambda: unet(valid=np.ones(3, bool)),
      Raises(ValueError, "valid must be an integer count or a bool mask of shape (4,), got "
                         "dtype bool shape (3,)")),
    C("unet", "batch", "batch (3,)", lambda: unet(batch=np.zeros(3, np.int32)),
      Raises(ValueError, "batch must be int (4,), got int32 (3,)")),
    C("unet", "padding", "NaN padded point (valid=3)",
      lambda: unet(points=nan_row(UNET_PTS, row=3), valid=np.int32(3)),
      Ok(lambda y: np.testing.assert_(np.all(np.isfinite(y[:3])))), jit_run=False),
]


def by_id() -> dict[str, Case]:
  cases = {c.id: c for c in CASES}
  assert len(cases) == len(CASES), "case ids must be unique"
  return cases
