"""Which implementation runs (`_src/backend.py`): the kernels each backend lowers, the
builds present, the backend switch.
"""

from __future__ import annotations
import os
import shutil
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax_sparseconv as sc
from jax_sparseconv._src import gather_matmul as gm
from jax_sparseconv._src import backend, ffi
from tests.helpers import lattice_cloud, rel_err, x64


def _conv_fn():
  rng = np.random.default_rng(0)
  pos = lattice_cloud(rng, 30, 4, 0.5)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 3)), jnp.float32)
  feats = jnp.asarray(rng.standard_normal((30, 2)), jnp.float32)

  def f(kernel, feats, pos):
    return jnp.sum(sc.sparse_conv({"kernel": kernel}, feats, pos, pos, 0.5) ** 2)

  return jax.jit(jax.grad(f, argnums=(0, 1))), (kernel, feats, pos)



OURS = [jax.export.DisabledSafetyCheck.custom_call(t)
        for t in sorted({t for mod in (ffi.host, ffi.cuda) if mod is not None
                         for t in mod.handlers()})]



def _cpu_text(f, args):
  return jax.export.export(f, platforms=("cpu",), disabled_checks=OURS)(*args).mlir_module()



def test_cpu_programs_name_the_kernels_each_backend_asks_for(flag_errors):
  f, args = _conv_fn()
  previous = backend.set_kernel_backend("jnp")
  try:
    assert "@jsc_" not in _cpu_text(f, args)
    backend.set_kernel_backend("auto")  # native CPU kernels
    text = _cpu_text(f, args)
    assert "@jsc_cpu_gather_matmul" in text and "@jsc_cpu_weight_grad" in text
    assert "@jsc_gather_matmul" not in text and "@jsc_weight_grad" not in text
    backend.set_kernel_backend("host")  # the CUDA source's host build, never a CUDA target
    text = _cpu_text(f, args)
    assert "@jsc_gather_matmul" in text and "@jsc_weight_grad" in text
    assert "@jsc_cpu_" not in text
  finally:
    backend.set_kernel_backend(previous)



@pytest.mark.skipif(not backend.kernel_builds()["cuda"], reason="built without nvcc")
def test_cuda_lowering_names_the_kernels(flag_errors):
  """Lowered for CUDA (no GPU needed), forward and both gradients are FFI calls. Exported
  programs need error mode "flag" (no host callback)."""
  f, args = _conv_fn()
  text = jax.export.export(f, platforms=("cuda",), disabled_checks=OURS)(*args).mlir_module()
  assert "@jsc_gather_matmul" in text and "@jsc_weight_grad" in text



def test_builds_present_and_on_the_oldest_ffi_api():
  builds = backend.kernel_builds()
  assert builds["host"], "the host build of the kernels is missing"
  if shutil.which("nvcc") and os.environ.get("JSC_CUDA", "AUTO").upper() != "OFF":
    assert builds["cuda"], "nvcc is on PATH but the CUDA kernels were not built"
  # FFI API 0.4 = jaxlib 0.11.2's headers: loads on every jaxlib we support.
  assert set(ffi.xla_ffi_api_minor().values()) == {4}



def test_backend_switch_validates():
  with pytest.raises(ValueError, match="backend must be one of"):
    backend.set_kernel_backend("cuda")
  before = sc.get_kernel_backend()
  assert sc.set_kernel_backend(sc.set_kernel_backend("jnp")) == "jnp"
  assert sc.get_kernel_backend() == before



def test_switching_keeps_the_caches_and_retraces_what_runs_next(flag_errors):
  """The backend and the error mode are jit-cache keys: a switch retraces what runs next
  (the kernels follow the new setting, no stale program) and clears nothing (switching
  back reuses the first program)."""
  traces = []
  f, args = _conv_fn()

  @jax.jit
  def g(kernel, feats, pos):
    traces.append(sc.get_kernel_backend())
    return f(kernel, feats, pos)

  previous = sc.get_kernel_backend()
  try:
    for name in ("jnp", "auto", "jnp"):
      sc.set_kernel_backend(name)
      jax.block_until_ready(g(*args))
      text = g.lower(*args).as_text()
      assert ("jsc_cpu_gather_matmul" in text) == (name == "auto"), name
  finally:
    sc.set_kernel_backend(previous)
  assert traces == ["jnp", "auto"]  # the third call reused the first program
  with sc.kernel_backend("jnp"):
    assert sc.get_kernel_backend() == "jnp"
    assert "jsc_cpu_gather_matmul" not in g.lower(*args).as_text()
  assert sc.get_kernel_backend() == previous
  with sc.error_mode("raise"):
    assert sc.get_error_mode() == "raise"
  assert sc.get_error_mode() == "flag"
