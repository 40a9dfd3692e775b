"""``jax.export`` support: the safety checks to disable, and the error mode to trace in.

``jax.export`` refuses custom calls that are not on its list of targets with a
compatibility guarantee; this library's compiled kernels are XLA FFI custom calls
(``_src/ffi.py``), so an exported program that uses them must name them in
``disabled_checks``. And in the default error mode ``"raise"`` a jitted program carries a
``jax.debug.callback`` (the value-error report, see ``_src/errors.py``), which
``Exported.serialize()`` cannot serialize: trace the exported function in error mode
``"flag"`` (invalid inputs then give NaN outputs and error bits, no exception).

Typical use::

    with sc.export_mode():
      exported = jax.export.export(jax.jit(infer), platforms=("cpu", "cuda"),
                                   disabled_checks=sc.export_disabled_checks())(*args)
    blob = exported.serialize()            # needs the `flatbuffers` package

and, in the process that loads it::

    import jax_sparseconv                  # registers the FFI targets: before the call
    exported = jax.export.deserialize(blob)
    y = exported.call(*args)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from . import errors, ffi

__all__ = ["export_disabled_checks", "export_mode"]


def export_disabled_checks() -> list[jax.export.DisabledSafetyCheck]:
  """The ``DisabledSafetyCheck`` of every FFI custom call this installation registers.

  Pass it as ``jax.export.export(f, disabled_checks=...)``. It names every target of
  the compiled builds present (the native CPU kernels, the CUDA kernels' host build and,
  when built with nvcc, the CUDA kernels), whichever the traced program uses; an empty
  list when no build is installed (everything then runs as plain jnp). Trace the
  exported function inside :func:`export_mode` (or with ``set_error_mode("flag")``):
  the default error mode's host callback cannot be serialized.

  Example::

    >>> import jax_sparseconv as sc
    >>> checks = sc.export_disabled_checks()
    >>> all(str(c).startswith("custom_call:jsc_") for c in checks)
    True

  A program exported this way needs, where it is loaded, ``import jax_sparseconv``
  (which registers the targets) from a version whose kernels have the same names and
  argument layout; no compatibility guarantee spans versions of this library.
  """
  names = sorted({name for name, _platform in ffi.targets})
  return [jax.export.DisabledSafetyCheck.custom_call(name) for name in names]


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
  """Error mode ``"flag"`` for the duration (restoring the previous mode after): the
  mode in which to trace a function for ``jax.export``.

  In the default mode ``"raise"`` a jitted program reports invalid inputs through a
  ``jax.debug.callback``, which ``Exported.serialize()`` cannot serialize. In ``"flag"``
  mode invalid inputs give NaN outputs and error bits (``KernelMap.flags``; return them
  from the exported function to inspect them). Also usable as a decorator.

  Example::

    >>> import jax_sparseconv as sc
    >>> previous = sc.get_error_mode()
    >>> with sc.export_mode():
    ...   sc.get_error_mode()
    'flag'
    >>> sc.get_error_mode() == previous
    True
  """
  with errors.error_mode("flag"):
    yield
