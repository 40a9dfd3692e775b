"""A deterministic, resumable input pipeline over a random-access data source.

Batch ``step`` is a pure function of ``(seed, step)``: it is batch
``step % steps_per_epoch`` of epoch ``e = step // steps_per_epoch``, made of the
examples at those positions of epoch ``e``'s order (a permutation drawn from
``(seed, e)``), example ``i`` being ``transform(source[i], example_rng(seed, e, i))``.
Resuming a run is starting at the step it stopped at: nothing else is saved. The
state is :class:`PipelineState` ``(epoch, position)`` (``position`` the batch within
the epoch), equivalently the step ``epoch * steps_per_epoch + position``
(:meth:`Pipeline.state`, :meth:`Pipeline.step_of`); every batch carries ``step``,
``epoch`` and ``position``, so the last batch consumed tells where to restart.

:class:`Pipeline` is itself a random-access sequence of batches (``len``, ``[step]``);
:meth:`Pipeline.batches` iterates from any step on the calling thread, and
:func:`grain_dataset` hands the same batches to `grain <https://github.com/google/grain>`_
(optional: ``pip install 'jax_sparseconv[data]'``) for thread or process prefetching
with a checkpointable iterator; the batches are identical either way.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .transforms import example_rng, pack_batch, pad_batch

_TAG_SHUFFLE = 0x6A73_6302  # example_rng uses 0x6A736301: the streams never collide


class PipelineState(NamedTuple):
  """Where a :class:`Pipeline` is: batch ``position`` of epoch ``epoch`` (both >= 0).

  A plain pair of ints (checkpoint it as ``state._asdict()``); the next batch to
  read after batch ``b`` is ``pipeline.state(int(b["step"]) + 1)``.
  """
  epoch: int
  position: int


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order of the examples in epoch ``epoch``.

  Args:
    num_examples: the source's length.
    seed: the run's seed.
    epoch: the epoch (>= 0).
    shuffle: False: ``arange(num_examples)`` in every epoch.

  Returns:
    int64 ``(num_examples,)``: a permutation drawn from ``(seed, epoch)`` alone.
  """
  if not shuffle:
    return np.arange(num_examples)
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [_TAG_SHUFFLE, int(seed), int(epoch), 0])))
  return rng.permutation(num_examples)


