"""Scale-out with JAX's own machinery (issue 11): shard_map data parallelism.

Runs in a subprocess because the forced host device count must be set before JAX starts.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import SEED

SCRIPTS = pathlib.Path(__file__).parent / "scripts"


def test_shard_map_value_and_grad_equals_one_device():
  """Before: the FFI path failed (switch branches of different types) and the jnp path
  returned a wrong kernel gradient (the replicated kernel's gradient was not summed)."""
  out = subprocess.run(
      [sys.executable, str(SCRIPTS / "shard_map_grads.py"), str(SEED % 2**31), "jnp", "auto",
       "host"], capture_output=True, text=True, timeout=600,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert [line.split()[0] for line in lines] == ["jnp", "auto", "host"]
  for line in lines:
    errors = [float(e) for e in line.split()[1:]]
    assert max(errors) < 1e-5, line
