"""The determinism table of the docs (docs/reliability.md, "Determinism"), measured.

One fixed problem (1400 voxels, K = 3, 8 -> 8 channels, normalize; and the same with every
output duplicated, where the feature gradient falls back to a scatter-add) computed by
``tests/scripts/det_compute.py`` under each kernel backend: the kernel map, the forward and
the gradients (kernel, features). ``TABLE`` is what the docs state; each cell is
asserted: "yes" = bitwise identical, "no" = not bitwise identical but within float32
rounding (so a "no" that becomes bitwise fails too, and the table has to change).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "det_compute.py"
_spec = importlib.util.spec_from_file_location("det_compute", SCRIPT)
det = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(det)

BACKENDS = ["auto", "jnp", "host"]  # native CPU kernels, jnp, the CUDA source's host build
OUTPUTS = ["y", "dkernel", "dfeats"]
# (backend, comparison) -> bitwise for (map, y, dkernel, dfeats); None = not applicable.
YES, NO = True, False
TABLE = {
    ("auto", "repeat"): (YES, YES, YES, YES),
    ("auto", "threads"): (YES, YES, YES, YES),
    ("auto", "eager_jit"): (YES, YES, YES, YES),
    ("auto", "vmap_loop"): (None, YES, YES, NO),
    ("auto", "scatter_repeat"): (None, YES, YES, YES),
    ("auto", "scatter_threads"): (None, YES, YES, YES),
    ("jnp", "repeat"): (YES, YES, YES, YES),
    ("jnp", "eager_jit"): (YES, YES, YES, YES),
    ("jnp", "vmap_loop"): (None, YES, YES, YES),
    ("jnp", "scatter_repeat"): (None, YES, YES, YES),
    ("host", "repeat"): (YES, YES, YES, YES),
    ("host", "eager_jit"): (YES, YES, YES, YES),
    ("host", "vmap_loop"): (None, YES, YES, NO),
    ("host", "scatter_repeat"): (None, YES, YES, YES),
}


def one_thread(tmp_path):
  """The native backend's results in a process with JAX_SPARSECONV_CPU_THREADS=1 (the
  kernels read it once per process)."""
  out = tmp_path / "one.npz"
  subprocess.run([sys.executable, str(SCRIPT), str(out), "auto"], check=True, timeout=300,
                 env={**os.environ, "JAX_SPARSECONV_CPU_THREADS": "1"})
  return {k.split(":", 1)[1]: v for k, v in np.load(out).items()}


def _check(claim, a, b, what):
  if claim is None:
    return
  if claim:
    assert np.array_equal(a, b), f"{what}: claimed bitwise identical, differs by " \
                                 f"{np.max(np.abs(a - b))}"
  else:
    assert not np.array_equal(a, b), f"{what}: bitwise identical, the table says no: update it"
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()),
                               err_msg=what)


def _pairs(kind, first, second):
  """(map, y, dkernel, dfeats) pairs of arrays that a comparison compares."""
  if kind in ("repeat", "threads"):
    return [(first["map/neighbors"], second["map/neighbors"])] + [
        (first[f"jit/{o}"], second[f"jit/{o}"]) for o in OUTPUTS]
  if kind in ("scatter_repeat", "scatter_threads"):
    return [None] + [(first[f"scatter/{o}"], second[f"scatter/{o}"]) for o in OUTPUTS]
  if kind == "eager_jit":
    return [(first["map_eager/neighbors"], first["map/neighbors"])] + [
        (first[f"eager/{o}"], first[f"jit/{o}"]) for o in OUTPUTS]
  return [None] + [(first[f"vmap/{o}"], first[f"loop/{o}"]) for o in OUTPUTS]


def test_determinism_table(tmp_path):
  """Every cell of TABLE. One test (not one per cell): under pytest-xdist a shared fixture
  would be computed once per worker, and the computation is mostly compilation."""
  import jax
  results = {b: (det.run(b), det.run(b)) for b in BACKENDS}  # the 2nd reuses the programs
  for (backend, kind), claims in TABLE.items():
    if "threads" in kind:
      continue
    first, second = results[backend]
    for claim, pair, what in zip(claims, _pairs(kind, first, second), ("map", *OUTPUTS)):
      if pair is not None:
        _check(claim, *pair, f"{backend} {kind} {what}")
  for backend in BACKENDS:  # the inverse table too
    assert np.array_equal(results[backend][0]["map/inverse"], results[backend][1]["map/inverse"])
  if jax.default_backend() != "cpu" or (os.cpu_count() or 1) < 2:
    return  # the native CPU kernels' thread count: nothing to compare
  single = one_thread(tmp_path)
  for kind in ("threads", "scatter_threads"):
    for claim, pair, what in zip(TABLE["auto", kind], _pairs(kind, results["auto"][0], single),
                                 ("map", *OUTPUTS)):
      if pair is not None:
        _check(claim, *pair, f"auto {kind} {what}")


def test_problem_uses_several_threads_and_the_fallback():
  """The problem is big enough for the native kernels' threads (>= 2 * 512 rows) and its
  duplicated outputs do take the scatter fallback (the map's inverse is not exact)."""
  import jax
  import jax_sparseconv as sc
  pos, _, _, _, dup_out, _ = det.problem()
  assert len(pos) >= 1024
  assert not bool(sc.build_kernel_map(pos, dup_out, det.VS, 3).out_unique)
  assert bool(jax.jit(lambda p: sc.build_kernel_map(p, p, det.VS, 3).out_unique)(pos))
