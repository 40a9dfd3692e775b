"""Property tests (hypothesis) of the neighbour search and the conv, on random lattices.

What the other modules do not cover: random geometry drawn by hypothesis (wide extents up to
the range limit with the kernel's reach, shifted origins, voxel centres vs corners, K 1..5
and non-cubic kernels, custom offsets, transposed maps, strided outputs, padded rows with
garbage, packed clouds in any order), with every map checked against an *integer* brute force
(exact: no float noise at window edges or cell ties) slot by slot, including the kernel cell of
each slot, and the native and jnp searches giving identical tables (neighbours, inverse,
flags). The conv's value and gradients under every kernel backend against a NumPy loop.

Bounded for CI: few examples each, derandomized (the same examples on every run; set
``JSC_HYPOTHESIS_RANDOM=1`` for fresh ones, ``JSC_HYPOTHESIS_SCALE=k`` for k times more).
Each example costs a compilation per backend, so the example counts stay small.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import jax_sparseconv as sc
from jax_sparseconv import reference

from tests.helpers import x64

LIMIT = 2**20  # coordinates span < 2**20 voxels per axis, the kernel's reach included
_SCALE = int(os.environ.get("JSC_HYPOTHESIS_SCALE", "1"))
CI = settings(deadline=None, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: each example compiles
              derandomize=os.environ.get("JSC_HYPOTHESIS_RANDOM") != "1",
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])


def examples(n):
  return settings(CI, max_examples=n * _SCALE)


# ---------------------------------------------------------------- the exact reference
def axis_rule(d, k, o):
  """Open3D's rule on one axis for integer lattice offsets ``d`` (input minus output; the
  transposed map passes output minus input): (inside the window, kernel cell). Offsets are
  drawn as multiples of 1/4, so ``d + o`` is exact and never on the window's edge
  ``0.51 k``; cell ties (``u`` half-integral) round half away from zero."""
  d = np.asarray(d, np.float64)
  inside = np.abs(d + o) <= 0.51 * k
  u = d + o + k // 2 - (0.5 if k % 2 == 0 else 0.0)
  cell = np.clip(np.sign(u) * np.floor(np.abs(u) + 0.5), 0, k - 1).astype(np.int64)
  return inside, cell


def reach(k, o):
  """The largest |d| of a neighbour on one axis."""
  return max(abs(d) for d in range(-3 * k - 3, 3 * k + 4) if abs(d + o) <= 0.51 * k)


def brute_map(q_in, q_out, ks, off, transpose, in_ok=None, out_ok=None, b_in=None, b_out=None):
  """Per output, ``{input: flat kernel cell}`` by the all-pairs integer rule."""
  kz, ky, kx = ks
  d = q_in[None, :, :] - q_out[:, None, :]  # (m, n, xyz)
  if transpose:
    d = -d
  ok = np.ones(d.shape[:2], bool)
  cells = []
  for a, k in enumerate((kx, ky, kz)):
    inside, c = axis_rule(d[..., a], k, off[a])
    ok &= inside
    cells.append(c)
  flat = (cells[2] * ky + cells[1]) * kx + cells[0]
  if in_ok is not None:
    ok &= in_ok[None, :]
  if b_in is not None:
    ok &= b_in[None, :] == b_out[:, None]
  rows = []
  for i in range(len(q_out)):
    if out_ok is not None and not out_ok[i]:
      rows.append({})
    else:
      rows.append({int(j): int(flat[i, j]) for j in np.nonzero(ok[i])[0]})
  return rows


def assert_map_matches(km, expect, n_rows=None, q=None):
  """Slot by slot: every brute-force neighbour exactly once, in a slot of its kernel cell
  and (given ``q = (q_in, q_out)``) of its voxel offset, every other slot the sentinel: the
  brute force then determines the whole table, so backends that pass agree entry by entry."""
  from jax_sparseconv._src.kernel_map import slot_geometry
  nbr = np.asarray(km.neighbors)
  cells = np.asarray(km.slot_cells)
  deltas = slot_geometry(km.kernel_size, km.offset)[0].astype(np.int64)
  if km.transpose:
    deltas = -deltas
  n_rows = len(expect) if n_rows is None else n_rows
  for i in range(n_rows):
    row = nbr[i]
    hit = row < km.num_in
    got = row[hit]
    assert len(set(got.tolist())) == len(got), f"output {i}: an input in two slots"
    assert dict(zip(got.tolist(), cells[hit].tolist())) == expect[i], f"output {i}"
    if q is not None:
      np.testing.assert_array_equal(q[0][got] - q[1][i], deltas[hit], err_msg=f"output {i}")
  assert np.all(nbr[n_rows:] == km.num_in)


# ---------------------------------------------------------------- random lattices
KERNELS = [1, 2, 3, 4, 5, (3, 1, 3), (2, 3, 1), (1, 4, 5), (5, 2, 3)]
QUARTERS = st.integers(-4, 4).map(lambda i: i / 4)  # exact in binary, never a window edge


@st.composite
def geometry(draw):
  ks = draw(st.sampled_from(KERNELS))
  ks = (ks,) * 3 if isinstance(ks, int) else ks
  off = draw(st.none() | st.tuples(QUARTERS, QUARTERS, QUARTERS))
  default = tuple(0.0 if k % 2 else -0.5 for k in ks[::-1])
  return ks, off, (default if off is None else off)


def margin_of(ks, off_xyz):
  return max(reach(k, o) for k, o in zip(ks[::-1], off_xyz))


@st.composite
def lattice(draw, n_max, m_max, margin):
  """Integer input/output coordinates, where they lie (vs, origin, phase), and a layout:
  compact (a few voxels a side), or wide (clusters anywhere in the range, the extreme
  coordinates reached on some axis)."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  layout = draw(st.sampled_from(["compact", "wide", "edge"]))
  span = LIMIT - 1 - 2 * margin  # the widest extent allowed with this kernel's reach
  if layout == "compact":
    ext = draw(st.integers(2, 9))
    cells = rng.choice(ext**3, size=min(n_max + m_max, ext**3), replace=False)
    pts = np.stack(np.unravel_index(cells, (ext,) * 3), 1)
  else:  # clusters of 4^3-voxel boxes; "edge": at both ends of the allowed range
    centres = rng.integers(0, span + 1, size=(draw(st.integers(1, 3)), 3))
    if layout == "edge":
      centres[0] = 0
      centres[-1, draw(st.integers(0, 2))] = span
    pts = centres[rng.integers(0, len(centres), 3 * (n_max + m_max))] + rng.integers(
        -2, 3, size=(3 * (n_max + m_max), 3))
    pts = np.unique(np.clip(pts, 0, span), axis=0)
    rng.shuffle(pts)
    if layout == "edge":  # keep both extremes among the inputs
      lo, hi = np.zeros(3, np.int64), centres[-1].copy()  # distinct: hi has span on an axis
      pts = np.unique(np.concatenate([[lo, hi], pts]), axis=0)
      pts = np.concatenate([[lo, hi], pts[~((pts == lo).all(1) | (pts == hi).all(1))]])
  n = int(draw(st.integers(1, min(n_max, len(pts)))))
  q_in = pts[:n]
  # outputs: some inputs (submanifold) and other points of the lattice near them
  m = int(draw(st.integers(1, m_max)))
  near = pts[rng.integers(0, len(pts), m)] + rng.integers(-1, 2, size=(m, 3))
  q_out = np.where(rng.random((m, 1)) < 0.5, q_in[rng.integers(0, n, m)], near)
  centres_phase = draw(st.booleans())
  if layout == "compact":
    vs = draw(st.sampled_from([0.05, 0.3, 0.7, 1.0]))
    origin = draw(st.floats(-50, 50))
  else:  # exact in float32 (< 2**22 quarter voxels): voxel sizes 2**k, origins k * vs / 4
    q_out = np.clip(q_out, 0, span)
    vs = draw(st.sampled_from([0.125, 0.5, 1.0, 2.0]))
    origin = draw(st.integers(-2**20, 2**20)) * vs / 4
  return q_in.astype(np.int64), q_out.astype(np.int64), vs, origin, centres_phase


