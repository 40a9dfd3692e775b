"""The compiled kernels (``ffi/kernels.cu``) behind XLA FFI custom calls.

Two builds of one CUDA source ship as extension modules of this package:

* ``_cuda_kernels``: nvcc's build, registered for ``platform="CUDA"``; present when
  nvcc was found at install time.
* ``_host_kernels``: the same source compiled by g++ through ``ffi/cuda_host_shim.h``
  (every CUDA thread a fiber, blocks in turn), registered for ``platform="cpu"``. It is
  slow and exists so that the kernels' indexing runs through the test suite on
  machines without a GPU. The same module carries the native CPU kernel
  (``ffi/cpu_kernels.cc``: float32 gather-matmul and kernel gradient over the pairs
  that exist, AVX2, multi-threaded), which the CPU uses by default for float32.

Which path a program takes is decided when it is lowered, per platform, through
``jax.lax.platform_dependent``: a CPU program never names a CUDA target. See
:func:`set_kernel_backend`.
"""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "jnp", "host")
_SUPPORTED = tuple(jnp.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
#: Bound on the kernel-gradient partial sums, in elements (deterministic reduction).
PARTIAL_ELEMS = 16 * 2**20


def _load(name: str, platform: str):
  """Imports one kernel build and registers its handlers; None when it is absent."""
  try:
    module = importlib.import_module(f"jax_sparseconv.{name}")
  except ImportError:
    return None
  for target, capsule in module.handlers().items():
    jax.ffi.register_ffi_target(target, capsule, platform=platform)
  return module


_host = _load("_host_kernels", "cpu")
_cuda = _load("_cuda_kernels", "CUDA")
_backend = os.environ.get("JAX_SPARSECONV_KERNELS", "auto")
if _backend not in BACKENDS:
  raise ValueError(f"JAX_SPARSECONV_KERNELS must be one of {BACKENDS}, got {_backend!r}")


def set_kernel_backend(backend: str) -> str:
  """Chooses the implementation of the conv's inner op; returns the previous choice.

  * ``"auto"`` (default; also read from ``$JAX_SPARSECONV_KERNELS``): the CUDA kernels
    on NVIDIA GPUs when the package was built with nvcc; on the CPU the native
    kernels for float32 (forward, feature and kernel gradients) and the jnp
    implementation for the other dtypes.
  * ``"jnp"``: the jnp implementation everywhere.
  * ``"host"``: the CUDA kernels on GPUs, and on the CPU the CUDA kernels compiled for
    the host (slow; for testing and debugging the kernels without a GPU).

  Programs already compiled keep the backend they were lowered with, so this clears
  JAX's compilation caches.
  """
  global _backend
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "host" and _host is None:
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


def kernel_builds() -> dict[str, bool]:
  """Which compiled builds this installation carries: ``{"cuda": ..., "host": ...}``."""
  return {"cuda": _cuda is not None, "host": _host is not None}


def dispatch(jnp_fn, kernel_fn, *args, cpu_fn=None):
  """``jnp_fn(*args)``, or a compiled version on the platforms that have one:
  ``kernel_fn`` (the CUDA source, when given) on GPUs and, with backend "host", on the
  CPU; ``cpu_fn`` (a native CPU kernel, when given) on the CPU with backend "auto"."""
  branches = {}
  if _backend != "jnp" and _cuda is not None and kernel_fn is not None:
    branches["cuda"] = kernel_fn
  if _host is not None:
    if _backend == "host":
      if kernel_fn is not None:
        branches["cpu"] = kernel_fn
    elif _backend == "auto" and cpu_fn is not None:
      branches["cpu"] = cpu_fn
  if not branches:
    return jnp_fn(*args)
  return jax.lax.platform_dependent(*args, default=jnp_fn, **branches)


def _compute_dtype(*dtypes):
  dt = jnp.result_type(*dtypes)
  if dt not in _SUPPORTED:
    raise TypeError(f"the compiled kernels take float16, bfloat16, float32 or float64, got {dt}")
  return dt


def gather_matmul(x, w, nbr, out_dtype):
  """``y[m] = sum_s x[nbr[m, s]] @ w[s]`` by the ``jsc_gather_matmul`` kernel."""
  dt = _compute_dtype(x.dtype, w.dtype, out_dtype)
  m, cout = nbr.shape[0], w.shape[2]
  # vmap never reaches this call: the primitive's batching rule folds the batch into
  # the rows first. "sequential" is the safe choice should that ever change.
  call = jax.ffi.ffi_call("jsc_gather_matmul", jax.ShapeDtypeStruct((m, cout), dt),
                          vmap_method="sequential")
  return call(x.astype(dt), w.astype(dt), nbr.astype(jnp.int32)).astype(out_dtype)


def cpu_gather_matmul(x, w, nbr):
  """float32 ``y[m] = sum_s x[nbr[m, s]] @ w[s]`` by the native CPU kernel."""
  call = jax.ffi.ffi_call("jsc_cpu_gather_matmul",
                          jax.ShapeDtypeStruct((nbr.shape[0], w.shape[2]), jnp.float32),
                          vmap_method="sequential")
  return call(x, w, nbr.astype(jnp.int32))


def cpu_kernel_grad(x, ct, nbr):
  """float32 ``dw[s] = sum_m x[nbr[m, s]]^T ct[m]`` by the native CPU kernel."""
  call = jax.ffi.ffi_call(
      "jsc_cpu_kernel_grad",
      jax.ShapeDtypeStruct((nbr.shape[1], x.shape[1], ct.shape[1]), jnp.float32),
      vmap_method="sequential")
  return call(x, ct, nbr.astype(jnp.int32))


def cpu_invert(nbr, n):
  """The inverse of a kernel map and whether it is exact, by the native CPU kernel.
  Leading batch axes are handled by the kernel (``vmap_method="broadcast_all"``)."""
  *batch, _, s = nbr.shape
  call = jax.ffi.ffi_call(
      "jsc_cpu_invert",
      (jax.ShapeDtypeStruct((*batch, n, s), jnp.int32), jax.ShapeDtypeStruct(tuple(batch), bool)),
      vmap_method="broadcast_all")
  return call(nbr.astype(jnp.int32))


def cpu_sort_keys(hi, lo):
  """``(hi, lo, perm)`` sorted by ``(hi, lo, position)`` (native CPU radix sort); leading
  batch axes are handled by the kernel."""
  out = jax.ShapeDtypeStruct(hi.shape, jnp.uint32)
  call = jax.ffi.ffi_call("jsc_cpu_sort_keys",
                          (out, out, jax.ShapeDtypeStruct(hi.shape, jnp.int32)),
                          vmap_method="broadcast_all")
  return call(hi.astype(jnp.uint32), lo.astype(jnp.uint32))


def num_partitions(m: int, s: int, cin: int, cout: int) -> int:
  """Row partitions of the kernel gradient: enough blocks to fill a GPU, a bounded
  workspace; a function of the shapes only, so the reduction order is fixed."""
  tiles = max(1, -(-cin // 64) * -(-cout // 64))
  want = max(1, min(-(-m // 2048), -(-528 // (s * tiles))))
  cap = max(1, PARTIAL_ELEMS // max(1, s * cin * cout))
  return int(min(want, cap, max(1, 65535 // max(1, s))))


def kernel_grad(x, ct, nbr, w_dtype):
  """``dw[s] = sum_m x[nbr[m, s]]^T ct[m]`` by the ``jsc_kernel_grad`` kernel."""
  dt = _compute_dtype(x.dtype, ct.dtype, w_dtype)
  acc = jnp.float64 if dt == jnp.float64 else jnp.float32
  (m, s), cin, cout = nbr.shape, x.shape[1], ct.shape[1]
  parts = num_partitions(m, s, cin, cout)
  call = jax.ffi.ffi_call(
      "jsc_kernel_grad",
      (jax.ShapeDtypeStruct((s, cin, cout), dt), jax.ShapeDtypeStruct((parts, s, cin, cout), acc)),
      vmap_method="sequential")
  dw, _ = call(x.astype(dt), ct.astype(dt), nbr.astype(jnp.int32))
  return dw.astype(w_dtype)


def xla_ffi_api_minor() -> dict[str, int]:
  """FFI API minor version each build was compiled against (0.4 for jaxlib 0.11.2)."""
  return {name: int(mod.xla_ffi_api_minor)
          for name, mod in (("cuda", _cuda), ("host", _host)) if mod is not None}

