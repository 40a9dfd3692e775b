"""The lookup: for every (output, slot) query, the input voxel there.

Inputs and outputs arrive as non-negative integer lattice coordinates (``lattice.py``)
and the kernel's slots as integer offsets. Three implementations give identical results:

* **native CPU** (``ffi/search_cpu.cc``, ``jsc_cpu_neighbors``): a hash table of 4x4x4
  blocks of voxels (occupancy bits and input indices), built once from the inputs;
  each output's queries touch the few blocks around it. Its cost depends on the
  number of points and queries only, not on the coordinates' extent. Packed batches
  and ``vmap``'s batch axes are handled by the kernel.
* **CUDA** (``ffi/search_cuda.cu``, ``jsc_neighbors``; on GPUs, and on the CPU through the
  host shim with the ``"host"`` backend): an open-addressing hash table of the input
  voxels built with atomic compare-and-swap (the smallest input index of a voxel wins),
  one thread per query.
* **jnp** (other platforms, and the ``"jnp"`` backend): the inputs' Morton keys are
  sorted once; the occupied 4x4x2 blocks (consecutive in that order) get a 32-bit
  occupancy mask and the sorted position of their first input, and go into an
  open-addressing hash table keyed by block coordinates (:class:`_BlockTable`). Each
  output looks up the blocks its window can reach (8 for K=3) and each of its queries
  answers with a bit test and a popcount in one of them. Also independent of the
  extent; packed batches key the blocks by cloud too.

:func:`invert` turns a neighbour table into its inverse (the backward pass's map, and the
opposite direction's map without a second search).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import backend, ffi, lattice, sharding
from .morton import MAX_COORD

#: Coordinates the native lookup accepts, per axis (``[0, 2**21)``).
_NATIVE_RANGE = 2 * MAX_COORD


def neighbors(c_in, in_mask, in_batch, c_out, out_mask, out_batch, deltas):
  """``(neighbors, duplicate)`` for non-negative coordinates.

  Which search runs (``backend.dispatch``): on GPUs where the CUDA kernels run, the CUDA
  hash search (``ffi/search_cuda.cu``); on the CPU the native search (backend "auto") or
  the same CUDA source through the host shim (backend "host"); the jnp search elsewhere and
  with backend "jnp". All give the same table, bit for bit (tests/core/test_lookup.py).

  Args:
    c_in, c_out: int32 ``(n, 3)`` / ``(m, 3)`` lattice coordinates (valid rows in
      ``[0, MAX_COORD)``).
    in_mask, out_mask: bool validity.
    in_batch, out_batch: int32 cloud indices, or ``None`` (one cloud).
    deltas: static int ``(S, 3)`` slot offsets; output ``i`` queries ``c_out[i] + d``.

  Returns:
    int32 ``(m, S)`` input indices (``n`` where none) and a bool scalar, whether two
    valid inputs of one cloud share a voxel.
  """
  packed = in_batch is not None
  if not packed:
    in_batch = jnp.zeros(c_in.shape[:1], jnp.int32)
    out_batch = jnp.zeros(c_out.shape[:1], jnp.int32)
  jnp_fn = functools.partial(_neighbors_jnp, deltas=deltas, packed=packed)
  native = (functools.partial(_neighbors_native, deltas=deltas)
            if ("jsc_cpu_neighbors", "cpu") in ffi.targets else None)
  # The CUDA search (ffi/search_cuda.cu): on GPUs where the CUDA kernels run, and on the
  # CPU through the host shim with backend "host".
  cuda = (functools.partial(_neighbors_native, deltas=deltas, search=ffi.cuda_neighbors)
          if any(t == "jsc_neighbors" for t, _ in ffi.targets) else None)
  return backend.dispatch(jnp_fn, cuda, c_in, in_mask, in_batch, c_out, out_mask, out_batch,
                          cpu_fn=native)


def invert(neighbors, n):
  """The inverse table ``(n, S)`` of ``neighbors`` (``inverse[i, s]``: the output that reads
  input ``i`` at slot ``s``, else ``m``) and whether it is exact (no two outputs read one
  input through one slot): the native kernels on the CPU and on GPUs (one pass,
  collisions counted; the same table), else a scatter checked by a round trip."""
  return backend.dispatch(functools.partial(invert_jnp, n=n), lambda nb: ffi.cuda_invert(nb, n),
                          neighbors, cpu_fn=lambda nb: ffi.cpu_invert(nb, n))


def invert_jnp(neighbors, n):
  """The jnp :func:`invert`."""
  m, s = neighbors.shape
  rows = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[:, None], (m, s))
  slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (m, s))
  inverse = jnp.full((n + 1, s), m, jnp.int32).at[neighbors, slots].set(rows)
  unique = jnp.all((neighbors == n) | (inverse[neighbors, slots] == rows))
  return inverse[:n], unique


def _neighbors_native(c_in, in_mask, in_batch, c_out, out_mask, out_batch, *, deltas,
                      search=None):
  """A compiled search (``ffi.cpu_neighbors``, or ``search``: ``ffi.cuda_neighbors``);
  both take coordinates in ``[0, 2**21)``."""
  clip = functools.partial(jnp.clip, min=0, max=_NATIVE_RANGE - 1)
  return (search or ffi.cpu_neighbors)(clip(c_in), in_batch, in_mask, clip(c_out), out_batch,
                                       out_mask, deltas)


def _neighbors_jnp(c_in, in_mask, in_batch, c_out, out_mask, out_batch, *, deltas, packed):
  n, m, s = c_in.shape[0], c_out.shape[0], len(deltas)
  *sorted_keys, perm = lattice.sort_keys(
      lattice.keys(c_in, in_batch if packed else None, in_mask))
  duplicate = lattice.has_duplicates(sorted_keys)
  if n == 0 or m == 0 or s == 0:
    return jnp.full((m, s), n, jnp.int32), duplicate
  table = _BlockTable.build(sorted_keys, perm, c_in, in_batch if packed else None)

  deltas = np.asarray(deltas, np.int32)
  lo_d = deltas.min(axis=0)
  reach = _reach(deltas)
  if int(np.prod(reach)) >= s:  # few slots over a wide window: a block look-up per query
    return _per_query(table, perm, c_out, out_mask, out_batch if packed else None,
                      deltas), duplicate
  # Each output's candidate blocks, looked up once: from the block of its window's lowest
  # corner, `reach` blocks per axis. Out of range or masked outputs: none.
  first = [(c_out[:, a] + lo_d[a]) >> sh for a, sh in enumerate(_BLOCK_SHIFT)]
  grid = np.stack(np.meshgrid(*[np.arange(r) for r in reach], indexing="ij"), -1)
  grid = grid.reshape(-1, 3).astype(np.int32)
  cand = [f[:, None] + grid[None, :, a] for a, f in enumerate(first)]  # (m, C) each
  cand_ok = functools.reduce(jnp.logical_and, [
      (ca >= 0) & (ca < (MAX_COORD >> sh)) for ca, sh in zip(cand, _BLOCK_SHIFT)],
                             out_mask[:, None])
  cand_ids = table.find(cand, jnp.broadcast_to(out_batch[:, None], cand[0].shape)
                        if packed else None)
  cand_ids = jnp.where(cand_ok, cand_ids, n)
  # Which candidate and which bit each query reads depends only on the output's position
  # within its block (its "phase": x, y mod 4, z mod 2) and the slot: a static table.
  phase = ((c_out[:, 0] & 3) * 4 + (c_out[:, 1] & 3)) * 2 + (c_out[:, 2] & 1)
  phases = _phase_table(tuple(map(tuple, deltas.tolist())), tuple(reach))
  code = _take(jnp.asarray(phases), phase)  # (m, s)
  cand_rows = _take(table.rows, cand_ids)  # (m, C, 2): the candidates' start and mask
  start, mask = (jnp.take_along_axis(cand_rows[..., i], code >> 5, axis=1) for i in (0, 1))
  pos, found = _locate(start, mask, (code & 31).astype(jnp.uint32))
  return jnp.where(found, _take(perm, pos), n).astype(jnp.int32), duplicate


def _reach(deltas):
  """Per axis, how many blocks an output's window (the slots' offsets ``deltas``) can touch
  (static): a window spanning ``w = hi - lo`` voxels past its first, in blocks of ``B``,
  starts at any phase ``p < B`` of its first block and ends in block ``(p + w) // B``, at
  most ``ceil(w / B)`` blocks on: ``ceil(w / B) + 1`` blocks. 2 x 2 x 2 = 8 for a 3 x 3 x 3
  kernel (w = 2), 2 x 2 x 3 = 12 for 5 x 5 x 5."""
  deltas = np.asarray(deltas, np.int64).reshape(-1, 3)
  span = deltas.max(axis=0) - deltas.min(axis=0)
  return [int(-(-span[a] // (1 << sh))) + 1 for a, sh in enumerate(_BLOCK_SHIFT)]


def _per_query(table, perm, c_out, out_mask, out_batch, deltas):
  """The look-up with one block look-up per query (kernels with few slots)."""
  n = perm.shape[0]
  q = [c_out[:, a, None] + deltas[None, :, a] for a in range(3)]  # (m, s) per axis
  q_ok = functools.reduce(jnp.logical_and, [(qa >= 0) & (qa < MAX_COORD) for qa in q],
                          out_mask[:, None])
  q = [jnp.clip(qa, 0, MAX_COORD - 1) for qa in q]
  ids = table.find([qa >> sh for qa, sh in zip(q, _BLOCK_SHIFT)],
                   None if out_batch is None else jnp.broadcast_to(out_batch[:, None], q[0].shape))
  row = _take(table.rows, ids)
  pos, found = _locate(row[..., 0], row[..., 1], _bit_in_block(*q))
  return jnp.where(q_ok & found, _take(perm, pos), n).astype(jnp.int32)


def _locate(start, mask, bit):
  """Sorted position of the voxel at ``bit`` of a block (its first input at ``start``,
  occupancy ``mask``), and whether it is there."""
  below = mask & ((jnp.uint32(1) << bit) - 1)
  pos = start.astype(jnp.int32) + jax.lax.population_count(below).astype(jnp.int32)
  return pos, ((mask >> bit) & 1) == 1


def _bit_in_block(x, y, z):
  """A voxel's index (0..31) in its block: its Morton code's lowest five bits (jnp or
  NumPy integers)."""
  return ((x & 1) | ((y & 1) << 1) | ((z & 1) << 2) | (((x >> 1) & 1) << 3)
          | (((y >> 1) & 1) << 4)).astype(jnp.uint32)


@functools.lru_cache(maxsize=None)
def _phase_table(deltas, reach):
  """int32 ``(32, S)`` for the slot offsets ``deltas`` (a tuple of ``(dx, dy, dz)``): for
  an output at phase ``(x % 4, y % 4, z % 2)`` and slot ``s``, ``32 * candidate + bit``:
  which of its candidate blocks the query falls in and its bit there."""
  deltas = np.asarray(deltas, np.int64).reshape(-1, 3)
  lo_d = deltas.min(axis=0)
  phases = np.stack(np.meshgrid(np.arange(4), np.arange(4), np.arange(2), indexing="ij"), -1)
  p = phases.reshape(-1, 1, 3)  # (32, 1, 3), row = (px * 4 + py) * 2 + pz
  shift = np.asarray(_BLOCK_SHIFT)
  local = ((p + deltas[None]) >> shift) - ((p + lo_d) >> shift)
  flat = (local[..., 0] * reach[1] + local[..., 1]) * reach[2] + local[..., 2]
  q = p + deltas[None]  # the query's coordinates modulo (4, 4, 2) give its bit
  bit = _bit_in_block(q[..., 0], q[..., 1], q[..., 2]).astype(np.int64)
  return (flat * 32 + bit).astype(np.int32)


def _take(a, idx):
  """``a[idx]`` for in-bounds indices (several times faster on CPU than ``a[idx]``)."""
  return jnp.take(a, idx, axis=0, mode="clip")


#: Bits of (x, y, z) below a block: a block is the 4 x 4 x 2 voxels whose Morton codes
#: share all but the lowest five bits (x0 y0 z0 x1 y1), so that the inputs of a block are
#: consecutive in sorted order and one uint32 holds its occupancy.
_BLOCK_SHIFT = (2, 2, 1)


def _hash(words):
  """A 32-bit hash of uint32 words (block coordinates, cloud index)."""
  h = jnp.uint32(0)
  for w, k in zip(words, (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)):
    h = h ^ (w.astype(jnp.uint32) * jnp.uint32(k))
  h = h ^ (h >> 15)
  return h * jnp.uint32(0x2C1B3C6D)


@dataclasses.dataclass(frozen=True)
class _BlockTable:
  """The inputs' occupied blocks in an open-addressing hash table.

  From the sorted keys, per occupied block: the position of its first input in sorted
  order and a 32-bit occupancy mask (bit = the voxel's lowest five Morton bits). The
  blocks, keyed by their block coordinates (and cloud index), sit in a table of
  ``2**(bit_length(n) + 2)`` entries (at most a quarter full) at ``hash + d`` for the
  smallest free ``d`` (linear probing, inserted in parallel rounds); a look-up walks
  from its hash to its block or an empty entry, at most ``max d + 1`` entries. Nothing
  depends on the coordinates' extent: the cost is set by the number of points and
  queries.
  """

  rows: jax.Array  # uint32 (n + 1, 2): per block, first sorted input and occupancy bits
  entries: jax.Array  # uint32 (H, 1 + words): block id (n: empty), then its key words
  probes: jax.Array  # int32 scalar, max d + 1

  @classmethod
  def build(cls, sorted_keys, perm, c_in, batch):
    n = perm.shape[0]
    valid = functools.reduce(jnp.logical_and, [w != lattice.SENTINEL_KEY for w in sorted_keys])
    new_key = ~lattice.same_as_previous(sorted_keys)
    new_block = valid & ~lattice.same_as_previous([*sorted_keys[:-1], sorted_keys[-1] >> 5])
    num_blocks = jnp.sum(new_block.astype(jnp.int32))
    bid = jnp.cumsum(new_block.astype(jnp.int32)) - 1
    at_first = jnp.where(new_block, bid, n + 1)  # scatter targets; n + 1 is dropped
    c = _take(c_in, perm)
    words = [c[:, a] >> sh for a, sh in enumerate(_BLOCK_SHIFT)]
    if batch is not None:
      words.append(_take(batch, perm))
    keys = [jnp.zeros(n + 1, jnp.uint32).at[at_first].set(w.astype(jnp.uint32), mode="drop")
            for w in words]
    start = jnp.zeros(n + 1, jnp.uint32).at[at_first].set(
        jnp.arange(n, dtype=jnp.uint32), mode="drop")
    bit = jnp.uint32(1) << (sorted_keys[-1] & 31)
    mask = jnp.zeros(n + 1, jnp.uint32).at[jnp.where(valid & new_key, bid, n + 1)].add(
        bit, mode="drop")  # one bit per distinct key: no carries, even with duplicates

    log_h = min(31, int(n).bit_length() + 2)  # 2**log_h entries: at most a quarter full
    size = 1 << log_h
    home = (_hash(keys) >> (32 - log_h)).astype(jnp.int32)
    ids = jnp.arange(n + 1, dtype=jnp.int32)

    def insert(state):  # each block to the first free entry from its hash on
      slots, todo, d = state
      at = (home + d) & (size - 1)
      try_here = todo & (_take(slots, at) == n)
      slots = slots.at[jnp.where(try_here, at, size)].min(ids, mode="drop")
      todo = todo & ~(try_here & (_take(slots, at) == ids))
      return slots, todo, jnp.where(todo, d + 1, d)

    # Initial values vary like the keys (inside shard_map, the carry's types must match).
    slots, _, d = jax.lax.while_loop(
        lambda st: jnp.any(st[1]), insert,
        sharding.match(jnp.full(size, n, jnp.int32), ids < num_blocks, jnp.zeros_like(home),
                  home)[:3])
    entries = jnp.stack([slots.astype(jnp.uint32)] + [_take(k, slots) for k in keys], -1)
    return cls(jnp.stack([start, mask], -1), entries, jnp.max(d) + 1)

  def find(self, block, batch):
    """Block id of each block coordinate (``block``: per axis, same shapes; ``n`` where
    no input is in that block)."""
    words = [b.astype(jnp.uint32) for b in block]
    if batch is not None:
      words.append(batch.astype(jnp.uint32))
    size = self.entries.shape[0]
    n = self.rows.shape[0] - 1
    home = (_hash(words) >> (32 - (size.bit_length() - 1))).astype(jnp.int32)

    def probe(d, home, words, found, open_):  # entry d from the hash of each open query
      entry = _take(self.entries, (home + d) & (size - 1))  # (..., 1 + words)
      hit = functools.reduce(jnp.logical_and,
                             [entry[..., i + 1] == w for i, w in enumerate(words)])
      empty = entry[..., 0] == n
      found = jnp.where(open_ & hit & ~empty, entry[..., 0].astype(jnp.int32), found)
      return found, open_ & ~hit & ~empty

    def probe_on(d, home, words, found, open_):  # entries d, d + 1, ... while any is open
      def body(st):
        return (st[0] + 1, *probe(st[0], home, words, *st[1:]))
      return jax.lax.while_loop(lambda st: (st[0] < self.probes) & jnp.any(st[2]), body,
                                (d, found, open_))[1]

    shape = home.shape
    home, words = home.reshape(-1), [w.reshape(-1) for w in words]
    total = home.shape[0]
    found, open_ = probe(0, home, words, *sharding.match(jnp.full(total, n, jnp.int32),
                                                    jnp.ones(total, bool), home)[:2])
    # Most queries are answered by the entry at their hash. The others go on in a buffer
    # of an eighth of the queries at a time, each until its block or an empty entry.
    cap = max(1, total // 8)

    def next_few(state):
      found, open_ = state
      (idx,) = jnp.nonzero(open_, size=cap, fill_value=total)
      sub = probe_on(1, _take(home, idx), [_take(w, idx) for w in words], _take(found, idx),
                     idx < total)
      return found.at[idx].set(sub, mode="drop"), open_.at[idx].set(False, mode="drop")

    found, _ = jax.lax.while_loop(lambda st: jnp.any(st[1]), next_few, (found, open_))
    return found.reshape(shape)
