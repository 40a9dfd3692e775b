"""Per-cloud transforms of the input pipeline: plain NumPy functions, deterministic.

Randomness comes only from an explicit ``numpy.random.Generator`` (or a JAX key or an
int seed, turned into one by :func:`as_generator`); :func:`example_rng`
makes the one of example ``index`` of epoch ``epoch`` from ``(seed, epoch, index)``, so
an example is a pure function of those three numbers and a run can resume anywhere
(see :mod:`.pipeline`).

* :func:`crop_mask` / :func:`crop`: keep the points inside a ``point_cloud_range``.
* :func:`augment`: random rotation about z, flips, scale and jitter (fixed draw order).
* :func:`voxelize`: ``floor(p / vs)`` voxels, mean features, the point -> voxel inverse
  index, a capacity: the host-side twin of :func:`jax_sparseconv.voxelize` (same
  voxels, same order, same capacity rule; this module does not import jax).
* :func:`voxel_labels`: a label per voxel by majority vote.
* :func:`pad_batch` (a ``(B, capacity, ...)`` batch with counts, for ``vmap``) and
  :func:`pack_batch` (one ``(capacity, ...)`` set with cloud ids, for packed batches).
* :func:`voxel_example`: the usual chain for segmentation (crop, augment, voxelise, a
  label per voxel), to configure with ``functools.partial``; :func:`point_example`
  the same without voxelising (for voxelising on the device with the library).

Why :func:`voxelize` is a NumPy twin of the library's and not a call to it: it runs
in loader threads or processes, per cloud, where a jitted function would compile
again for every new point count (no two scans have the same) and grain's process
workers would each start a jax backend; and it returns what a data pipeline needs
and the library's result has not, the point -> voxel ``inverse`` (labels voted per
voxel, per-point outputs). It is tested bit for bit against
:func:`jax_sparseconv.voxelize` (positions, order, count, cloud ids). On the device,
use the library itself: a batch of :func:`voxel_example` is a level through
``SparseTensor.from_voxels``, one of :func:`point_example` through
``SparseTensor.from_points``.

A *cloud* is a dict of NumPy arrays; its *rows* are the arrays of ``ndim >= 1`` that
share the leading dimension of ``coord`` (or ``positions``); 0-d arrays and Python
scalars are per-cloud values; anything else (a name) is carried along.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
  import jax

#: What the transforms take as randomness (:func:`as_generator`): a NumPy generator, a
#: non-negative int seed, or a JAX PRNG key (typed or raw uint32, or its NumPy copy).
RngLike = Union[np.random.Generator, int, np.ndarray, "jax.Array"]

_TAG_EXAMPLE = 0x6A73_6301  # distinct first words: the streams never collide
MAX_COORD = 1 << 20  #: voxel coordinates span less than 2**20 per axis (the library's range)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of example ``index`` of epoch ``epoch`` of a run seeded ``seed``.

  Args:
    seed, epoch, index: non-negative ints.

  Returns:
    ``numpy.random.Generator`` (PCG64) from ``SeedSequence([tag, seed, epoch, index])``:
    the same three numbers give the same draws on every machine and NumPy version that
    keeps PCG64's stream.
  """
  for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
    if int(v) < 0:
      raise ValueError(f"{name} must be >= 0, got {v}")
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [_TAG_EXAMPLE, int(seed), int(epoch), int(index)])))


_TAG_KEY = 0x6A73_6303


def as_generator(rng: RngLike) -> np.random.Generator:
  """A ``numpy.random.Generator`` from a generator, an int seed or a JAX PRNG key.

  Args:
    rng: a ``numpy.random.Generator`` (returned as is); a non-negative int (seeds a
      PCG64); a JAX key (``jax.random.key(...)`` or a raw uint32 ``jax.random.PRNGKey``
      array, or its NumPy copy), whose key data seed a PCG64: the same key always gives
      the same draws, different keys (e.g. from ``jax.random.split``) independent ones.

  Returns:
    ``numpy.random.Generator``.
  """
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    if int(rng) < 0:
      raise ValueError(f"a seed must be >= 0, got {rng}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_KEY, 0, int(rng)])))
  data = rng
  if type(rng).__module__.split(".")[0] in ("jax", "jaxlib"):
    import jax  # deferred: only a JAX key needs it
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      data = jax.random.key_data(rng)
  data = np.asarray(data)
  if data.dtype != np.uint32 or data.size == 0:
    raise TypeError(f"expected a numpy Generator, an int seed or a JAX PRNG key, got "
                    f"{type(rng).__name__} {getattr(rng, 'dtype', '')}")
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [_TAG_KEY, 1] + data.ravel().tolist())))


