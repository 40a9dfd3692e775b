"""Which implementation runs an op: jnp, the native CPU kernels, or the CUDA source.

One setting (:func:`set_kernel_backend` for the process, :func:`kernel_backend` for a
``with`` block) and one function that applies it (:func:`dispatch`). The setting is read
when a program is traced and is part of ``jax.jit``'s cache key (a JAX user context), so
changing it retraces what runs next and drops nothing from the caches; the choice between
platforms is made at lowering, per platform, through ``jax.lax.platform_dependent``, so a
CPU program never names a CUDA target. The kernels themselves and their ``ffi_call``
wrappers live in ``ffi.py``.

The CUDA branch is lowered only where the CUDA kernels can run: where this process has
CUDA devices, each must pass ``cuda_support.check_devices`` (driver, compute capability,
a probe launch), checked once; otherwise the jnp implementation serves on the GPU, with
one warning saying why (and ``kernel_builds()`` says it too). A process without CUDA
devices keeps the branch, for programs exported to CUDA.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import jax

from . import cuda_support, ffi

BACKENDS = ("auto", "jnp", "host")


def _checked(backend: str, what: str = "backend") -> str:
  if backend not in BACKENDS:
    raise ValueError(f"{what} must be one of {BACKENDS}, got {backend!r}")
  if backend == "host" and ffi.host is None:
    raise RuntimeError("backend 'host' needs the compiled host kernels (jax_sparseconv."
                       "_host_kernels), which this installation lacks; reinstall with a C++ "
                       "compiler")
  return backend


# A jit-cache-sensitive JAX user context: a program traced under one value is never reused
# under another (so switching needs no cache clearing).
_setting = jax.make_user_context(
    _checked(os.environ.get("JAX_SPARSECONV_KERNELS", "auto"), "JAX_SPARSECONV_KERNELS"))


def set_kernel_backend(backend: str) -> str:
  """Chooses the implementation of the compiled ops for the process; returns the previous
  choice.

  * ``"auto"`` (default; also read from ``$JAX_SPARSECONV_KERNELS``): the CUDA kernels
    on NVIDIA GPUs when the package was built with nvcc; on the CPU the native
    kernels (float32 conv: forward, feature and weight gradients; the neighbour
    search) and the jnp implementation for the other dtypes.
  * ``"jnp"``: the jnp implementation everywhere.
  * ``"host"``: the CUDA kernels on GPUs, and on the CPU the CUDA kernels compiled for
    the host (slow; for testing and debugging the kernels without a GPU).

  The setting is part of ``jax.jit``'s cache key: functions traced before keep their
  compiled programs for the old setting, and are traced anew for the new one. No cache
  is cleared. For one block of code, use :func:`kernel_backend` instead.
  """
  previous = _setting.get_global()
  _setting.set_global(_checked(backend))
  return previous


@contextlib.contextmanager
def kernel_backend(backend: str) -> Iterator[str]:
  """``with sc.kernel_backend("jnp"): ...``: the backend of :func:`set_kernel_backend` for
  the programs traced inside the block (this thread only); the process setting is
  untouched.

  >>> import jax_sparseconv as sc
  >>> with sc.kernel_backend("jnp"):
  ...   sc.get_kernel_backend()
  'jnp'
  """
  with _setting(_checked(backend)):
    yield backend


def get_kernel_backend() -> str:
  """The backend in effect here: the innermost :func:`kernel_backend` block's, else the
  process setting."""
  return _setting.value


def kernel_builds() -> dict[str, bool | str]:
  """Which compiled builds this installation carries, and whether the CUDA one runs here:
  ``{"cuda": built, "host": built, "cuda_usable": runs on this process's GPUs,
  "cuda_reason": why (or why not)}``. Where ``cuda_usable`` is False on a machine with
  GPUs, the jnp implementation runs on them instead."""
  _, usable, reason = cuda_status()
  return {"cuda": ffi.cuda is not None, "host": ffi.host is not None,
          "cuda_usable": usable, "cuda_reason": reason}


# (lower the CUDA branch, the kernels run on this process's GPUs, why): decided once.
_cuda_state: tuple[bool, bool, str] | None = None
_warned = False


def _cuda_devices():
  """This process's CUDA devices (in a multi-host run, ``jax.devices("cuda")`` would list
  every host's: those cannot be probed from here)."""
  try:
    return jax.local_devices(backend="cuda")
  except RuntimeError:  # no CUDA backend in this process
    return []


def _missing_build_reason() -> str:
  """Why ``ffi.cuda`` is None: a build that failed to import, or none at all."""
  error = ffi.load_errors.get("_cuda_kernels")
  if error is not None:
    return (f"the CUDA build is installed but failed to load ({error}); reinstall with "
            "JSC_CUDA=ON to see the build's errors")
  return ("not built (no nvcc at install time; jax[cuda] wheels bring none: install a CUDA "
          "toolkit >= 12.8, e.g. /usr/local/cuda, then reinstall with JSC_CUDA=ON)")


def cuda_status() -> tuple[bool, bool, str]:
  """``(lower the CUDA branch, usable, reason)``, decided on first use (the check launches
  a probe kernel on each GPU) and kept for the process."""
  global _cuda_state
  if _cuda_state is None:
    if ffi.cuda is None:
      state = (False, False, _missing_build_reason())
    else:
      devices = _cuda_devices()
      if not devices:
        state = (True, False, "no CUDA device in this process (the CUDA branch is still "
                              "lowered, for programs exported to CUDA)")
      else:
        try:
          ok, reason = cuda_support.check_devices(ffi.cuda, devices)
        except Exception as e:  # noqa: BLE001 - never fail where jnp would run
          ok, reason = False, f"the check itself failed: {e!r}"
        state = (ok, ok, reason)
    _cuda_state = state
  return _cuda_state


def _warn_fallback(reason: str) -> None:
  global _warned
  if not _warned:
    _warned = True
    warnings.warn(f"jax_sparseconv: the CUDA kernels cannot run here ({reason}); the jnp "
                  "implementation runs on the GPU instead. sc.kernel_builds() reports this.",
                  RuntimeWarning, stacklevel=4)


def _lower_cuda() -> bool:
  """Whether to lower the CUDA branch (see :func:`cuda_status`); where not, one warning
  when the process has GPUs that the jnp path will serve instead: a failed check, and
  equally a missing or broken CUDA build on a machine with GPUs (never silent)."""
  lower, _, reason = cuda_status()
  if not lower and (ffi.cuda is not None or _cuda_devices()):
    _warn_fallback(reason)
  return lower and ffi.cuda is not None


def dispatch(jnp_fn, cuda_fn, *args, cpu_fn=None, backend=None):
  """``jnp_fn(*args)``, or a compiled version on the platforms that have one:
  ``cuda_fn`` (the CUDA source, when given) on GPUs where it can run (see
  :func:`cuda_status`) and, with backend "host", on the CPU; ``cpu_fn`` (a native CPU
  kernel, when given) on the CPU with backend "auto". ``backend``: the setting to apply
  (default: :func:`get_kernel_backend`; primitives pass the one they were bound with)."""
  chosen = get_kernel_backend() if backend is None else backend
  branches = {}
  if chosen != "jnp" and cuda_fn is not None and _lower_cuda():
    branches["cuda"] = cuda_fn
  if ffi.host is not None:
    if chosen == "host":
      if cuda_fn is not None:
        branches["cpu"] = cuda_fn
    elif chosen == "auto" and cpu_fn is not None:
      branches["cpu"] = cpu_fn
  if not branches:
    return jnp_fn(*args)
  return jax.lax.platform_dependent(*args, default=jnp_fn, **branches)