def to_positions(q, vs, origin, centres):
  return ((q + (0.5 if centres else 0.0)) * vs + origin).astype(np.float32)


def padded(pos, cap, rng_seed):
  """``pos`` padded to ``cap`` rows of garbage (NaN, huge, off-lattice)."""
  garbage = np.random.default_rng(rng_seed).choice(
      np.array([np.nan, 1e30, 0.123, -7.7], np.float32), size=(cap - len(pos), 3))
  return np.concatenate([pos, garbage]).astype(np.float32)


@pytest.fixture
def backend(request):
  """The kernel backend of a parametrized test (set once per test, so that its examples
  share compiled programs)."""
  previous = sc.set_kernel_backend(request.param)
  yield request.param
  sc.set_kernel_backend(previous)


SEARCH = ["auto", "jnp", "host"]  # native CPU, jnp, and the CUDA hash search through the host shim
# (kernel size, offset, transposed): K 1..5, non-cubic, custom offsets (x, y, z) on quarters
GEOMETRIES = [
    (1, None, False), (3, (0.5, -0.25, 0.0), False), (4, (0.25, -0.5, 0.75), True),
    ((5, 2, 3), (-0.75, 0.25, 0.5), True),
]
B, N_CAP, M_CAP = 4, 40, 32  # lattices per example (vmap), padded capacities


