"""Malformed and extreme calls to every FFI handler of the host build, through
``jax.ffi.ffi_call`` (run by tests/test_ffi_fuzz.py in a subprocess, so that a crash fails the
test instead of killing it).

Each case is either "error" (a malformed call: the handler, or the binding's dtype check,
must raise) or "ok" (well formed but extreme: out-of-range or negative neighbour indices,
zero sizes, huge coordinates, batch ids or slot offsets: the result must equal a NumPy
reference, where an index outside ``[0, N)`` is "no neighbour"). Then a random fuzz of the
conv handlers' index values and sizes against the NumPy reference.

``python fuzz_ffi.py SEED ITERATIONS`` prints one line per failing case and exits 1 if any.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # float64 arguments stay float64

import jax_sparseconv  # noqa: F401  (registers the handlers)
from jax_sparseconv._src import ffi

I32_MIN, I32_MAX = -2**31, 2**31 - 1
F32, F64, F16, I32, U32, BOOL = (jnp.float32, jnp.float64, jnp.float16, jnp.int32, jnp.uint32,
                                 jnp.bool_)
failures: list[str] = []
counts = {"error": 0, "ok": 0}


def call(target, results, *args, attrs=None):
  types = [jax.ShapeDtypeStruct(s, d) for s, d in results]
  out = jax.ffi.ffi_call(target, types if len(types) > 1 else types[0])(*args, **(attrs or {}))
  out = jax.block_until_ready(out)
  return [np.asarray(o) for o in out] if len(types) > 1 else [np.asarray(out)]


def expect_error(name, target, results, *args, attrs=None):
  counts["error"] += 1
  try:
    call(target, results, *args, attrs=attrs)
  except Exception:  # noqa: BLE001 - any error is the expected outcome
    return
  failures.append(f"{name}: {target} accepted a malformed call")


def expect_ok(name, target, results, want, *args, attrs=None):
  counts["ok"] += 1
  try:
    got = call(target, results, *args, attrs=attrs)
  except Exception as e:  # noqa: BLE001
    failures.append(f"{name}: {target} raised on a well-formed call: {str(e)[:200]}")
    return
  for g, w in zip(got, want):
    if w is None:
      continue
    if g.shape != np.shape(w) or not np.allclose(g, w, rtol=1e-4, atol=1e-4):
      failures.append(f"{name}: {target} returned a wrong result")
      return


def arr(shape, dtype, rng=None):
  rng = rng or np.random.default_rng(0)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.asarray(rng.standard_normal(shape), dtype)
  if dtype == BOOL:
    return jnp.ones(shape, BOOL)
  return jnp.zeros(shape, dtype)


# ---------------------------------------------------------------- references
def gm_ref(x, w, nbr):
  x, w, nbr = (np.asarray(a) for a in (x, w, nbr))
  n = x.shape[0]
  y = np.zeros((nbr.shape[0], w.shape[2]), np.float64)
  for m in range(nbr.shape[0]):
    for s in range(nbr.shape[1]):
      j = int(nbr[m, s])
      if 0 <= j < n:
        y[m] += x[j].astype(np.float64) @ w[s].astype(np.float64)
  return y


def kg_ref(x, ct, nbr):
  x, ct, nbr = (np.asarray(a) for a in (x, ct, nbr))
  n = x.shape[0]
  dw = np.zeros((nbr.shape[1], x.shape[1], ct.shape[1]), np.float64)
  for m in range(nbr.shape[0]):
    for s in range(nbr.shape[1]):
      j = int(nbr[m, s])
      if 0 <= j < n:
        dw[s] += np.outer(x[j], ct[m])
  return dw


def parts(m, s, cin, cout):
  return ffi.num_partitions(m, s, cin, cout) if s else 1  # (num_partitions divides by s)


# ---------------------------------------------------------------- the conv handlers
def conv_cases():
  rng = np.random.default_rng(1)
  n, m, s, cin, cout = 7, 5, 3, 4, 6
  x, w, ct = arr((n, cin), F32, rng), arr((s, cin, cout), F32, rng), arr((m, cout), F32, rng)
  nbr = jnp.asarray(rng.integers(0, n + 1, (m, s)), I32)
  gm_targets = [("jsc_cpu_gather_matmul", False), ("jsc_gather_matmul", True)]
  for target, host in gm_targets:
    y = ((m, cout), F32)
    expect_ok("gm well formed", target, [y], [gm_ref(x, w, nbr)], x, w, nbr)
    for name, args, res in [
        ("x rank 1", (x.reshape(-1), w, nbr), [y]),
        ("x rank 3", (x[None], w, nbr), [y]),
        ("w rank 2", (x, w.reshape(s, -1), nbr), [y]),
        ("nbr rank 1", (x, w, nbr.reshape(-1)), [y]),
        ("nbr rank 3", (x, w, nbr[None]), [y]),
        ("Cin mismatch", (x[:, :3], w, nbr), [y]),
        ("S mismatch", (x, w[:2], nbr), [y]),
        ("y rows", (x, w, nbr), [((m + 1, cout), F32)]),
        ("y cols", (x, w, nbr), [((m, cout - 1), F32)]),
        ("y rank 3", (x, w, nbr), [((1, m, cout), F32)]),
        ("y scalar", (x, w, nbr), [((), F32)]),
        ("nbr int64-like: uint32", (x, w, nbr.astype(U32)), [y]),
        ("nbr float", (x, w, nbr.astype(F32)), [y]),
        ("x int", (x.astype(I32), w, nbr), [y]),
        ("w half, x float", (x, w.astype(F16), nbr), [y]),
        ("y half", (x, w, nbr), [((m, cout), F16)]),
        ("x bool", (jnp.ones((n, cin), BOOL), w, nbr), [y]),
        ("huge Cin (0 elements)", (jnp.zeros((0, 2**31), F32), jnp.zeros((0, 2**31, cout), F32),
                                   jnp.zeros((m, 0), I32)), [y]),
    ]:
      expect_error(f"gm {name}", target, res, *args)
    if not host:  # the native kernels are float32 only
      expect_error("gm float64", target, [((m, cout), F64)], x.astype(F64), w.astype(F64), nbr)
    # (a huge S needs M = 0: then every result is empty and XLA never calls the handler)
    # out-of-range and negative indices: "no neighbour", never read
    for name, bad in [("negative", -1), ("N", n), ("N + 1", n + 1), ("int32 max", I32_MAX),
                      ("int32 min", I32_MIN), ("-N", -n)]:
      b = np.array(nbr)
      b[::2, 1] = bad
      expect_ok(f"gm index {name}", target, [y], [gm_ref(x, w, b)], x, w, jnp.asarray(b))
    # zero sizes
    for name, (n0, m0, s0, c0, o0) in [("N=0", (0, m, s, cin, cout)), ("M=0", (n, 0, s, cin, cout)),
                                       ("S=0", (n, m, 0, cin, cout)), ("Cin=0", (n, m, s, 0, cout)),
                                       ("Cout=0", (n, m, s, cin, 0)), ("all 0", (0, 0, 0, 0, 0))]:
      xx, ww = arr((n0, c0), F32, rng), arr((s0, c0, o0), F32, rng)
      bb = jnp.asarray(rng.integers(-2, n0 + 2, (m0, s0)), I32)
      expect_ok(f"gm {name}", target, [((m0, o0), F32)], [gm_ref(xx, ww, bb)], xx, ww, bb)

  for target, host in [("jsc_cpu_weight_grad", False), ("jsc_weight_grad", True)]:
    p = parts(m, s, cin, cout)
    dw = ((s, cin, cout), F32)
    res = [dw, ((p, s, cin, cout), F32)] if host else [dw]
    expect_ok("kg well formed", target, res, [kg_ref(x, ct, nbr)], x, ct, nbr)
    bad_results = [
        ("dw shape", [((s, cin, cout + 1), F32)] + res[1:]),
        ("dw rank", [((s * cin, cout), F32)] + res[1:]),
        ("dw dtype", [((s, cin, cout), F16)] + res[1:]),
    ]
    if host:
      bad_results += [
          ("part P=0", [dw, ((0, s, cin, cout), F32)]),
          ("part shape", [dw, ((p, s, cin + 1, cout), F32)]),
          ("part rank", [dw, ((s, cin, cout), F32)]),
          ("part dtype", [dw, ((p, s, cin, cout), F16)]),
          ("part over the grid limit", [dw, ((65536 // s + 1, s, cin, cout), F32)]),
      ]
    for name, r in bad_results:
      expect_error(f"kg {name}", target, r, x, ct, nbr)
    for name, args in [
        ("x rank 1", (x.reshape(-1), ct, nbr)), ("ct rank 3", (x, ct[None], nbr)),
        ("M mismatch", (x, ct[:4], nbr)), ("nbr rank 1", (x, ct, nbr.reshape(-1))),
        ("ct dtype", (x, ct.astype(F16), nbr)), ("nbr dtype", (x, ct, nbr.astype(U32))),
        ("x int", (x.astype(I32), ct, nbr)),
        ("huge Cin (0 elements)", (jnp.zeros((0, 2**31 + 1), F32), jnp.zeros((0, cout), F32),
                                   jnp.zeros((0, 1), I32))),
    ]:
      r = res
      if name.startswith("huge"):
        r = [((1, 2**31 + 1, cout), F32)] + ([((1, 1, 2**31 + 1, cout), F32)] if host else [])
      expect_error(f"kg {name}", target, r, *args)
    for name, bad in [("negative", -1), ("N", n), ("int32 max", I32_MAX), ("int32 min", I32_MIN)]:
      b = np.array(nbr)
      b[1::2, 0] = bad
      expect_ok(f"kg index {name}", target, res, [kg_ref(x, ct, b)], x, ct, jnp.asarray(b))
    for name, (n0, m0, s0, c0, o0) in [("N=0", (0, m, s, cin, cout)), ("M=0", (n, 0, s, cin, cout)),
                                       ("S=0", (n, m, 0, cin, cout)), ("Cin=0", (n, m, s, 0, cout)),
                                       ("Cout=0", (n, m, s, cin, 0))]:
      xx, cc = arr((n0, c0), F32, rng), arr((m0, o0), F32, rng)
      bb = jnp.asarray(rng.integers(-2, n0 + 2, (m0, s0)), I32)
      r = [((s0, c0, o0), F32)]
      if host:
        r.append(((max(1, parts(m0, s0, c0, o0)), s0, c0, o0), F32))
      expect_ok(f"kg {name}", target, r, [kg_ref(xx, cc, bb)], xx, cc, bb)


def conv_random(seed, iterations):
  """Random sizes (zeros included) and index values anywhere in int32."""
  rng = np.random.default_rng(seed)
  for it in range(iterations):
    n, m, s, cin, cout = (int(v) for v in rng.integers(0, 6, 5))
    x, w = arr((n, cin), F32, rng), arr((s, cin, cout), F32, rng)
    ct = arr((m, cout), F32, rng)
    pick = rng.integers(0, 4, (m, s))
    nbr = np.where(pick == 0, rng.integers(I32_MIN, I32_MAX, (m, s), endpoint=True),
                   np.where(pick == 1, rng.integers(-3, n + 3, (m, s)),
                            rng.integers(0, max(n, 1), (m, s))))
    nbr = jnp.asarray(nbr.astype(np.int32))
    target = ["jsc_cpu_gather_matmul", "jsc_gather_matmul", "jsc_cpu_weight_grad",
              "jsc_weight_grad"][it % 4]
    if "gather" in target:
      expect_ok(f"random gm {it}", target, [((m, cout), F32)], [gm_ref(x, w, nbr)], x, w, nbr)
    else:
      r = [((s, cin, cout), F32)]
      if target == "jsc_weight_grad":
        r.append(((max(1, parts(m, s, cin, cout)), s, cin, cout), F32))
      expect_ok(f"random kg {it}", target, r, [kg_ref(x, ct, nbr)], x, ct, nbr)


# ---------------------------------------------------------------- the search handlers
def search_cases():
  rng = np.random.default_rng(2)
  # sort_keys: (top, hi, lo) -> (top, hi, lo, perm)
  top = jnp.asarray(rng.integers(0, 3, 9).astype(np.uint32))
  hi = jnp.asarray(rng.integers(0, 2**32, 9, dtype=np.uint64).astype(np.uint32))
  lo = jnp.asarray(rng.integers(0, 2**32, 9, dtype=np.uint64).astype(np.uint32))
  order = np.lexsort((np.arange(9), np.asarray(lo), np.asarray(hi), np.asarray(top)))
  good = [((9,), U32)] * 3 + [((9,), I32)]
  expect_ok("sort well formed", "jsc_cpu_sort_keys", good,
            [np.asarray(top)[order], np.asarray(hi)[order], np.asarray(lo)[order], order],
            top, hi, lo)
  expect_ok("sort empty", "jsc_cpu_sort_keys", [((0,), U32)] * 3 + [((0,), I32)],
            [None] * 4, top[:0], hi[:0], lo[:0])
  expect_ok("sort batch axis 0", "jsc_cpu_sort_keys", [((0, 4), U32)] * 3 + [((0, 4), I32)],
            [None] * 4, *[jnp.zeros((0, 4), U32)] * 3)
  for name, args, res in [
      ("lo length", (top, hi, lo[:8]), good), ("top length", (top[:8], hi, lo), good),
      ("hi rank 0", (top, hi[0], lo), good),
      ("perm length", (top, hi, lo), good[:3] + [((8,), I32)]),
      ("perm dtype", (top, hi, lo), good[:3] + [((9,), U32)]),
      ("hi_out batch axis", (top, hi, lo), good[:1] + [((1, 9), U32)] + good[2:]),
      ("hi int32", (top, hi.astype(I32), lo), good), ("lo float", (top, hi, lo.astype(F32)), good),
      ("top int32", (top.astype(I32), hi, lo), good),
  ]:
    expect_error(f"sort {name}", "jsc_cpu_sort_keys", res, *args)

  # generate: coords (N, 3), valid (N,), batch (N,) -> out (C, 3), out_b (C,), inverse (N, S),
  # neighbors (C, S), unique (), count (), flags (); attributes rule, kernel, stride, padding, dilation, shape (3 each)
  def gen_attrs(rule=2, kernel=(1, 1, 1), stride=(2, 2, 2), padding=(0, 0, 0),
                dilation=(1, 1, 1), shape=(-1, -1, -1)):
    return {"rule": np.int64(rule), **{k: np.asarray(v, np.int64) for k, v in (
        ("kernel", kernel), ("stride", stride), ("padding", padding), ("dilation", dilation),
        ("shape", shape))}}

  gc = jnp.asarray([[2, 1, 0], [0, 0, 0], [3, 1, 1], [5, 5, 5]], I32)
  gv, gb = jnp.asarray([True, True, True, False]), jnp.zeros(4, I32)
  good = [((3, 3), I32), ((3,), I32), ((4, 1), I32), ((3, 1), I32), ((), BOOL), ((), I32),
          ((), I32)]
  floor = gen_attrs()  # floor(x / 2): [1, 0, 0], [0, 0, 0], [1, 0, 0]
  # (inputs 0 and 2 share output 1's one slot: the later input wins, not unique)
  expect_ok("generate floor", "jsc_cpu_generate", good,
            [np.asarray([[0, 0, 0], [1, 0, 0], [0, 0, 0]]), np.zeros(3),
             np.asarray([[1], [0], [1], [3]]), np.asarray([[1], [2], [4]]), np.asarray(False),
             np.asarray(2), np.asarray(0)], gc, gv, gb, attrs=floor)
  expect_ok("generate empty", "jsc_cpu_generate",
            [((0, 3), I32), ((0,), I32), ((0, 1), I32), ((0, 1), I32), ((), BOOL), ((), I32),
             ((), I32)], [None] * 4 + [np.asarray(True), None, None],
            gc[:0], gv[:0], gb[:0], attrs=floor)
  expect_ok("generate capacity 1", "jsc_cpu_generate",
            [((1, 3), I32), ((1,), I32), ((4, 1), I32), ((1, 1), I32), ((), BOOL), ((), I32),
             ((), I32)],
            [np.asarray([[0, 0, 0]]), np.zeros(1), np.asarray([[1], [0], [1], [1]]),
             np.asarray([[1]]), np.asarray(True), np.asarray(1), np.asarray(64)], gc, gv, gb,
            attrs=floor)
  # transposed, kernel (2, 1, 1), stride (2, 1, 1): [1, 0, 0] reaches [2, 0, 0] and [3, 0, 0]
  expect_ok("generate transpose", "jsc_cpu_generate",
            [((2, 3), I32), ((2,), I32), ((1, 2), I32), ((2, 2), I32), ((), BOOL), ((), I32),
             ((), I32)],
            [np.asarray([[2, 0, 0], [3, 0, 0]]), np.zeros(2), np.asarray([[0, 1]]),
             np.asarray([[0, 1], [1, 0]]), np.asarray(True), np.asarray(2), np.asarray(0)],
            gc[:1] - jnp.asarray([[1, 1, 0]], I32), gv[:1], gb[:1],
            attrs=gen_attrs(1, (2, 1, 1), (2, 1, 1)))
  # conv, kernel 3, stride 2, padding 1, clipped to a (1, 1, 1) grid: only [0, 0, 0] stays
  expect_ok("generate conv clipped", "jsc_cpu_generate",
            [((2, 3), I32), ((2,), I32), ((4, 27), I32), ((2, 27), I32), ((), BOOL), ((), I32),
             ((), I32)],
            [np.zeros((2, 3)), np.zeros(2), None, None, None, np.asarray(1), np.asarray(0)],
            gc, gv, gb, attrs=gen_attrs(0, (3, 3, 3), (2, 2, 2), (1, 1, 1), shape=(1, 1, 1)))
  for name, args, res, at in [
      ("valid length", (gc, gv[:3], gb), good, floor),
      ("batch length", (gc, gv, gb[:3]), good, floor),
      ("coords width", (gc[:, :2], gv, gb), good, floor),
      ("coords float", (gc.astype(F32), gv, gb), good, floor),
      ("valid int32", (gc, gv.astype(I32), gb), good, floor),
      ("inverse rows", (gc, gv, gb), good[:2] + [((3, 1), I32)] + good[3:], floor),
      ("inverse slots", (gc, gv, gb), good[:2] + [((4, 2), I32)] + good[3:], floor),
      ("out width", (gc, gv, gb), [((3, 2), I32)] + good[1:], floor),
      ("out_b length", (gc, gv, gb), good[:1] + [((2,), I32)] + good[2:], floor),
      ("neighbors rows", (gc, gv, gb), good[:3] + [((4, 1), I32)] + good[4:], floor),
      ("neighbors slots", (gc, gv, gb), good[:3] + [((3, 2), I32)] + good[4:], floor),
      ("unique int32", (gc, gv, gb), good[:4] + [((), I32)] + good[5:], floor),
      ("count rank", (gc, gv, gb), good[:5] + [((1,), I32)] + good[6:], floor),
      ("rule 3", (gc, gv, gb), good, gen_attrs(3)),
      ("rule -1", (gc, gv, gb), good, gen_attrs(-1)),
      ("kernel 0", (gc, gv, gb), good, gen_attrs(kernel=(0, 1, 1))),
      ("kernel 65", (gc, gv, gb), good, gen_attrs(kernel=(65, 1, 1))),
      ("stride 0", (gc, gv, gb), good, gen_attrs(stride=(0, 2, 2))),
      ("stride 1025", (gc, gv, gb), good, gen_attrs(stride=(1025, 2, 2))),
      ("dilation 0", (gc, gv, gb), good, gen_attrs(dilation=(1, 0, 1))),
      ("two-value kernel", (gc, gv, gb), good, gen_attrs(kernel=(1, 1))),
      ("slots not the kernel's", (gc, gv, gb), good, gen_attrs(0, (3, 3, 3))),
      ("no attributes", (gc, gv, gb), good, None),
  ]:
    expect_error(f"generate {name}", "jsc_cpu_generate", res, *args, attrs=at)

  # invert
  n, m, s = 6, 5, 4
  nbr = np.array(rng.integers(-3, n + 3, (m, s)), np.int32)
  nbr[0, 0], nbr[1, 1], nbr[2, 2] = I32_MAX, I32_MIN, -1

  def inv_ref(nbr, n):
    inv = np.full((n, nbr.shape[1]), nbr.shape[0], np.int32)
    uniq = True
    for r in range(nbr.shape[0]):
      for sl in range(nbr.shape[1]):
        j = nbr[r, sl]
        if 0 <= j < n:
          uniq &= inv[j, sl] == nbr.shape[0]
          inv[j, sl] = r
    return inv, np.bool_(uniq)

  expect_ok("invert extreme indices", "jsc_cpu_invert", [((n, s), I32), ((), BOOL)],
            list(inv_ref(nbr, n)), jnp.asarray(nbr))
  for name, args, res in [
      ("inv S", (jnp.asarray(nbr),), [((n, s + 1), I32), ((), BOOL)]),
      ("inv rank", (jnp.asarray(nbr),), [((n * s,), I32), ((), BOOL)]),
      ("unique shape", (jnp.asarray(nbr),), [((n, s), I32), ((1,), BOOL)]),
      ("nbr rank 1", (jnp.asarray(nbr).reshape(-1),), [((n, s), I32), ((), BOOL)]),
      ("nbr float", (jnp.asarray(nbr, F32),), [((n, s), I32), ((), BOOL)]),
      ("inv dtype", (jnp.asarray(nbr),), [((n, s), U32), ((), BOOL)]),
      ("batch axes differ", (jnp.asarray(nbr)[None],), [((2, n, s), I32), ((2,), BOOL)]),
  ]:
    expect_error(f"invert {name}", "jsc_cpu_invert", res, *args)
  expect_ok("invert zero sizes", "jsc_cpu_invert", [((0, s), I32), ((), BOOL)], [None, None],
            jnp.asarray(nbr))
  expect_ok("invert M=0", "jsc_cpu_invert", [((n, s), I32), ((), BOOL)],
            [np.zeros((n, s), np.int32), np.bool_(True)], jnp.zeros((0, s), I32))

  # neighbors: extreme coordinates, batch ids and slot offsets are well formed
  coords = np.array([[0, 0, 0], [1, 0, 0], [2**21 - 1, 5, 5], [I32_MAX, 0, 0], [-1, 0, 0],
                     [I32_MIN, I32_MIN, I32_MIN], [3, 3, 3]], np.int32)
  batch = np.array([0, 0, 0, 0, 0, I32_MIN, I32_MAX], np.int32)
  valid = np.ones(7, bool)
  deltas = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [I32_MAX, 0, 0], [I32_MIN, 0, 0],
                     [2**21, 0, 0], [-2**21 + 1, -5, -5], [0, 0, -2**30]], np.int32)

  def nbr_ref(c_in, b_in, v_in, c_out, b_out, v_out, d):
    table = {}
    for j in range(len(c_in)):
      if v_in[j] and np.all((c_in[j] >= 0) & (c_in[j] < 2**21)):
        table.setdefault((*c_in[j].tolist(), int(b_in[j])), j)
    out = np.full((len(c_out), len(d)), len(c_in), np.int32)
    for i in range(len(c_out)):
      if not v_out[i]:
        continue
      for k in range(len(d)):
        q = c_out[i].astype(np.int64) + d[k]
        if np.all((q >= 0) & (q < 2**21)):
          out[i, k] = table.get((*q.tolist(), int(b_out[i])), len(c_in))
    return out

  args = [jnp.asarray(a) for a in (coords, batch, valid, coords, batch, valid, deltas)]
  expect_ok("neighbors extreme values", "jsc_cpu_neighbors", [((7, 8), I32), ((), BOOL)],
            [nbr_ref(coords, batch, valid, coords, batch, valid, deltas), np.bool_(False)],
            *args)
  far = np.repeat(np.array([[0, 0, 0], [2**20, 2**20, 2**20]], np.int32), 1, 0)
  wide = np.array([[dx, dy, dz] for dx in (-2**20, 0, 2**20) for dy in (-1, 0, 2**20)
                   for dz in (0, 2**20)], np.int32)  # slots spread beyond the tabulated plan
  a2 = [jnp.asarray(a) for a in (far, np.zeros(2, np.int32), np.ones(2, bool), far,
                                 np.zeros(2, np.int32), np.ones(2, bool), wide)]
  expect_ok("neighbors far deltas", "jsc_cpu_neighbors", [((2, len(wide)), I32), ((), BOOL)],
            [nbr_ref(far, np.zeros(2), np.ones(2, bool), far, np.zeros(2), np.ones(2, bool),
                     wide), np.bool_(False)], *a2)
  empty = [jnp.zeros((0, 3), I32), jnp.zeros((0,), I32), jnp.zeros((0,), BOOL)]
  expect_ok("neighbors N=0", "jsc_cpu_neighbors", [((7, 8), I32), ((), BOOL)],
            [np.zeros((7, 8), np.int32), np.bool_(False)], *empty, *args[3:])
  expect_ok("neighbors M=0", "jsc_cpu_neighbors", [((0, 8), I32), ((), BOOL)], [None, None],
            *args[:3], *empty, args[6])
  expect_ok("neighbors S=0", "jsc_cpu_neighbors", [((7, 0), I32), ((), BOOL)], [None, None],
            *args[:6], jnp.zeros((0, 3), I32))
  res = [((7, 8), I32), ((), BOOL)]
  for name, k, bad in [("in_coords float", 0, args[0].astype(F32)),
                       ("in_valid int", 2, args[2].astype(I32)),
                       ("deltas rank 1", 6, args[6].reshape(-1)),
                       ("deltas (S, 4)", 6, jnp.zeros((8, 4), I32)),
                       ("deltas batch axes the rest lack", 6, args[6][None]),
                       ("out_batch uint32", 4, args[4].astype(U32))]:
    a = list(args)
    a[k] = bad
    expect_error(f"neighbors {name}", "jsc_cpu_neighbors", res, *a)
  for name, r in [("neighbors dtype", [((7, 8), U32), ((), BOOL)]),
                  ("duplicate dtype", [((7, 8), I32), ((), I32)]),
                  ("neighbors S", [((7, 9), I32), ((), BOOL)])]:
    expect_error(f"neighbors {name}", "jsc_cpu_neighbors", r, *args)


if __name__ == "__main__":
  seed, iterations = int(sys.argv[1]), int(sys.argv[2])
  conv_cases()
  search_cases()
  conv_random(seed, iterations)
  for f in failures:
    print("FAIL", f)
  print(f"{counts['error']} malformed calls, {counts['ok']} extreme well-formed calls, "
        f"{len(failures)} failures")
  sys.exit(1 if failures else 0)
