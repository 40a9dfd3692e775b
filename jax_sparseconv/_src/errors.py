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

import contextlib
import enum
import functools
import os
from collections.abc import Iterator

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
        "a coordinate is out of range: an index outside [0, spatial_shape) of its grid "
        f"(from_indices, dense), or points that (with the kernel's reach) span {MAX_COORD} "
        "voxels or more on an axis (the supported range)"),
    ErrorCode.DUPLICATE_INPUT: (
        "duplicated input voxels: Open3D counts each copy, a kernel map holds one point per "
        "voxel. Several clouds in one array? Pass their cloud ids as batch= (spconv's "
        "indices[:, 0]; SparseTensor.from_indices takes them). One cloud with repeated "
        "points? Merge them first with jax_sparseconv.unique_voxels"),
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


def _checked_mode(mode: str, what: str = "error mode") -> str:
  if mode not in ERROR_MODES:
    raise ValueError(f"{what} must be one of {ERROR_MODES}, got {mode!r}")
  return mode


# A jit-cache-sensitive JAX user context: a program traced in one mode is never reused in
# the other (so switching needs no cache clearing).
_setting = jax.make_user_context(
    _checked_mode(os.environ.get("JAX_SPARSECONV_ERRORS", "raise"), "JAX_SPARSECONV_ERRORS"))


def set_error_mode(mode: str) -> str:
  """How value errors found inside ``jit``/``vmap`` reach you, for the process; returns
  the previous mode.

  * ``"raise"`` (default; also read from ``$JAX_SPARSECONV_ERRORS``): a host callback
    raises :class:`InvalidInputError` when the program runs (surfacing as a
    ``JaxRuntimeError`` that contains its message).
  * ``"flag"``: no callback; the error bits travel as data (``KernelMap.flags``) and the
    results are NaN (the voxel utilities' positions and features too). Use it for programs that must
    not call back to Python: ``jax.export``, some production serving setups.

  Outside ``jit`` errors always raise at once. The mode is part of ``jax.jit``'s cache
  key: functions traced before keep their programs for the old mode and are traced anew
  for the new one; no cache is cleared. For one block of code, use :func:`error_mode`.
  """
  previous = _setting.get_global()
  _setting.set_global(_checked_mode(mode))
  return previous


@contextlib.contextmanager
def error_mode(mode: str) -> Iterator[str]:
  """``with sc.error_mode("flag"): ...``: the mode of :func:`set_error_mode` for the
  programs traced inside the block (this thread only); the process setting is untouched.

  >>> import jax_sparseconv as sc
  >>> with sc.error_mode("flag"):
  ...   sc.get_error_mode()
  'flag'
  """
  with _setting(_checked_mode(mode)):
    yield mode


def get_error_mode() -> str:
  """The mode in effect here: the innermost :func:`error_mode` block's, else the process
  setting."""
  return _setting.value


def report(flags, where: str):
  """Applies the error rule to ``flags`` (see the module docstring); returns them."""
  if not isinstance(flags, jax.core.Tracer):
    if describe(flags):
      raise InvalidInputError(where, int(np.bitwise_or.reduce(np.asarray(flags).ravel())))
  elif get_error_mode() == "raise":
    jax.debug.callback(functools.partial(_raise_if_set, where=where), flags)
  return flags


def _raise_if_set(flags, *, where):
  if describe(flags):
    raise InvalidInputError(where, int(np.bitwise_or.reduce(np.asarray(flags).ravel())))


def poison(x, flags):
  """``x`` with every element NaN where ``flags`` is non-zero (floating ``x``)."""
  return jnp.where(flags != 0, jnp.array(jnp.nan, x.dtype), x)