# ----------------------------------------------------------------------------- cropping


def crop_mask(coord, point_cloud_range) -> np.ndarray:
  """Which points lie in ``point_cloud_range``.

  Args:
    coord: float ``(P, 3)``.
    point_cloud_range: ``(x0, y0, z0, x1, y1, z1)``; the box is half-open,
      ``lo <= p < hi`` per axis, so a grid of ``(hi - lo) / vs`` voxels holds it.

  Returns:
    bool ``(P,)``.
  """
  r = np.asarray(point_cloud_range, np.float64).reshape(-1)
  if r.shape != (6,) or np.any(r[3:] <= r[:3]):
    raise ValueError(f"point_cloud_range must be (x0, y0, z0, x1, y1, z1) with x0 < x1, "
                     f"..., got {point_cloud_range}")
  c = np.asarray(coord)
  return np.all((c >= r[:3].astype(c.dtype)) & (c < r[3:].astype(c.dtype)), axis=1)


def _rows_key(cloud):
  for k in ("coord", "positions"):
    if k in cloud:
      return k
  raise KeyError("a cloud needs a 'coord' or 'positions' array")


def row_keys(cloud: Mapping) -> list[str]:
  """The keys of a cloud's per-row arrays (leading dimension that of ``coord``)."""
  n = len(cloud[_rows_key(cloud)])
  return [k for k, v in cloud.items()
          if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n]


def select(cloud: Mapping, rows) -> dict:
  """The cloud with only ``rows`` (a bool mask or indices) of its per-row arrays."""
  keys = set(row_keys(cloud))
  return {k: (v[rows] if k in keys else v) for k, v in cloud.items()}


def crop(cloud: Mapping, point_cloud_range) -> dict:
  """:func:`select` of the points inside ``point_cloud_range`` (see :func:`crop_mask`)."""
  return select(cloud, crop_mask(cloud[_rows_key(cloud)], point_cloud_range))


# ----------------------------------------------------------------------------- augmenting


def augment(coord, rng: RngLike, *, rotation: float = np.pi,
            flip_x: float = 0.5, flip_y: float = 0.5, scale=(0.95, 1.05),
            jitter: float = 0.01, jitter_clip: float = 0.05, center=None):
  """Random rotation about z, flips, isotropic scale and clipped Gaussian jitter.

  Draws, always in this order and whatever is switched off (so switching one off
  leaves the others' draws unchanged): an angle uniform in ``[-rotation, rotation]``,
  a flip of x with probability ``flip_x``, a flip of y with probability ``flip_y``, a
  scale uniform in ``scale``, then (only if ``jitter > 0``) ``(P, 3)`` jitter, normal
  with standard deviation ``jitter``, clipped to ``+-jitter_clip``.

  Args:
    coord: float ``(P, 3)``.
    rng: the example's generator (:func:`example_rng`), an int seed or a JAX PRNG key
      (see :func:`as_generator`).
    rotation: largest rotation angle about z, radians (``pi``: any angle; 0: none).
    flip_x, flip_y: probabilities of mirroring x -> -x, y -> -y.
    scale: ``(lo, hi)`` range of the scale factor (``(1, 1)``: none).
    jitter, jitter_clip: jitter standard deviation and bound, in ``coord``'s units.
    center: ``(3,)`` point the rotation, flips and scale are about (default: the
      origin, the sensor of a LiDAR scan).

  Returns:
    ``(coord, matrix)``: the transformed ``(P, 3)`` (``coord``'s dtype) and the float64
    ``(3, 3)`` linear map applied before the jitter (``p' = c + M (p - c) + jitter``);
    transform normals with :func:`transform_normals`.
  """
  rng = as_generator(rng)
  angle = rng.uniform(-rotation, rotation)
  fx, fy = rng.random() < flip_x, rng.random() < flip_y
  s = rng.uniform(scale[0], scale[1])
  c, si = np.cos(angle), np.sin(angle)
  m = s * np.diag([-1.0 if fx else 1.0, -1.0 if fy else 1.0, 1.0]) @ np.array(
      [[c, -si, 0.0], [si, c, 0.0], [0.0, 0.0, 1.0]])
  p = np.asarray(coord)
  o = np.zeros(3) if center is None else np.asarray(center, np.float64)
  out = (p.astype(np.float64) - o) @ m.T + o
  if jitter > 0:
    out += np.clip(jitter * rng.standard_normal(out.shape), -jitter_clip, jitter_clip)
  return out.astype(p.dtype if p.dtype.kind == "f" else np.float32), m


