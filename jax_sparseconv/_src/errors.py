"""Value errors: one rule for every function that checks array values.

Shape, dtype and static-argument problems are found at trace time and raise at once
(``checks.py``). Problems that depend on array *values* (a NaN position, a point off
the lattice, a duplicated voxel, a traced voxel size that is negative) cannot raise
from inside a traced program. Every function that checks values therefore follows one
rule (jax-md's ``PartitionErrorCode`` is the model):

1. It computes an int32 scalar of :class:`ErrorCode` bits and carries it as data (the
   ``flags`` of a :class:`KernelMap`; the voxel utilities and pooling carry theirs as the
   NaN poison of their results).
2. It calls :func:`report` on those flags:

   * outside ``jit`` (concrete flags) a set bit raises :class:`InvalidInputError`
     (a ``ValueError``) at once;
   * inside ``jit``/``vmap``/``grad``, in the default error mode ``"raise"``, a host
     callback raises the same error when the program runs (as a ``JaxRuntimeError``
     whose message holds it), so the error reaches the user whatever the program does
     with the poisoned values afterwards;
   * in error mode ``"flag"`` (:func:`set_error_mode`; for exported programs and
     production jobs that cannot have host callbacks) only the flags and the poison
     remain.

3. The conv functions poison (NaN) every output computed from a map with flags set,
   and the voxel utilities poison their positions and features, so that even in
   ``"flag"`` mode nothing plausible comes out of invalid input.
"""

from __future__ import annotations

import enum
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .morton import MAX_COORD

#: Largest allowed ``|p/voxel_size - round(p/voxel_size)|`` (relative to the reference point).
LATTICE_TOLERANCE = 0.1

ERROR_MODES = ("raise", "flag")


class ErrorCode(enum.IntFlag):
  """Bits of the ``flags`` that value-checking functions return (0: all is well)."""
  NONFINITE_POSITION = 1
  OFF_LATTICE = 2
  OUT_OF_RANGE = 4
  DUPLICATE_INPUT = 8
  BAD_VOXEL_SIZE = 16
  BAD_BATCH = 32
  CAPACITY_OVERFLOW = 64
  MAP_MISMATCH = 128

  @property
  def message(self) -> str:
    return _MESSAGES[self]


_MESSAGES = {
    ErrorCode.NONFINITE_POSITION: (
        "a valid position is NaN or infinite (padded rows of unique_voxels/voxelize/"
        "downsample results are NaN: pass their count as valid=/in_valid=/out_valid=)"),
    ErrorCode.OFF_LATTICE: (
        "positions do not lie on one regular lattice of spacing voxel_size (a coordinate is "
        f"more than {LATTICE_TOLERANCE} voxel from it); inputs and outputs must share one "
        "lattice"),
    ErrorCode.OUT_OF_RANGE: (
        f"the points (with the kernel's reach) span {MAX_COORD} voxels or more on an axis "
        "(the supported range)"),
    ErrorCode.DUPLICATE_INPUT: (
        "duplicated input voxels: Open3D counts each copy, a kernel map holds one point per "
        "voxel; merge them first with jax_sparseconv.unique_voxels"),
    ErrorCode.BAD_VOXEL_SIZE: "voxel_size is not positive and finite",
    ErrorCode.BAD_BATCH: "a batch index is negative (global pooling: or not below num_clouds)",
    ErrorCode.CAPACITY_OVERFLOW: "the result has more rows than the capacity given",
    ErrorCode.MAP_MISMATCH: "the voxel_size differs from the one the kernel_map was built with",
}


class InvalidInputError(ValueError):
  """A value error found in the inputs; ``code`` holds the :class:`ErrorCode` bits."""

  def __init__(self, where: str, code: int):
    self.code = ErrorCode(int(code))
    super().__init__(f"{where}: " + "; ".join(describe(code)))


def describe(flags) -> list[str]:
  """The messages of the bits set in ``flags`` (an int or a concrete array; OR-ed over
  any batch axes)."""
  code = int(np.bitwise_or.reduce(np.asarray(flags, np.int64).ravel(), initial=0))
  return [bit.message for bit in ErrorCode if code & bit]


def bit(condition, code: ErrorCode):
  """int32 scalar: ``code`` where any of ``condition`` holds, else 0."""
  return jnp.where(jnp.any(condition), jnp.int32(code), jnp.int32(0))


_mode = os.environ.get("JAX_SPARSECONV_ERRORS", "raise")
if _mode not in ERROR_MODES:
  raise ValueError(f"JAX_SPARSECONV_ERRORS must be one of {ERROR_MODES}, got {_mode!r}")


def set_error_mode(mode: str) -> str:
  """How value errors found inside ``jit``/``vmap`` reach you; returns the previous mode.

  * ``"raise"`` (default; also read from ``$JAX_SPARSECONV_ERRORS``): a host callback
    raises :class:`InvalidInputError` when the program runs (surfacing as a
    ``JaxRuntimeError`` that contains its message).
  * ``"flag"``: no callback; the error bits travel as data (``KernelMap.flags``) and the
    results are NaN (the voxel utilities' positions and features too). Use it for programs that must
    not call back to Python: ``jax.export``, some production serving setups.

  Outside ``jit`` errors always raise at once. Compiled programs keep the mode they were
  traced with, so this clears JAX's compilation caches.
  """
  global _mode
  if mode not in ERROR_MODES:
    raise ValueError(f"error mode must be one of {ERROR_MODES}, got {mode!r}")
  previous, _mode = _mode, mode
  if previous != mode:
    jax.clear_caches()
  return previous


def get_error_mode() -> str:
  """The current choice of :func:`set_error_mode`."""
  return _mode


def report(flags, where: str):
  """Applies the error rule to ``flags`` (see the module docstring); returns them."""
  if not isinstance(flags, jax.core.Tracer):
    if describe(flags):
      raise InvalidInputError(where, int(np.bitwise_or.reduce(np.asarray(flags).ravel())))
  elif _mode == "raise":
    jax.debug.callback(functools.partial(_raise_if_set, where=where), flags)
  return flags


def _raise_if_set(flags, *, where):
  if describe(flags):
    raise InvalidInputError(where, int(np.bitwise_or.reduce(np.asarray(flags).ravel())))


def poison(x, flags):
  """``x`` with every element NaN where ``flags`` is non-zero (floating ``x``)."""
  return jnp.where(flags != 0, jnp.array(jnp.nan, x.dtype), x)