class Pipeline:
  """Batches of transformed examples, a pure function of ``(seed, step)``.

  Args:
    source: random-access clouds (``len``, ``[i]``), e.g.
      :class:`~jax_sparseconv.datasets.semantic_kitti.SemanticKITTI`.
    transform: ``(cloud, rng) -> example``, a dict of per-row arrays and per-example
      scalars (e.g. ``functools.partial(transforms.voxel_example, voxel_size=0.05)``).
    batch_size: examples per batch.
    capacity: rows per example (``collate="pad"``) or per batch (``"pack"``).
    seed: the run's seed (>= 0).
    collate: ``"pad"`` (:func:`~.transforms.pad_batch`: ``(B, capacity, ...)`` and
      counts, for ``vmap``) or ``"pack"`` (:func:`~.transforms.pack_batch`:
      ``(capacity, ...)`` and cloud ids).
    shuffle: a new order every epoch (else the source's order).
    num_epochs: epochs :func:`len` counts (the steps are defined for every epoch).
    on_overflow: passed to the collate function (``"raise"`` or ``"truncate"``).
    fill: padding values by key, passed to the collate function.

  An epoch has ``len(source) // batch_size`` batches (the last partial batch is
  dropped, so every batch has ``batch_size`` examples and one shape).
  """

  def __init__(self, source, transform: Callable, *, batch_size: int, capacity: int,
               seed: int = 0, collate: str = "pad", shuffle: bool = True,
               num_epochs: int = 1, on_overflow: str = "raise", fill: Mapping | None = None):
    if collate not in ("pad", "pack"):
      raise ValueError(f"collate must be 'pad' or 'pack', got {collate!r}")
    if batch_size < 1 or len(source) < batch_size:
      raise ValueError(f"batch_size {batch_size} for {len(source)} examples")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.source, self.transform = source, transform
    self.batch_size, self.capacity, self.seed = int(batch_size), int(capacity), int(seed)
    self.collate, self.shuffle, self.num_epochs = collate, shuffle, int(num_epochs)
    self.on_overflow, self.fill = on_overflow, fill
    self._order = {}

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch: ``len(source) // batch_size``."""
    return len(self.source) // self.batch_size

  def state(self, step: int) -> PipelineState:
    """The :class:`PipelineState` ``(epoch, position)`` of batch ``step``."""
    if step < 0:
      raise IndexError(f"step must be >= 0, got {step}")
    return PipelineState(*divmod(int(step), self.steps_per_epoch))

  def step_of(self, state) -> int:
    """The step of a :class:`PipelineState` (or an ``(epoch, position)`` pair or dict)."""
    if isinstance(state, Mapping):
      state = (state["epoch"], state["position"])
    epoch, position = (int(v) for v in state)
    if epoch < 0 or not 0 <= position < self.steps_per_epoch:
      raise ValueError(f"state {state} out of range: epoch >= 0, 0 <= position < "
                       f"{self.steps_per_epoch}")
    return epoch * self.steps_per_epoch + position

  def order(self, epoch: int) -> np.ndarray:
    """Example indices of epoch ``epoch``, in order (:func:`epoch_order`)."""
    order = self._order.get(epoch)  # a small cache, safe under grain's reader threads
    if order is None:
      order = epoch_order(len(self.source), self.seed, epoch, self.shuffle)
      if len(self._order) > 4:
        self._order = {}
      self._order[epoch] = order
    return order

  def example(self, epoch: int, index: int) -> dict:
    """Example ``index`` (of the source) as epoch ``epoch`` sees it."""
    return self.transform(self.source[int(index)], example_rng(self.seed, epoch, int(index)))

  def indices(self, step: int) -> tuple[int, np.ndarray]:
    """``(epoch, example indices)`` of batch ``step``."""
    if step < 0:
      raise IndexError(f"step must be >= 0, got {step}")
    epoch, k = divmod(int(step), self.steps_per_epoch)
    return epoch, self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

  def collate_examples(self, examples: Sequence[Mapping]) -> dict:
    """Collates examples as this pipeline does (:func:`pad_batch` / :func:`pack_batch`)."""
    fn = pad_batch if self.collate == "pad" else pack_batch
    return fn(examples, self.capacity, fill=self.fill, on_overflow=self.on_overflow)

  def batch(self, step: int) -> dict:
    """Batch ``step``: the collated examples plus ``step``, ``epoch``, ``position``
    (int64 scalars) and ``index`` (int64 ``(B,)`` source indices)."""
    epoch, idx = self.indices(step)
    out = self.collate_examples([self.example(epoch, i) for i in idx])
    out.update(step=np.int64(step), epoch=np.int64(epoch),
               position=np.int64(int(step) % self.steps_per_epoch), index=idx.astype(np.int64))
    return out

  def batches(self, start_step: int = 0, num_steps: int | None = None, *,
              state=None) -> Iterator[dict]:
    """Batches ``start_step, start_step + 1, ...`` (``num_steps`` of them, else forever,
    past ``num_epochs``: the steps are defined for every epoch).

    Args:
      start_step: the first batch.
      num_steps: how many batches (None: no end).
      state: instead of ``start_step``, a :class:`PipelineState` (or pair, or dict)
        to start from.
    """
    if state is not None:
      start_step = self.step_of(state)
    step = int(start_step)
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1

  def __len__(self) -> int:
    """Batches in ``num_epochs`` epochs."""
    return self.steps_per_epoch * self.num_epochs

  def __getitem__(self, step: int) -> dict:
    """Batch ``step`` (``0 <= step < len(self)``)."""
    if not 0 <= step < len(self):
      raise IndexError(f"step {step} out of range for {len(self)} steps")
    return self.batch(step)

  def __repr__(self):  # grain checks a checkpoint's source by its repr
    return (f"Pipeline({self.source!r}, {getattr(self.transform, '__name__', self.transform)!r}, "
            f"batch_size={self.batch_size}, capacity={self.capacity}, seed={self.seed}, "
            f"collate={self.collate!r}, shuffle={self.shuffle}, num_epochs={self.num_epochs})")


class _Steps:
  """Steps ``start .. start + n`` of a pipeline as a sequence (grain's source)."""

  def __init__(self, pipeline, start, n):
    self.pipeline, self.start, self.n = pipeline, start, n

  def __len__(self):
    return self.n

  def __getitem__(self, k):
    return self.pipeline.batch(self.start + int(k))

  def __repr__(self):
    return f"_Steps({self.pipeline!r}, {self.start}, {self.n})"


def grain_dataset(pipeline: Pipeline, *, start_step: int = 0, num_steps: int | None = None,
                  num_threads: int = 2, prefetch: int = 4):
  """The pipeline's batches as a ``grain.IterDataset`` (needs the ``grain`` package).

  Element ``k`` is ``pipeline.batch(start_step + k)``, so the batches equal the plain
  path's, whatever the prefetching; the iterator's ``get_state()`` / ``set_state()``
  checkpoint it. For process workers, call ``.mp_prefetch(grain.MultiprocessingOptions(
  num_workers=...))`` on the result (grain's workers need absl flags parsed: run under
  ``absl.app.run`` or call ``absl.flags.FLAGS.mark_as_parsed()``, and guard the main
  module with ``if __name__ == "__main__"``).

  Args:
    pipeline: the :class:`Pipeline`.
    start_step: the first batch.
    num_steps: how many (default: up to ``len(pipeline)``).
    num_threads: grain reader threads (0: read on the iterating thread).
    prefetch: batches read ahead.

  Raises:
    ImportError: grain is not installed.
  """
  try:
    import grain  # deferred: grain imports jax, and is optional
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("grain_dataset needs grain: pip install 'jax_sparseconv[data]' "
                      "(or pip install 'grain>=0.2')") from e
  n = len(pipeline) - start_step if num_steps is None else int(num_steps)
  if n < 0:
    raise ValueError(f"start_step {start_step} is past the pipeline's {len(pipeline)} steps")
  ds = grain.MapDataset.source(_Steps(pipeline, int(start_step), n))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