def transform_normals(normals, matrix) -> np.ndarray:
  """Normals under the linear map ``matrix`` of :func:`augment`: ``n M^-1``, unit length.

  Args:
    normals: float ``(P, 3)``.
    matrix: ``(3, 3)``.

  Returns:
    ``(P, 3)`` in ``normals``' dtype.
  """
  n = np.asarray(normals)
  out = n.astype(np.float64) @ np.linalg.inv(matrix)
  out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-30)
  return out.astype(n.dtype)


# ----------------------------------------------------------------------------- voxelising


class HostVoxels(NamedTuple):
  """Result of :func:`voxelize` (the fields of :class:`jax_sparseconv.Voxels` first)."""
  positions: np.ndarray  #: ``(capacity, 3)`` voxel centres, Morton order; padding NaN
  feats: np.ndarray      #: ``(capacity, C)`` mean features; padding 0
  count: int             #: voxels kept, ``min(voxels, capacity)``
  inverse: np.ndarray    #: int32 ``(P,)`` row of each point's voxel; -1 if dropped
  coords: np.ndarray     #: int32 ``(capacity, 3)`` voxel indices ``floor(p / vs)``; padding 0
  overflow: int          #: voxels dropped for want of capacity (0 when all fit)
  batch: np.ndarray | None  #: int32 ``(capacity,)`` cloud of each voxel (with ``batch``)