@pytest.mark.parametrize("backend", SEARCH, indirect=True)
@pytest.mark.parametrize("ks,off,transpose", GEOMETRIES, ids=str)
@examples(2)
@given(data=st.data())
def test_search_matches_integer_brute_force(backend, ks, off, transpose, data):
  """Batches of random lattices (compact; wide; reaching both ends of the allowed range),
  each with its own voxel size, origin and phase, padded with garbage rows and built under
  vmap with counts: every table equals the integer brute force slot by slot (so the native
  and jnp searches give identical tables)."""
  ks = (ks,) * 3 if isinstance(ks, int) else ks
  off_xyz = off if off is not None else tuple(0.0 if k % 2 else -0.5 for k in ks[::-1])
  draws = [data.draw(lattice(N_CAP, M_CAP, margin_of(ks, off_xyz))) for _ in range(B)]
  in_pos = np.stack([padded(to_positions(d[0], *d[2:]), N_CAP, i) for i, d in enumerate(draws)])
  out_pos = np.stack([padded(to_positions(d[1], *d[2:]), M_CAP, i) for i, d in enumerate(draws)])
  vs = np.array([d[2] for d in draws], np.float32)
  n = np.array([len(d[0]) for d in draws], np.int32)
  m = np.array([len(d[1]) for d in draws], np.int32)
  build = jax.jit(jax.vmap(lambda p, q, v, n, m: sc.build_kernel_map(
      p, q, v, ks, offset=off, transpose=transpose, in_valid=n, out_valid=m)))
  km = build(in_pos, out_pos, vs, n, m)
  for i, (q_in, q_out, *_) in enumerate(draws):
    one = jax.tree.map(lambda a: a[i], km)
    assert int(one.flags) == 0, one.errors
    assert_map_matches(one, brute_map(q_in, q_out, ks, off_xyz, transpose), m[i], (q_in, q_out))


@pytest.mark.parametrize("ks", [1, 3, (2, 5, 4)])
def test_range_limit_is_exact_with_the_kernels_reach(ks):
  """Points exactly at the widest allowed extent (2**20 - 1 - 2 * reach voxels) are
  found; one voxel more is OUT_OF_RANGE."""
  ks3 = (ks,) * 3 if isinstance(ks, int) else ks
  off = tuple(0.0 if k % 2 else -0.5 for k in ks3[::-1])
  margin = margin_of(ks3, off)
  span = LIMIT - 1 - 2 * margin
  q = np.array([[0, 0, 0], [1, 0, 0], [span, span, span], [span - 1, span, span]])
  km = sc.build_kernel_map(to_positions(q, 1.0, -3.0, True), to_positions(q, 1.0, -3.0, True),
                           1.0, ks)
  assert_map_matches(km, brute_map(q, q, ks3, off, False))
  far = q.copy()
  far[2:, 1] += 1
  with pytest.raises(sc.InvalidInputError, match="span"):
    sc.build_kernel_map(to_positions(far, 1.0, -3.0, True), to_positions(far, 1.0, -3.0, True),
                        1.0, ks)


@pytest.mark.parametrize("vs", [0.3, 0.07, 0.05, 1 / 3])
def test_wide_extent_with_an_awkward_voxel_size_is_on_the_lattice(vs):
  """The README allows 2**20 voxels per axis with x64 disabled. Voxel centres ~2**20 voxels
  apart at voxel sizes that float32 cannot hold exactly: (p - ref) / vs is up to ~0.13 voxel
  off in float32 (the lattice check allows for that rounding), and the map is exact."""
  q = np.array([[0, 0, 0], [1, 0, 0], [1048376, 5, 0], [1048377, 5, 0]])
  pos = to_positions(q, vs, 0.0, True)
  km = sc.build_kernel_map(pos, pos, vs, 3)
  assert_map_matches(km, brute_map(q, q, (3, 3, 3), (0.0, 0.0, 0.0), False))


def test_off_lattice_is_still_caught_near_the_origin():
  """The rounding allowance is in proportion to the coordinates: 0.2 voxel off near the
  origin is OFF_LATTICE."""
  pos = np.array([[0.5, 0.5, 0.5], [1.7, 0.5, 0.5]], np.float32) * 0.3
  with pytest.raises(sc.InvalidInputError, match="lattice"):
    sc.build_kernel_map(pos, pos, 0.3, 3)


