"""The input pipeline: batches a pure function of ``(seed, step)``; resuming from a state
``(epoch, position)`` gives the same batches; grain (optional) gives the same batches."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from jax_sparseconv.datasets import pipeline as P, semantic_kitti as sk, synthetic
from jax_sparseconv.datasets import transforms as T


class Clouds:
  """A small in-memory source: cloud ``i`` has ``5 + i % 4`` points."""

  def __init__(self, n):
    self.n = n
    self.reads = 0

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads += 1
    rng = np.random.default_rng(i)
    k = 5 + i % 4
    return dict(coord=rng.random((k, 3)).astype(np.float32) * 4,
                label=rng.integers(0, 3, k).astype(np.int32), name=f"c{i}")

  def __repr__(self):
    return f"Clouds({self.n})"


def _make(cloud, rng):
  return T.voxel_example(cloud, rng, voxel_size=0.5, augmentation=dict(jitter=0.01))


def _pipe(**kw):
  args = dict(batch_size=3, capacity=16, seed=5, num_epochs=3)
  args.update(kw)
  return P.Pipeline(Clouds(10), _make, **args)


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      assert a[k] == b[k], k


def test_epoch_order():
  a = P.epoch_order(10, 5, 0)
  assert sorted(a.tolist()) == list(range(10))
  np.testing.assert_array_equal(a, P.epoch_order(10, 5, 0))
  assert not np.array_equal(a, P.epoch_order(10, 5, 1))
  assert not np.array_equal(a, P.epoch_order(10, 6, 0))
  np.testing.assert_array_equal(P.epoch_order(10, 5, 3, shuffle=False), np.arange(10))


def test_deterministic():
  a, b = _pipe(), _pipe()
  assert len(a) == 9 and a.steps_per_epoch == 3
  for step in range(len(a)):
    _equal(a[step], b[step])
  # the order of reading does not matter: a batch is a function of (seed, step)
  _equal(a[7], _pipe()[7])
  # another seed: other batches
  assert not np.array_equal(a[0]["positions"], _pipe(seed=6)[0]["positions"],
                            equal_nan=True)


def test_epochs_cover_the_source_once():
  p = _pipe()
  for epoch in range(3):
    idx = np.concatenate([p[epoch * 3 + k]["index"] for k in range(3)])
    assert len(set(idx.tolist())) == 9  # 10 examples, 3 batches of 3: one left out
    assert all(int(p[epoch * 3 + k]["epoch"]) == epoch for k in range(3))
  # augmentation differs between epochs for the same example
  e0 = p.example(0, 4)
  e1 = p.example(1, 4)
  assert not np.array_equal(e0["positions"], e1["positions"])


def test_state_and_resume():
  p = _pipe()
  assert p.state(0) == P.PipelineState(0, 0) and p.state(7) == P.PipelineState(2, 1)
  assert p.step_of((2, 1)) == 7 and p.step_of({"epoch": 2, "position": 1}) == 7
  assert p.step_of(p.state(5)) == 5
  with pytest.raises(ValueError):
    p.step_of((0, 3))
  # a run that stops after 4 batches and restarts from its saved state
  first = list(p.batches(0, 4))
  last = first[-1]
  saved = P.PipelineState(int(last["epoch"]), int(last["position"]))
  nxt = p.state(p.step_of(saved) + 1)
  restarted = _pipe()  # a fresh process: nothing but the state is carried over
  rest = list(restarted.batches(state=nxt, num_steps=5))
  whole = list(_pipe().batches(0, 9))
  for a, b in zip(first + rest, whole):
    _equal(a, b)
  assert [int(b["step"]) for b in rest] == [4, 5, 6, 7, 8]
  assert int(rest[0]["position"]) == 1 and int(rest[0]["epoch"]) == 1


def test_batches_past_num_epochs_and_indexing():
  p = _pipe(num_epochs=1)
  assert len(p) == 3
  with pytest.raises(IndexError):
    p[3]
  more = list(p.batches(2, 3))  # batches() goes on into the next epochs
  assert [int(b["epoch"]) for b in more] == [0, 1, 1]
  with pytest.raises(IndexError):
    p.batch(-1)


def test_pack_collate_and_overflow():
  p = _pipe(collate="pack", capacity=40)
  b = p[0]
  assert b["positions"].shape == (40, 3) and b["batch"].shape == (40,)
  assert int(b["count"]) == int(b["counts"].sum()) and b["dropped"].sum() == 0
  with pytest.raises(ValueError, match="capacity"):
    _pipe(collate="pack", capacity=4)[0]
  t = _pipe(collate="pack", capacity=4, on_overflow="truncate")[0]
  assert int(t["count"]) == 4 and t["dropped"].sum() > 0  # counted, not silent


def test_validation():
  with pytest.raises(ValueError):
    _pipe(collate="stack")
  with pytest.raises(ValueError):
    _pipe(batch_size=11)
  with pytest.raises(ValueError):
    _pipe(seed=-1)


def test_semantic_kitti_end_to_end(tmp_path):
  synthetic.write_semantic_kitti(tmp_path, {"00": 3}, az_steps=256)
  make = functools.partial(T.voxel_example, voxel_size=0.2, feat_keys=("strength",),
                           ignore_index=sk.IGNORE_INDEX,
                           point_cloud_range=(-40, -40, -4, 40, 40, 2),
                           augmentation=dict(scale=(0.95, 1.05)), capacity=30_000)
  p = P.Pipeline(sk.SemanticKITTI(tmp_path, "train"), make, batch_size=2, capacity=30_000,
                 seed=0, num_epochs=2)
  b = p[1]
  assert b["positions"].shape == (2, 30_000, 3) and b["feats"].shape == (2, 30_000, 1)
  assert np.all(b["overflow"] == 0) and np.all(b["count"] > 1000)
  lab = b["labels"][b["valid"]]
  assert lab.min() >= 1 and lab.max() <= 19  # every voxel labelled, training ids
  assert np.all(b["labels"][~b["valid"]] == 0)
  _equal(b, P.Pipeline(sk.SemanticKITTI(tmp_path, "train"), make, batch_size=2,
                       capacity=30_000, seed=0, num_epochs=2)[1])


# ----------------------------------------------------------------------------- grain


def test_grain_gives_the_same_batches():
  grain = pytest.importorskip("grain")
  p = _pipe()
  ds = P.grain_dataset(p, num_threads=2, prefetch=2)
  it = iter(ds)
  got = [next(it) for _ in range(4)]
  for k, b in enumerate(got):
    _equal(b, p[k])
  # grain's own checkpoint: a new iterator set to the state continues identically
  state = it.get_state()
  it2 = iter(P.grain_dataset(_pipe(), num_threads=2, prefetch=2))
  it2.set_state(state)
  for k in range(4, 9):
    _equal(next(it2), p[k])
  with pytest.raises(StopIteration):
    next(it2)
  # and a start step, as the plain path
  ds = P.grain_dataset(p, start_step=7, num_threads=0)
  assert [int(b["step"]) for b in ds] == [7, 8]
  assert isinstance(ds, grain.IterDataset)


def test_grain_missing_is_a_clear_error(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "grain", None)  # import grain raises ImportError
  with pytest.raises(ImportError, match="jax_sparseconv\\[data\\]"):
    P.grain_dataset(_pipe())