def _spread(v):
  """Inserts two zero bits between the low 20 bits of uint64 ``v``."""
  v = v & np.uint64(0xFFFFF)
  out = np.zeros_like(v)
  for b in range(20):
    out |= ((v >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b)
  return out


def morton_keys(coords) -> np.ndarray:
  """60-bit Morton (Z-order) keys of non-negative int coordinates ``(n, 3)`` below 2**20
  (bit ``3 i + a`` holds bit ``i`` of axis ``a``: the order of
  :func:`jax_sparseconv.morton_encode`'s ``(hi, lo)`` words)."""
  c = np.asarray(coords).astype(np.uint64)
  return _spread(c[:, 0]) | (_spread(c[:, 1]) << np.uint64(1)) | (_spread(c[:, 2]) << np.uint64(2))


def voxelize(coord, feats=None, voxel_size: float = 0.05, capacity: int | None = None, *,
             batch=None, on_overflow: str = "drop") -> HostVoxels:
  """Snaps points to voxels and merges them: the host-side twin of
  :func:`jax_sparseconv.voxelize`.

  Voxel ``i = floor(p / vs)`` (computed in ``coord``'s dtype, as the library does);
  its position is the centre ``(i + 0.5) * vs`` and its features the mean of its
  points'. Voxels come in the library's order: by cloud (with ``batch``), then by the
  Morton key of ``i - min(i)`` (the minimum per axis over all points). The capacity
  rule is the library's: the first ``capacity`` voxels in that order are kept, the
  rest dropped (their points get inverse -1) and counted in ``overflow``.

  Agreement with the library: the same ``count``, the same positions bit for bit in
  the same rows, the same ``batch``; features to rounding (the host sums in float64,
  the library in the features' dtype).

  Args:
    coord: float ``(P, 3)`` points.
    feats: optional float ``(P, C)`` features (default ``(P, 0)``).
    voxel_size: positive voxel edge.
    capacity: rows of the result (default: ``P``, every voxel fits).
    batch: optional int ``(P,)`` cloud index (>= 0) of each point: voxels of
      different clouds stay apart (a packed set).
    on_overflow: ``"drop"`` (report it in ``overflow``) or ``"raise"`` (ValueError).

  Returns:
    :class:`HostVoxels`.

  Raises:
    ValueError: bad shapes, a non-positive voxel size, non-finite points, a span of
      2**20 voxels or more, or an overflow with ``on_overflow="raise"``.
  """
  p = np.asarray(coord)
  if p.ndim != 2 or p.shape[1] != 3:
    raise ValueError(f"coord must be (P, 3), got {p.shape}")
  if p.dtype.kind != "f":
    p = p.astype(np.float32)
  n = len(p)
  f = np.zeros((n, 0), p.dtype) if feats is None else np.asarray(feats)
  if f.ndim != 2 or len(f) != n:
    raise ValueError(f"feats must be (P, C) with P = {n}, got {f.shape}")
  if not (np.isfinite(voxel_size) and voxel_size > 0):
    raise ValueError(f"voxel_size must be positive and finite, got {voxel_size}")
  if not np.all(np.isfinite(p)):
    raise ValueError("coord has non-finite values")
  if on_overflow not in ("drop", "raise"):
    raise ValueError(f"on_overflow must be 'drop' or 'raise', got {on_overflow!r}")
  cap = n if capacity is None else int(capacity)
  if cap < 0:
    raise ValueError(f"capacity must be >= 0, got {capacity}")
  vs = p.dtype.type(voxel_size)
  fl = np.floor(p / vs)
  idx = fl.astype(np.int64)
  centres = (fl + p.dtype.type(0.5)) * vs
  if n:
    shifted = idx - idx.min(0)
    if shifted.max() >= MAX_COORD:
      raise ValueError(f"points span {shifted.max() + 1} voxels on an axis: at most {MAX_COORD}")
  else:
    shifted = idx
  keys = morton_keys(shifted)
  if batch is not None:
    b = np.asarray(batch).astype(np.int64).reshape(-1)
    if len(b) != n or (n and b.min() < 0):
      raise ValueError("batch must be (P,) non-negative cloud indices")
    order = np.lexsort((keys, b))
    first = np.ones(n, bool)
    first[1:] = (keys[order][1:] != keys[order][:-1]) | (b[order][1:] != b[order][:-1])
  else:
    order = np.argsort(keys, kind="stable")
    first = np.ones(n, bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
  seg_sorted = np.cumsum(first) - 1  # voxel row of each sorted point
  total = int(first.sum()) if n else 0
  kept = min(total, cap)
  if total > cap and on_overflow == "raise":
    raise ValueError(f"{total} voxels for a capacity of {cap}")
  inverse = np.empty(n, np.int64)
  inverse[order] = seg_sorted
  inverse = np.where(inverse < cap, inverse, -1).astype(np.int32)
  heads = order[first][:kept]  # a point of each kept voxel
  positions = np.full((cap, 3), np.nan, p.dtype)
  positions[:kept] = centres[heads]
  coords = np.zeros((cap, 3), np.int32)
  coords[:kept] = idx[heads]
  valid = inverse >= 0
  num = np.bincount(inverse[valid], minlength=cap)[:cap]
  sums = np.zeros((cap, f.shape[1]), np.float64)
  np.add.at(sums, inverse[valid], f[valid].astype(np.float64))
  out_dtype = f.dtype if f.dtype.kind == "f" else np.float32
  mean = (sums / np.maximum(num, 1)[:, None]).astype(out_dtype)
  out_b = None
  if batch is not None:
    out_b = np.zeros(cap, np.int32)
    out_b[:kept] = b[heads]
  return HostVoxels(positions, mean, kept, inverse, coords, total - kept, out_b)


def voxel_labels(inverse, labels, count: int, ignore_index: int = -1) -> np.ndarray:
  """A label per voxel: the most frequent label of its points (ties: the smallest),
  ``ignore_index`` points not voting; voxels with no vote get ``ignore_index``.

  Args:
    inverse: int ``(P,)`` voxel row of each point (:attr:`HostVoxels.inverse`; -1:
      dropped).
    labels: int ``(P,)``.
    count: number of voxels.
    ignore_index: the label that does not vote.

  Returns:
    int32 ``(count,)``.
  """
  inv, lab = np.asarray(inverse).astype(np.int64), np.asarray(labels).astype(np.int64)
  keep = (inv >= 0) & (inv < count) & (lab != ignore_index)
  out = np.full(count, ignore_index, np.int32)
  if not keep.any():
    return out
  inv, lab = inv[keep], lab[keep]
  lo = lab.min()
  pairs, votes = np.unique(inv * (lab.max() - lo + 1) + (lab - lo), return_counts=True)
  vox, cls = pairs // (lab.max() - lo + 1), pairs % (lab.max() - lo + 1) + lo
  order = np.lexsort((cls, -votes, vox))  # per voxel: most votes, then smallest label
  vox, cls = vox[order], cls[order]
  head = np.ones(len(vox), bool)
  head[1:] = vox[1:] != vox[:-1]
  out[vox[head]] = cls[head]
  return out


# ----------------------------------------------------------------------------- batching


def _fill_value(key, dtype, fill):
  if fill and key in fill:
    return fill[key]
  if key in ("coord", "positions") and dtype.kind == "f":
    return np.nan  # the library's padding: a padded row is never mistaken for a point
  return 0


def _split(clouds):
  if not clouds:
    raise ValueError("no clouds to batch")
  keys = [row_keys(c) for c in clouds]
  if any(set(k) != set(keys[0]) for k in keys):
    raise ValueError(f"clouds have different per-row arrays: {keys}")
  return keys[0]


def _extras(clouds, rows):
  out = {}
  for k in clouds[0]:
    if k in rows:
      continue
    vals = [c[k] for c in clouds]
    if all(np.ndim(v) == 0 and isinstance(v, (int, float, np.number, np.ndarray, bool))
           for v in vals):
      out[k] = np.asarray(vals)
    else:
      out[k] = vals
  return out


def pad_batch(clouds: Sequence[Mapping], capacity: int, *, fill: Mapping | None = None,
              on_overflow: str = "raise") -> dict:
  """Stacks clouds into one batch of fixed shape, each padded to ``capacity`` rows.

  Args:
    clouds: ``B`` clouds with the same per-row arrays (shapes ``(n_b, ...)``).
    capacity: rows per cloud.
    fill: padding value by key (default: NaN for ``coord`` / ``positions``, 0 else).
    on_overflow: ``"raise"`` (ValueError when some ``n_b > capacity``) or
      ``"truncate"`` (keep the first ``capacity`` rows; see ``dropped``).

  Returns:
    dict: each per-row array as ``(B, capacity, ...)``; ``count`` int32 ``(B,)`` valid
    rows per cloud (the first ones) and ``valid`` bool ``(B, capacity)`` the same as a
    mask; ``dropped`` int32 ``(B,)`` rows cut off (0 unless ``"truncate"``); per-cloud
    scalars stacked to ``(B,)``; other values as lists. Padding rows hold ``fill``
    (labels too: mask them with ``valid``, or give ``fill={"labels": ignore_index}``).
  """
  rows = _split(clouds)
  if on_overflow not in ("raise", "truncate"):
    raise ValueError(f"on_overflow must be 'raise' or 'truncate', got {on_overflow!r}")
  n = np.array([len(c[_rows_key(c)]) for c in clouds])
  if on_overflow == "raise" and np.any(n > capacity):
    raise ValueError(f"clouds of {n.tolist()} rows for a capacity of {capacity}")
  count = np.minimum(n, capacity)
  out = _extras(clouds, rows)
  for k in rows:
    v0 = np.asarray(clouds[0][k])
    arr = np.full((len(clouds), capacity) + v0.shape[1:], _fill_value(k, v0.dtype, fill),
                  v0.dtype)
    for b, c in enumerate(clouds):
      arr[b, :count[b]] = c[k][:count[b]]
    out[k] = arr
  out["count"], out["dropped"] = count.astype(np.int32), (n - count).astype(np.int32)
  out["valid"] = np.arange(capacity)[None, :] < count[:, None]
  return out


def pack_batch(clouds: Sequence[Mapping], capacity: int, *, fill: Mapping | None = None,
               on_overflow: str = "raise") -> dict:
  """Concatenates clouds into one packed set of ``capacity`` rows with cloud ids.

  Args:
    clouds: ``B`` clouds with the same per-row arrays.
    capacity: rows of the packed set.
    fill: padding value by key (default: NaN for ``coord`` / ``positions``, 0 else).
    on_overflow: ``"raise"`` (ValueError when ``sum(n_b) > capacity``) or
      ``"truncate"`` (keep the first ``capacity`` rows: the last clouds lose theirs).

  Returns:
    dict: each per-row array as ``(capacity, ...)`` (cloud 0's rows, then cloud 1's,
    ...); ``batch`` int32 ``(capacity,)`` cloud index of each row (padding 0, as the
    library's packed results); ``count`` int32 scalar valid rows (the first ones) and
    ``valid`` bool ``(capacity,)`` the same as a mask; ``counts`` and
    ``dropped`` int32 ``(B,)`` rows kept and cut per cloud; ``offsets`` int32
    ``(B + 1,)`` where each cloud's rows start; per-cloud scalars as ``(B,)``.
  """
  rows = _split(clouds)
  if on_overflow not in ("raise", "truncate"):
    raise ValueError(f"on_overflow must be 'raise' or 'truncate', got {on_overflow!r}")
  n = np.array([len(c[_rows_key(c)]) for c in clouds])
  if on_overflow == "raise" and n.sum() > capacity:
    raise ValueError(f"clouds of {n.sum()} rows in all for a capacity of {capacity}")
  start = np.minimum(np.concatenate([[0], np.cumsum(n)]), capacity)
  counts = np.diff(start)
  out = _extras(clouds, rows)
  for k in rows:
    v0 = np.asarray(clouds[0][k])
    arr = np.full((capacity,) + v0.shape[1:], _fill_value(k, v0.dtype, fill), v0.dtype)
    for b, c in enumerate(clouds):
      arr[start[b]:start[b + 1]] = c[k][:counts[b]]
    out[k] = arr
  batch = np.zeros(capacity, np.int32)
  batch[:start[-1]] = np.repeat(np.arange(len(clouds)), counts)
  out.update(batch=batch, count=np.int32(start[-1]), counts=counts.astype(np.int32),
             dropped=(n - counts).astype(np.int32), offsets=start.astype(np.int32),
             valid=np.arange(capacity) < start[-1])
  return out


# ----------------------------------------------------------------------------- the chains


def point_example(cloud: Mapping, rng: RngLike | None, *, feat_keys: Sequence[str] = (),
                  label_key: str | None = "label", point_cloud_range=None,
                  augmentation: Mapping | None = None, normal_key: str | None = None) -> dict:
  """Crop and augment, without voxelising: for voxelising on the device with the
  library (``SparseTensor.from_points(batch["coord"][b], batch["feats"][b], vs,
  valid=batch["count"][b], capacity=...)``, or MinkUNet's ``tensor_field_quantize``,
  whose point -> voxel map gives per-point outputs back).

  Args:
    cloud: a reader's dict (``coord (P, 3)`` and the keys named below).
    rng: the example's generator (or an int seed, or a JAX key: :func:`as_generator`).
    feat_keys: per-point arrays concatenated (as float32 columns) into ``feats``.
    label_key: per-point labels, returned as ``labels`` (None: none).
    point_cloud_range: optional crop (before augmenting, in the reader's frame).
    augmentation: keyword arguments of :func:`augment`, or None (evaluation).
    normal_key: a key of ``feat_keys`` holding normals, rotated with the points.

  Returns:
    dict: ``coord`` float32 ``(P', 3)``, ``feats`` float32 ``(P', C)``, ``labels``
    int32 ``(P',)`` (with ``label_key``), ``num_points`` (``P'``), ``name`` if the cloud
    has one. Batch with :func:`pad_batch` / :func:`pack_batch` at a capacity in points.
  """
  if point_cloud_range is not None:
    cloud = crop(cloud, point_cloud_range)
  coord = np.asarray(cloud["coord"], np.float32)
  cols = {k: np.asarray(cloud[k], np.float32).reshape(len(coord), -1) for k in feat_keys}
  if augmentation is not None:
    coord, m = augment(coord, rng, **augmentation)
    if normal_key is not None:
      cols[normal_key] = transform_normals(cols[normal_key], m)
  feats = (np.concatenate([cols[k] for k in feat_keys], 1) if feat_keys
           else np.zeros((len(coord), 0), np.float32))
  out = dict(coord=coord, feats=feats)
  if label_key is not None:
    out["labels"] = np.asarray(cloud[label_key]).astype(np.int32)
  out["num_points"] = len(coord)
  if "name" in cloud:
    out["name"] = cloud["name"]
  return out



def voxel_example(cloud: Mapping, rng: RngLike | None, *, voxel_size: float,
                  feat_keys: Sequence[str] = (), label_key: str | None = "label",
                  ignore_index: int = -1, point_cloud_range=None,
                  augmentation: Mapping | None = None, capacity: int | None = None,
                  normal_key: str | None = None) -> dict:
  """Crop, augment, voxelise: a segmentation example from a cloud of a reader.

  Configure it with ``functools.partial`` (all but ``cloud`` and ``rng``) and give it
  to :class:`~jax_sparseconv.datasets.pipeline.Pipeline`. The voxels are unique voxel
  centres: a padded batch's cloud ``b`` becomes a level with
  ``SparseTensor.from_voxels(batch["positions"][b], batch["feats"][b], voxel_size,
  valid=batch["count"][b])`` (a packed batch: all at once, with ``batch=batch["batch"]``).

  Args:
    cloud: a reader's dict (``coord (P, 3)`` and the keys named below).
    rng: the example's generator (or an int seed, or a JAX key: :func:`as_generator`).
    voxel_size: voxel edge.
    feat_keys: per-point arrays concatenated (as float32 columns) into the features,
      e.g. ``("strength",)`` or ``("color", "normal")``.
    label_key: per-point labels voted per voxel (:func:`voxel_labels`); None: none.
    ignore_index: the label that does not vote (0 for SemanticKITTI, -1 for ScanNet).
    point_cloud_range: optional crop (before augmenting, in the reader's frame).
    augmentation: keyword arguments of :func:`augment`, or None for no augmentation
      (evaluation).
    capacity: voxels per example; extra voxels are dropped (Morton order, as the
      library) and counted in ``overflow``.
    normal_key: a key of ``feat_keys`` holding normals, rotated with the points.

  Returns:
    dict: ``positions`` float32 ``(V, 3)`` voxel centres, ``feats`` float32 ``(V, C)``,
    ``coords`` int32 ``(V, 3)``, ``labels`` int32 ``(V,)`` (with ``label_key``);
    ``num_points`` and ``overflow`` (ints); ``name`` if the cloud has one.
  """
  if point_cloud_range is not None:
    cloud = crop(cloud, point_cloud_range)
  coord = np.asarray(cloud["coord"], np.float32)
  cols = {k: np.asarray(cloud[k], np.float32).reshape(len(coord), -1) for k in feat_keys}
  if augmentation is not None:
    coord, m = augment(coord, rng, **augmentation)
    if normal_key is not None:
      cols[normal_key] = transform_normals(cols[normal_key], m)
  feats = (np.concatenate([cols[k] for k in feat_keys], 1) if feat_keys
           else np.zeros((len(coord), 0), np.float32))
  v = voxelize(coord, feats, voxel_size, capacity)
  out = dict(positions=v.positions[:v.count], feats=v.feats[:v.count], coords=v.coords[:v.count])
  if label_key is not None:
    out["labels"] = voxel_labels(v.inverse, cloud[label_key], v.count, ignore_index)
  out["num_points"], out["overflow"] = len(coord), v.overflow
  if "name" in cloud:
    out["name"] = cloud["name"]
  return out
