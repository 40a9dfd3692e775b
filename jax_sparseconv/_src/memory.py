"""Memory limits: a clear error before allocation, instead of an OOM kill.

Two checks, both before anything is allocated:

* :func:`check_kernel_map` runs when a kernel map is traced (shapes are static): the map's
  own arrays (neighbours and inverse, ``4 * num_slots`` bytes per output and per input,
  plus the search's sort keys) must fit in the device's memory. A map that cannot fit is a
  :class:`ResourceLimitError` at once, eager or under ``jit``.
* :func:`compile_checked` compiles a whole function and compares XLA's own prediction of its
  peak memory (``memory_analysis()``: arguments, outputs and temporaries) with the device's
  memory: the check for a training step, whose peak is many layers' activations.

The device's memory is the cgroup limit or the physical memory on the CPU (not what is
free right now: a program that needs more than the machine has cannot run; one that needs
more than is free may), ``memory_stats()["bytes_limit"]`` on a GPU, or
``$JAX_SPARSECONV_MEMORY_LIMIT`` (bytes; suffixes K, M, G, KiB, MiB, GiB) when set.
"""

from __future__ import annotations

import functools
import os
import re

import jax

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}

# Bytes per point of the search's transient arrays besides the map itself (keys, sorted
# keys, permutation, block tables), a lower bound of what the native and jnp searches hold.
_SEARCH_BYTES_PER_POINT = 24


class ResourceLimitError(MemoryError):
  """A computation would need more memory than the device has (raised before allocating)."""


def _parse_bytes(text: str) -> int:
  m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
  unit = m.group(2).lower().removesuffix("b") if m else None
  if unit not in _UNITS:
    raise ValueError(f"JAX_SPARSECONV_MEMORY_LIMIT={text!r}: expected bytes, e.g. 8GiB")
  return int(float(m.group(1)) * _UNITS[unit])


@functools.cache  # the machine's memory does not change while it runs
def _cpu_bytes() -> int | None:
  limits = []
  try:
    limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    pass
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        text = f.read().strip()
      if text.isdigit() and int(text) < 2**60:
        limits.append(int(text))
    except OSError:
      pass
  return min(limits) if limits else None


def available_bytes(device=None) -> int | None:
  """The memory of ``device`` (default: the default backend's first device) in bytes, as
  the module docstring defines it; None when unknown (then nothing is checked)."""
  env = os.environ.get("JAX_SPARSECONV_MEMORY_LIMIT")
  if env:
    return _parse_bytes(env)
  device = device if device is not None else jax.devices()[0]
  if device.platform == "cpu":
    return _cpu_bytes()
  try:
    stats = device.memory_stats() or {}
  except Exception:  # not every backend reports memory
    return None
  return stats.get("bytes_limit")


def _gib(nbytes: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if nbytes >= size:
      return f"{nbytes / size:.2f} {unit}"
  return f"{int(nbytes)} bytes"


def check_fits(what: str, nbytes: int, device=None, hint: str = "") -> None:
  """Raises :class:`ResourceLimitError` when ``nbytes`` exceed the device's memory."""
  limit = available_bytes(device)
  if limit is not None and nbytes > limit:
    raise ResourceLimitError(
        f"{what} needs at least {_gib(nbytes)} but the device has {_gib(limit)} "
        f"(JAX_SPARSECONV_MEMORY_LIMIT overrides the limit).{hint}")


def kernel_map_bytes(num_in: int, num_out: int, num_slots: int) -> int:
  """The bytes a kernel map and its search hold at least: the (num_out, num_slots)
  neighbours and (num_in, num_slots) inverse in int32, plus the sort keys."""
  return 4 * num_slots * (num_in + num_out) + _SEARCH_BYTES_PER_POINT * (num_in + num_out)


def check_kernel_map(num_in: int, num_out: int, num_slots: int) -> None:
  """The trace-time check of :func:`build_kernel_map` (shapes only, nothing allocated; under
  ``vmap`` the shapes, and so the check, are per cloud)."""
  nbytes = kernel_map_bytes(num_in, num_out, num_slots)
  check_fits(f"build_kernel_map: a map of {num_out} outputs x {num_slots} slots "
             f"over {num_in} inputs", nbytes,
             hint=" Split the cloud (packed batches of fewer points), or use a smaller kernel.")


def compile_checked(fn, *args, limit_bytes: int | None = None, **kwargs):
  """``jax.jit(fn).lower(*args, **kwargs).compile()``, raising :class:`ResourceLimitError`
  when XLA's predicted peak (arguments + outputs + temporaries) exceeds ``limit_bytes``
  (default: :func:`available_bytes`). Returns the compiled function.

  >>> import jax.numpy as jnp
  >>> f = compile_checked(lambda x: x * 2, jnp.ones(3))
  >>> f(jnp.ones(3)).tolist()
  [2.0, 2.0, 2.0]
  """
  compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs).compile()
  limit = limit_bytes if limit_bytes is not None else available_bytes()
  peak = predicted_peak_bytes(compiled)
  if limit is not None and peak is not None and peak > limit:
    raise ResourceLimitError(
        f"compile_checked: XLA predicts a peak of {_gib(peak)} (arguments, outputs and "
        f"temporaries) but the limit is {_gib(limit)}. Use fewer points per step (smaller "
        f"clouds, fewer clouds per batch), fewer channels, or more devices.")
  return compiled


def predicted_peak_bytes(compiled) -> int | None:
  """XLA's predicted peak memory of a compiled function, in bytes (None if unknown)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # memory analysis is optional for a backend
    return None
  if stats is None:
    return None
  # Arguments + outputs + temporaries (XLA's buffer assignment); on some backends
  # ``peak_memory_in_bytes`` counts only the arguments and outputs, so take the larger.
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return int(max(total, getattr(stats, "peak_memory_in_bytes", 0) or 0))
