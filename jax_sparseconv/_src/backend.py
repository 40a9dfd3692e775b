"""Which implementation runs an op: jnp, the native CPU kernels, or the CUDA source.

One global choice (:func:`set_kernel_backend`) and one function that applies it
(:func:`dispatch`). The choice is made when a program is lowered, per platform, through
``jax.lax.platform_dependent``, so a CPU program never names a CUDA target. The kernels
themselves and their ``ffi_call`` wrappers live in ``ffi.py``.

The CUDA branch is lowered only where the CUDA kernels can run: where this process has
CUDA devices, each must pass ``cuda_support.check_devices`` (driver, compute capability,
a probe launch), checked once; otherwise the jnp implementation serves on the GPU, with
one warning saying why (and ``kernel_builds()`` says it too). A process without CUDA
devices keeps the branch, for programs exported to CUDA.
"""

from __future__ import annotations

import os
import warnings

import jax

from . import cuda_support, ffi

BACKENDS = ("auto", "jnp", "host")

_backend = os.environ.get("JAX_SPARSECONV_KERNELS", "auto")
if _backend not in BACKENDS:
  raise ValueError(f"JAX_SPARSECONV_KERNELS must be one of {BACKENDS}, got {_backend!r}")


def set_kernel_backend(backend: str) -> str:
  """Chooses the implementation of the compiled ops; returns the previous choice.

  * ``"auto"`` (default; also read from ``$JAX_SPARSECONV_KERNELS``): the CUDA kernels
    on NVIDIA GPUs when the package was built with nvcc; on the CPU the native
    kernels (float32 conv: forward, feature and kernel gradients; the neighbour
    search) and the jnp implementation for the other dtypes.
  * ``"jnp"``: the jnp implementation everywhere.
  * ``"host"``: the CUDA kernels on GPUs, and on the CPU the CUDA kernels compiled for
    the host (slow; for testing and debugging the kernels without a GPU).

  Programs already compiled keep the backend they were lowered with, so this clears
  JAX's compilation caches.
  """
  global _backend
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "host" and ffi.host is None:
    raise RuntimeError("backend 'host' needs the compiled host kernels (jax_sparseconv."
                       "_host_kernels), which this installation lacks; reinstall with a C++ "
                       "compiler")
  previous, _backend = _backend, backend
  if previous != backend:
    jax.clear_caches()
  return previous


def get_kernel_backend() -> str:
  """The current choice of :func:`set_kernel_backend`."""
  return _backend


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
  try:
    return jax.devices("cuda")
  except RuntimeError:  # no CUDA backend in this process
    return []


def cuda_status() -> tuple[bool, bool, str]:
  """``(lower the CUDA branch, usable, reason)``, decided on first use (the check launches
  a probe kernel on each GPU) and kept for the process."""
  global _cuda_state
  if _cuda_state is None:
    if ffi.cuda is None:
      state = (False, False, "not built (install with nvcc, JSC_CUDA=ON, for the CUDA kernels)")
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
                  RuntimeWarning, stacklevel=3)


def dispatch(jnp_fn, kernel_fn, *args, cpu_fn=None):
  """``jnp_fn(*args)``, or a compiled version on the platforms that have one:
  ``kernel_fn`` (the CUDA source, when given) on GPUs where it can run (see
  :func:`cuda_status`) and, with backend "host", on the CPU; ``cpu_fn`` (a native CPU
  kernel, when given) on the CPU with backend "auto"."""
  branches = {}
  if _backend != "jnp" and ffi.cuda is not None and kernel_fn is not None:
    lower, _, reason = cuda_status()
    if lower:
      branches["cuda"] = kernel_fn
    else:
      _warn_fallback(reason)
  if ffi.host is not None:
    if _backend == "host":
      if kernel_fn is not None:
        branches["cpu"] = kernel_fn
    elif _backend == "auto" and cpu_fn is not None:
      branches["cpu"] = cpu_fn
  if not branches:
    return jnp_fn(*args)
  return jax.lax.platform_dependent(*args, default=jnp_fn, **branches)
