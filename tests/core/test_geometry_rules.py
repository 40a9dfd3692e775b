"""The output-set rules of ``SparseTensor.conv`` (``geometry.py``, ``generate.py``) against a
NumPy brute force written from the rules' definitions, on fresh random clouds: every
output set and every (output, input, slot) pair, for the spconv regular conv, the
MinkowskiEngine/TorchSparse floor rule and the generative transposed conv, with and
without a spatial shape, packed batches and padding; grouped convs forward and gradients
against a loop; the sparse <-> dense conversions.

Coordinates here are ``(x, y, z)``; per-axis arguments of ``SparseTensor.conv`` are in
kernel-array order ``(z, y, x)``; slot ``(kz * Ky + ky) * Kx + kx``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_sparseconv as sc
from jax_sparseconv import linen
from tests.helpers import rel_err, x64


def _cloud(rng, n, extent, batches=2, pad=3):
  """``n`` distinct voxels per cloud in ``[0, extent)`` (x, y, z), packed, plus padding."""
  coords, batch = [], []
  for b in range(batches):
    cells = rng.choice(int(np.prod(extent)), size=n, replace=False)
    coords.append(np.stack(np.unravel_index(cells, extent), -1))
    batch.append(np.full(n, b))
  coords, batch = np.concatenate(coords), np.concatenate(batch)
  order = rng.permutation(len(coords))
  coords, batch = coords[order], batch[order]
  valid = np.r_[np.ones(len(coords), bool), np.zeros(pad, bool)]
  coords = np.r_[coords, rng.integers(0, 5, (pad, 3))]
  batch = np.r_[batch, np.zeros(pad, int)]
  return coords.astype(np.int32), batch.astype(np.int32), valid


def _level(coords, batch, valid, extent, cin=3, rng=None):
  """An ``xyz`` level from ``(b, x, y, z)`` indices."""
  idx = np.c_[batch, coords]
  feats = (rng or np.random.default_rng(0)).normal(size=(len(coords), cin)).astype(np.float32)
  return sc.SparseTensor.from_indices(jnp.asarray(idx), jnp.asarray(feats), extent, 2,
                                      axis_order="xyz", valid=jnp.asarray(valid))


def _slots(ks_xyz):
  """Kernel offsets ``(kx, ky, kz)`` in slot order."""
  return [(kx, ky, kz) for kz, ky, kx in itertools.product(*[range(k) for k in ks_xyz[::-1]])]


def brute_force(rule, coords, batch, valid, ks, s, p, d, extent):
  """The rule from its definition, by loops: ``{(b, o): {slot: input row}}``."""
  ks, s, p, d = (np.asarray(v) for v in (ks, s, p, d))
  if rule == "floor":
    p = ((ks - 1) // 2) * d
  live = [(int(b), tuple(c), i) for i, (c, b, v) in enumerate(zip(coords, batch, valid)) if v]
  where = {(b, c): i for b, c, i in live}
  if extent is None:
    lo, hi = np.full(3, -10**6), np.full(3, 10**6)
  elif rule == "transpose":
    lo, hi = np.zeros(3, int), (np.asarray(extent) - 1) * s - 2 * p + ks
  else:
    lo, hi = np.zeros(3, int), (np.asarray(extent) + 2 * p - d * (ks - 1) - 1) // s + 1
  out = {}
  for b, c, i in live:
    c = np.asarray(c)
    if rule == "floor":
      outs = [np.floor_divide(c, s)]
    else:
      outs = []
      for k in _slots(tuple(ks)):
        if rule == "transpose":
          outs.append(c * s - p + np.asarray(k) * d)
        else:
          num = c + p - np.asarray(k) * d
          if np.all(num % s == 0):
            outs.append(num // s)
    for o in outs:
      if np.all(o >= lo) and np.all(o < hi):
        out.setdefault((b, tuple(int(x) for x in o)), {})
  for (b, o), pairs in out.items():
    for slot, k in enumerate(_slots(tuple(ks))):
      if rule == "transpose":
        num = np.asarray(o) + p - np.asarray(k) * d
        if np.all(num % s == 0) and (b, tuple(num // s)) in where:
          pairs[slot] = where[(b, tuple(int(x) for x in num // s))]
      else:
        src = tuple(int(x) for x in np.asarray(o) * s - p + np.asarray(k) * d)
        if (b, src) in where:
          pairs[slot] = where[(b, src)]
  return out


def _ours(level, km):
  idx = np.asarray(level.indices())
  nbr = np.asarray(km.neighbors)
  got = {}
  for r in np.nonzero(np.asarray(level.valid))[0]:
    key = (int(idx[r, 0]), tuple(int(x) for x in idx[r, 1:]))
    assert key not in got, "duplicated output"
    got[key] = {s: int(i) for s, i in enumerate(nbr[r]) if i < km.num_in}
  assert np.all(nbr[~np.asarray(level.valid)] == km.num_in), "padded outputs read inputs"
  return got


GEOMETRIES = [  # (kernel, stride, padding, dilation), per axis x, y, z
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    ((2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1)),
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    ((1, 1, 3), (1, 1, 2), (0, 0, 0), (1, 1, 1)),
    ((3, 2, 1), (2, 1, 2), (1, 0, 0), (1, 1, 1)),
    ((3, 3, 3), (1, 1, 1), (2, 2, 2), (2, 2, 2)),
    ((3, 3, 2), (3, 2, 2), (0, 1, 0), (1, 2, 1)),
]


@pytest.mark.parametrize("rule", ["conv", "transpose", "floor"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "k{}s{}p{}d{}".format(
    *["".join(map(str, v)) for v in g]))
@pytest.mark.parametrize("clip", [True, False], ids=["shape", "noshape"])
def test_rule_against_brute_force(rule, geo, clip, rng):
  ks, s, p, d = geo
  if rule == "floor":
    if p != (0, 0, 0):
      pytest.skip("the floor rule centres its window itself")
  extent = tuple(int(v) for v in rng.integers(5, 10, 3))
  coords, batch, valid = _cloud(rng, 40, extent)
  level = _level(coords, batch, valid, extent, rng=rng)
  if not clip:
    level = level.replace(extent=None)
  out = level.conv(ks[::-1], s[::-1], p[::-1], d[::-1], rule=rule, key="k")
  km = out.link("k").kernel_map
  want = brute_force(rule, coords, batch, valid, ks, s, p, d, extent if clip else None)
  got = _ours(out, km)
  assert got.keys() == want.keys()
  assert got == want
  # The transposed map (no second search) holds the same pairs.
  inv = np.asarray(km.transposed().neighbors)
  pairs = {(o, s_, i) for o, row in enumerate(np.asarray(km.neighbors)) for s_, i in enumerate(row)
           if i < km.num_in}
  back = {(o, s_, i) for i, row in enumerate(inv) for s_, o in enumerate(row)
          if o < km.num_out}
  assert pairs == back
  if clip:
    assert out.spatial_shape is not None


def test_rule_without_shape_keeps_negative_coordinates(rng):
  coords, batch, valid = _cloud(rng, 20, (4, 4, 4), pad=0)
  level = _level(coords, batch, valid, (4, 4, 4), rng=rng).replace(extent=None)
  out = level.conv(3, 1, 1, rule="conv", key="k")
  idx = np.asarray(out.indices())[np.asarray(out.valid)]
  assert idx[:, 1:].min() == -1  # an input at 0 reaches -1 without a grid to clip to


def test_capacity_overflow_is_flagged(rng):
  coords, batch, valid = _cloud(rng, 40, (8, 8, 8), pad=0)
  level = _level(coords, batch, valid, (8, 8, 8), rng=rng)
  with pytest.raises(sc.InvalidInputError, match="capacity"):
    level.conv(3, 1, 1, rule="conv", key="k", capacity=16)
  with sc.error_mode("flag"):
    flags = jax.jit(lambda t: t.conv(3, 1, 1, rule="conv", key="k", capacity=16).flags)(level)
  assert int(flags) & int(sc.ErrorCode.CAPACITY_OVERFLOW)


@pytest.mark.parametrize("case", ["packed", "one cloud", "overflow", "no shape", "empty",
                                  "vmap", "far"])
def test_native_output_sets_match_jnp(case, rng):
  """The native CPU pass that builds a generating conv's output set (ffi.cpu_generate: conv,
  transpose and floor rules) gives the jnp path's output set, batches, inverse table, its
  inverse (the neighbour table) and exactness, count and flags, bit for bit:
  packed clouds, one cloud, more outputs than the capacity, negative coordinates (no grid
  to clip to), no valid input, a vmapped batch of padded clouds, and a span past 2^20
  (OUT_OF_RANGE: the native pass's general sort)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the native CPU kernels run on the CPU")
  from jax_sparseconv._src import generate
  from jax_sparseconv._src.geometry import Geometry, centring

  coords, batch, valid = _cloud(rng, 60, (9, 7, 8))
  if case == "empty":
    valid[:] = False
  if case == "no shape":
    coords = coords - 4  # negative coordinates stay (no grid)
  if case == "far":
    coords[:5] += 1 << 20
  b = None if case == "one cloud" else jnp.asarray(batch)
  cap = 64 if case == "overflow" else len(coords) * 18  # 18: the transposed candidates
  args = (jnp.asarray(coords), jnp.asarray(valid), b)
  for rule in ("conv", "transpose", "floor"):
    ks, st = (3, 2, 3), (2, 1, 2)
    pad = centring(ks, (1, 1, 1)) if rule == "floor" else (1, 0, 1)
    geo = Geometry(rule, ks, st, pad, (1, 1, 1),
                   None if case in ("no shape", "far") else (9, 7, 8))
    run = functools.partial(generate.generate, geometry=geo, capacity=cap)
    if case == "vmap":
      args2 = tuple(jnp.stack([a, a[::-1]]) for a in args[:2]) + (jnp.stack([b, b[::-1]]),)
      native = jax.vmap(run)(*args2)
      with sc.kernel_backend("jnp"):
        ref = jax.vmap(run)(*args2)
    else:
      native = run(*args)
      with sc.kernel_backend("jnp"):
        ref = run(*args)
    for got, want in zip(native, ref):
      if want is None:
        assert got is None
        continue
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(native) == 7
    flags = int(np.max(np.asarray(native[6])))
    assert bool(flags & int(sc.ErrorCode.CAPACITY_OVERFLOW)) == (case == "overflow")
    assert bool(flags & int(sc.ErrorCode.OUT_OF_RANGE)) == (case == "far")
    if case == "empty":
      assert int(np.max(np.asarray(native[1]))) == 0


def test_generated_level_under_jit_matches_eager(rng):
  coords, batch, valid = _cloud(rng, 30, (7, 9, 8))
  level = _level(coords, batch, valid, (7, 9, 8), rng=rng)
  layer = linen.SparseConv3d(3, 4, 3, stride=2, padding=1, indice_key="k", capacity=128)
  params = layer.init(jax.random.key(0), level)
  eager = layer.apply(params, level)
  jitted = jax.jit(layer.apply)(params, level)
  np.testing.assert_array_equal(np.asarray(eager.indices()), np.asarray(jitted.indices()))
  np.testing.assert_array_equal(np.asarray(eager.feats), np.asarray(jitted.feats))


# ----------------------------------------------------------------- groups


def grouped_loop(x, nbr, w, groups):
  """``y[o] = sum_s x[nbr[o, s]] @ w[s]`` per group, by loops (float64)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  m, s_ = nbr.shape
  cin_g, cout = w.shape[-2:]
  cout_g = cout // groups
  w = w.reshape(s_, cin_g, cout)
  y = np.zeros((m, cout))
  for o in range(m):
    for s in range(s_):
      i = nbr[o, s]
      if i >= len(x):
        continue
      for g in range(groups):
        y[o, g * cout_g:(g + 1) * cout_g] += (x[i, g * cin_g:(g + 1) * cin_g] @
                                              w[s, :, g * cout_g:(g + 1) * cout_g])
  return y


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (4, 4, 4), (3, 6, 3), (8, 8, 16),
                                             (24, 24, 24)])
@pytest.mark.parametrize("backend", ["jnp", "auto", "host"])
def test_grouped_conv_against_loop(groups, cin, cout, backend, rng):
  coords, batch, valid = _cloud(rng, 30, (6, 6, 6))
  level = _level(coords, batch, valid, (6, 6, 6), cin=cin, rng=rng)
  km = level.kernel_map(3)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, cin // groups, cout)), jnp.float32)
  with sc.kernel_backend(backend):
    y = sc.sparse_conv({"kernel": kernel}, level.feats, kernel_map=km, groups=groups)
  want = grouped_loop(level.feats, np.asarray(km.neighbors), kernel, groups)
  want[~np.asarray(level.valid)] = 0
  assert rel_err(y, want) < 2e-6


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (8, 8, 16), (24, 24, 24)])
def test_grouped_native_gradients_match_jnp(groups, cin, cout, rng):
  """The native CPU grouped kernels (forward, feature gradient through the inverse map,
  weight gradient) against the jnp path in float32, and bitwise repeatable."""
  coords, batch, valid = _cloud(rng, 60, (7, 7, 7), pad=3)
  level = _level(coords, batch, valid, (7, 7, 7), cin=cin, rng=rng)
  km = level.kernel_map(3)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, cin // groups, cout)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(len(coords), cout)), jnp.float32)

  def grads(backend):
    def f(x, k):
      with sc.kernel_backend(backend):
        return jnp.vdot(sc.sparse_conv({"kernel": k}, x, kernel_map=km, groups=groups), ct)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(level.feats, kernel)

  native, ref = grads("auto"), grads("jnp")
  for a, b in zip(native, ref):
    assert rel_err(a, b) < 2e-6
  for a, b in zip(native, grads("auto")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grouped_conv_gradients_float64(rng):
  with x64():
    coords, batch, valid = _cloud(rng, 12, (4, 4, 4))
    level = _level(coords, batch, valid, (4, 4, 4), cin=4, rng=rng)
    km = level.kernel_map(3)
    x = jnp.asarray(rng.normal(size=(len(coords), 4)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 6)))

    def f(x, kernel):
      return sc.sparse_conv({"kernel": kernel}, x, kernel_map=km, groups=2)

    check_grads(f, (x, kernel), order=2, modes=["fwd", "rev"])
    g = jax.grad(lambda k: jnp.sum(f(x, k) ** 2))(kernel)
    gt = jax.grad(lambda k: jnp.sum(f(x, k) ** 2))(kernel)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(gt))  # bitwise repeatable


def test_depthwise_layer_shapes():
  idx = jnp.array([[0, 0, 1, 2], [0, 0, 1, 3], [1, 3, 0, 0]])
  t = sc.SparseTensor.from_indices(idx, jnp.ones((3, 8)), (4, 5, 6), 2)
  layer = linen.SubMConv3d(8, 8, 3, groups=8, indice_key="dw")
  params = layer.init(jax.random.key(0), t)
  assert params["params"]["kernel"].shape == (3, 3, 3, 1, 8)
  with pytest.raises(ValueError, match="groups"):
    linen.SubMConv3d(8, 6, 3, groups=4).init(jax.random.key(0), t)


# ----------------------------------------------------------------- dense


def test_height_compression_and_dense_round_trip(rng):
  coords, batch, valid = _cloud(rng, 25, (6, 5, 4), pad=2)
  idx = np.c_[batch, coords[:, ::-1]]  # [b, z, y, x]
  feats = rng.normal(size=(len(coords), 3)).astype(np.float32)
  t = sc.SparseTensor.from_indices(jnp.asarray(idx), jnp.asarray(feats), (4, 5, 6), 2,
                                   valid=jnp.asarray(valid))
  grid = np.asarray(t.dense())
  assert grid.shape == (2, 3, 4, 5, 6)
  bev = np.asarray(t.height_compression())
  assert bev.shape == (2, 3 * 4, 5, 6)
  for r in np.nonzero(valid)[0]:
    b, z, y, x = idx[r]
    np.testing.assert_array_equal(grid[b, :, z, y, x], feats[r])
    np.testing.assert_array_equal(bev[b, np.arange(3) * 4 + z, y, x], feats[r])
  assert np.count_nonzero(np.any(grid != 0, axis=1)) == valid.sum()
  # dense -> level -> dense.
  back = sc.SparseTensor.from_dense(jnp.asarray(grid))
  np.testing.assert_array_equal(np.asarray(back.dense()), grid)
  # An explicit spatial shape for a level that has none.
  no_shape = t.replace(extent=None)
  np.testing.assert_array_equal(np.asarray(no_shape.dense(spatial_shape=(4, 5, 6))), grid)


def test_down_capacity_and_from_points_flags():
  pts = jnp.array([[0.1, 0.1, 0.1], [0.3, 0.1, 0.1], [0.9, 0.9, 0.1], [0.6, 0.6, 0.6]])
  t = sc.SparseTensor.from_points(pts, jnp.ones((4, 1)), 0.25)
  coarse = t.down(capacity=3)
  assert coarse.coords.shape == (3, 3) and int(coarse.count) == 3
  with pytest.raises(sc.InvalidInputError, match="capacity"):
    t.down(capacity=2)
  # Under jit in flag mode, the flags name the real cause (not a NaN position).
  with sc.error_mode("flag"):
    flags = jax.jit(lambda p: sc.SparseTensor.from_points(p, jnp.ones((4, 1)), 0.25,
                                                          capacity=2).flags)(pts)
  assert sc.ErrorCode(int(flags)) == sc.ErrorCode.CAPACITY_OVERFLOW