@pytest.mark.parametrize("backend", SEARCH, indirect=True)
@examples(3)
@given(seed=st.integers(0, 2**32 - 1), clouds=st.integers(1, 4), wide=st.booleans())
def test_packed_clouds_in_any_order(backend, seed, clouds, wide):
  """Clouds overlapping in space, interleaved in any order with their ids (not sorted, not
  contiguous, with gaps), padded: neighbours only within a cloud, the brute force's."""
  rng = np.random.default_rng(seed)
  ks = (3, 2, 1)
  off = (0.0, -0.5, 0.0)
  span = LIMIT - 1 - 2 * margin_of(ks, off)
  qs, bs = [], []
  for c in range(clouds):
    size = int(rng.integers(1, 21))
    base = rng.integers(0, span - 5, 3) if wide else np.zeros(3, np.int64)
    cells = rng.choice(5**3, size=size, replace=False)
    qs.append(np.stack(np.unravel_index(cells, (5,) * 3), 1) + base)
    bs.append(np.full(size, c * 3 + int(rng.integers(0, 3))))  # ids with gaps
  q, b = np.concatenate(qs), np.concatenate(bs)
  order = rng.permutation(len(q))
  q, b = q[order], b[order]
  cap = 80
  pos = padded(to_positions(q, 1.0, 0.0, True), cap, seed)
  bp = np.concatenate([b, rng.integers(-5, 20, cap - len(b))]).astype(np.int32)  # any ids
  valid = np.arange(cap) < len(q)
  km = jax.jit(lambda p, bp, v: sc.build_kernel_map(p, p, 1.0, ks, in_batch=bp, out_batch=bp,
                                                    in_valid=v, out_valid=v))(pos, bp, valid)
  assert int(km.flags) == 0, km.errors
  assert_map_matches(km, brute_map(q, q, ks, off, False, b_in=b, b_out=b), len(q), (q, q))


