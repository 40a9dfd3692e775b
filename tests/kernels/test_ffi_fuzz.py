"""Fuzzing the native entry points: every FFI handler of the host build (native CPU conv and
search kernels, the CUDA source's host build) called directly through ``jax.ffi.ffi_call``
with malformed arguments (wrong ranks, inconsistent sizes, wrong dtypes of operands and
results, sizes beyond int32, too many partial-sum blocks) must raise, and with extreme but
well-formed ones (neighbour indices negative, past N, at the int32 limits; zero sizes;
coordinates, cloud ids and slot offsets at the int32 limits) must return the NumPy
reference's result, never read or write out of bounds. The calls run in a subprocess
(``tests/scripts/fuzz_ffi.py``), so a crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import jax_sparseconv as sc

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "fuzz_ffi.py"


def run_fuzz(seed, iterations, timeout=300):
  proc = subprocess.run([sys.executable, str(SCRIPT), str(seed), str(iterations)],
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return proc


@pytest.mark.skipif(not sc.kernel_builds()["host"], reason="built without the host kernels")
def test_handlers_reject_malformed_calls_and_survive_extreme_ones():
  seed = int(os.environ.get("JSC_TEST_SEED", "0")) % 2**31
  proc = run_fuzz(seed, 60)
  tail = (proc.stdout + proc.stderr)[-4000:]
  assert proc.returncode >= 0, f"the fuzz process crashed (signal {-proc.returncode}):\n{tail}"
  assert proc.returncode == 0, tail
  summary = proc.stdout.strip().splitlines()[-1]
  malformed, extreme = int(summary.split()[0]), int(summary.split()[3])
  assert malformed >= 80 and extreme >= 110, summary  # the cases did run
