"""Scale-out with JAX's own machinery (issue 11): shard_map data parallelism, and the
library's ops on arrays sharded over Explicit and Auto mesh axes (sharding in types).

Runs in subprocesses because the forced host device count must be set before JAX starts.
(Several processes with jax.distributed: test_distributed.py.)
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from tests.helpers import SCRIPTS_DIR, SEED

import jax_sparseconv as sc

SCRIPTS = SCRIPTS_DIR


def _run(script, *args):
  out = subprocess.run([sys.executable, str(SCRIPTS / script), str(SEED % 2**31), *args],
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()


def test_shard_map_value_and_grad_equals_one_device():
  """Before: the FFI path failed (switch branches of different types) and the jnp path
  returned a wrong weight gradient (the replicated kernel's gradient was not summed)."""
  lines = _run("shard_map_grads.py", "jnp", "auto", "host")
  assert [line.split()[0] for line in lines] == ["jnp", "auto", "host"]
  for line in lines:
    errors = [float(e) for e in line.split()[1:]]
    assert max(errors) < 1e-5, line


@pytest.mark.parametrize("backend", ["auto", "jnp", "host"])  # native CPU, jnp, CUDA source
def test_sharded_batch_under_set_mesh_equals_one_device(backend):
  """Issue 11 A. jax.jit(jax.value_and_grad(loss)) under jax.set_mesh (Explicit axes, jax's
  default, and Auto), the batch of padded clouds device_put with P("d"); the loss vmaps
  sparse_conv (own search), build_kernel_map + two convs on that map, and packs the clouds
  into one point set (packed batch; it runs replicated, on the native backend only here).
  Before: ShardingTypeError in the search (Explicit)."""
  if backend == "host" and not sc.kernel_builds()["host"]:
    pytest.skip("no host build of the CUDA kernels")
  losses = ("vmapped", "packed") if backend == "auto" else ("vmapped",)  # packed: replicated
  lines = _run("explicit_sharding.py", "explicit,auto", ",".join(losses), backend)
  assert sorted(tuple(line.split()[:3]) for line in lines) == sorted(
      (mesh, backend, loss) for mesh in ("explicit", "auto") for loss in losses)
  for line in lines:
    errors = [float(e) for e in line.split()[3:]]
    assert len(errors) == 8 and max(errors) < 1e-5, line
