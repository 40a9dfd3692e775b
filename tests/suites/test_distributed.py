"""Several processes (issue 11 D): two processes on localhost with ``jax.distributed`` and
CPU collectives over gloo, one cloud each, the global batch assembled with
``jax.make_array_from_process_local_data``, a jitted data-parallel ``value_and_grad``
(``examples/multihost.py``, the README's example) equal to one device over the whole batch."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "multihost.py"
TIMEOUT_S = 180


def _gloo_available() -> bool:
  from jax._src.lib import _jax
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_equal_one_device():
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_SPARSECONV_KERNELS="auto",  # native CPU
             XLA_FLAGS="--xla_backend_optimization_level=0")  # compile time
  procs = [subprocess.Popen(
      [sys.executable, str(EXAMPLE), "--coordinator", f"localhost:{port}", "--num-processes",
       "2", "--process-id", str(i), "--gloo", "--clouds-per-device", "1", "--steps", "2",
       "--check"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:  # a failed or hung peer: end both (our own children only)
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    check = [line for line in out.splitlines() if line.startswith("check ")]
    assert check and f"process={i} devices=2 clouds=2" in check[0], out[-3000:]
  assert "step 1 loss=" in outputs[0]