@pytest.mark.parametrize("backend", SEARCH, indirect=True)
@pytest.mark.parametrize("factor", [2])
@examples(3)
@given(seed=st.integers(0, 2**32 - 1), centres=st.booleans())
def test_strided_map_and_its_transpose(backend, factor, seed, centres):
  """Outputs on a coarser sub-lattice (one per occupied factor-block, as ``downsample``
  gives), K = factor with the default offset: the down map is the brute force's, the
  transposed search from the coarse points (up-sampling) too, and ``transposed()`` of the
  down map is exactly that up map."""
  rng = np.random.default_rng(seed)
  ext = int(rng.integers(3, 12))
  q = np.stack(np.unravel_index(rng.choice(ext**3, min(50, ext**3), replace=False),
                                (ext,) * 3), 1) + rng.integers(0, 5000, 3)
  vs, origin = 0.5, float(rng.integers(-100, 100)) * 0.125
  cq = np.unique(factor * (q // factor), axis=0)  # one output per occupied block
  cap = 50
  pos = padded(to_positions(q, vs, origin, centres), cap, 0)
  cpos = padded(to_positions(cq, vs, origin, centres), cap, 1)
  n, m = np.int32(len(q)), np.int32(len(cq))
  off = (-0.5,) * 3 if factor % 2 == 0 else (0.0,) * 3
  maps = jax.jit(lambda p, c, n, m: (
      sc.build_kernel_map(p, c, vs, factor, in_valid=n, out_valid=m),
      sc.build_kernel_map(c, p, vs, factor, transpose=True, in_valid=m, out_valid=n)))
  down, up = maps(pos, cpos, n, m)
  assert_map_matches(down, brute_map(q, cq, (factor,) * 3, off, False), m, (q, cq))
  assert_map_matches(up, brute_map(cq, q, (factor,) * 3, off, True), n, (cq, q))
  flipped = down.transposed()
  assert np.array_equal(np.asarray(flipped.neighbors), np.asarray(up.neighbors))
  assert np.array_equal(np.asarray(flipped.inverse), np.asarray(up.inverse))


# ---------------------------------------------------------------- the conv
def pair_reference(q_in, q_out, ks, off_xyz, transpose, x, kernel, bias, ct, normalize, imp):
  """y, and the gradients of sum(ct * y) with respect to x, kernel and importance, in
  float64 over the brute-force (output, input, cell) pairs."""
  rows = brute_map(q_in, q_out, ks, off_xyz, transpose)
  kz, ky, kx, cin, cout = kernel.shape
  w = kernel.reshape(-1, cin, cout)
  pairs = [(i, j, c) for i, row in enumerate(rows) for j, c in row.items()]
  n, m = len(q_in), len(q_out)
  count_out = np.array([len(r) for r in rows], np.float64)
  count_in = np.bincount([j for _, j, _ in pairs], minlength=n).astype(np.float64)
  # scale of each pair: y[i] += a(i, j) * x[j] @ w[c], then y[i] *= b(i)
  a_in = (1 / np.maximum(count_in, 1)) if (transpose and normalize) else np.ones(n)
  if not transpose and imp is not None:
    a_in = a_in * imp
  b_out = (1 / np.maximum(count_out, 1)) if (normalize and not transpose) else np.ones(m)
  if transpose and imp is not None:
    b_out = b_out * imp
  y, dx, dw = np.zeros((m, cout)), np.zeros_like(x), np.zeros_like(w)
  dimp = np.zeros(n if not transpose else m)
  for i, j, c in pairs:
    s = a_in[j] * b_out[i]
    y[i] += s * x[j] @ w[c]
    dx[j] += s * w[c] @ ct[i]
    dw[c] += s * np.outer(x[j], ct[i])
    if imp is not None:
      if transpose:
        dimp[i] += a_in[j] * (x[j] @ w[c]) @ ct[i]
      else:
        dimp[j] += b_out[i] * (x[j] @ w[c]) @ ct[i]
  if bias is not None:
    y = y + bias
  return y, dx, dw.reshape(kernel.shape), dimp


@pytest.mark.parametrize("backend", ["auto", "jnp", "host"], indirect=True)
@examples(2)
@given(data=st.data(), transpose=st.booleans(), normalize=st.booleans(),
       importance=st.booleans(), cin=st.integers(1, 4), cout=st.integers(1, 5))
def test_conv_value_and_gradients_match_a_numpy_loop(backend, data, transpose, normalize,
                                                     importance, cin, cout):
  """sparse_conv / sparse_conv_transpose on a random lattice, every kernel backend: value
  and gradients (features, kernel, importance) against float64 loops over the pairs."""
  ks, off, off_xyz = data.draw(geometry())
  q_in, q_out, vs, origin, centres = data.draw(lattice(24, 20, margin_of(ks, off_xyz)))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
  in_pos, out_pos = (to_positions(q, vs, origin, centres) for q in (q_in, q_out))
  x = rng.standard_normal((len(q_in), cin)).astype(np.float32)
  kernel = rng.standard_normal((*ks, cin, cout)).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  ct = rng.standard_normal((len(q_out), cout)).astype(np.float32)
  n_imp = len(q_out) if transpose else len(q_in)
  imp = rng.uniform(0.5, 2.0, n_imp).astype(np.float32) if importance else None
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
  want = pair_reference(q_in, q_out, ks, off_xyz, transpose, f64(x), f64(kernel), f64(bias),
                        f64(ct), normalize, f64(imp))
  # the pair loop is Open3D's rule: the library's own reference agrees (compact clouds,
  # where float positions are exact enough for it)
  if np.ptp(np.concatenate([q_in, q_out]), 0).max() < 64:
    loop = reference.loop_sparse_conv(f64(kernel), f64(bias), f64(x), in_pos, out_pos, vs,
                                      offset=off, normalize=normalize, importance=f64(imp),
                                      transpose=transpose)
    np.testing.assert_allclose(loop, want[0], rtol=1e-9, atol=1e-9)

  def loss(x, kernel, imp):
    params = {"kernel": kernel, "bias": jnp.asarray(bias)}
    if transpose:
      y = sc.sparse_conv_transpose(params, x, in_pos, out_pos, vs, offset=off,
                                   normalize=normalize, out_importance=imp)
    else:
      y = sc.sparse_conv(params, x, in_pos, out_pos, vs, offset=off, normalize=normalize,
                         inp_importance=imp)
    return jnp.sum(y * ct), y

  imp_arg = jnp.asarray(imp) if importance else None
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2) if importance else (0, 1), has_aux=True))
  grads, y = grad(jnp.asarray(x), jnp.asarray(kernel), imp_arg)
  scale = max(1.0, float(np.abs(want[0]).max(initial=0)))
  np.testing.assert_allclose(y, want[0], rtol=2e-5, atol=2e-5 * scale)
  for got, ref, what in zip(grads, want[1:], ("x", "kernel", "importance")):
    s = max(1.0, float(np.abs(ref).max(initial=0)))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * s, err_msg=f"d{what}")
