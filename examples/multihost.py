"""Data-parallel training on several hosts: one process per host, each loading its own clouds.

Start one process per host (``jax.distributed``: the same coordinator address, the number
of processes, and each its own id), e.g. two processes on this machine, CPU collectives
over gloo::

    python examples/multihost.py --coordinator localhost:12355 --num-processes 2 --process-id 0 &
    python examples/multihost.py --coordinator localhost:12355 --num-processes 2 --process-id 1

On a GPU cluster, run one process per host the same way (each uses its local GPUs; leave
out ``--gloo``, which selects the CPU collectives). Every process makes its share of the
global batch (here procedural clouds seeded by the process index; in practice, its files),
``jax.make_array_from_process_local_data`` assembles the batch sharded over all devices,
and one jitted ``value_and_grad`` under ``jax.set_mesh`` trains on it: the library's ops
run per device on their clouds (sharding in types), the gradients of the replicated
parameters are summed by XLA. ``--check`` compares the first step with the same step
computed on one device over the whole batch.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_sparseconv as sc

GRID, POINTS, CHANNELS, CLASSES, VOXEL = 10, 96, 2, 2, 0.1


def local_clouds(seed: int, count: int):
  """``count`` padded clouds: random voxels of a ``GRID**3`` box, label 1 inside a random
  ball; features height and noise. Returns positions, features, labels, valid counts."""
  rng = np.random.default_rng(seed)
  pos = np.zeros((count, POINTS, 3), np.float32)
  feats = np.zeros((count, POINTS, CHANNELS), np.float32)
  labels = np.zeros((count, POINTS), np.int32)
  counts = rng.integers(POINTS // 2, POINTS + 1, count).astype(np.int32)
  for i in range(count):
    idx = np.stack(np.unravel_index(rng.choice(GRID**3, POINTS, replace=False), (GRID,) * 3), 1)
    centre, radius = rng.uniform(2, GRID - 2, 3), rng.uniform(2, 4)
    pos[i] = (idx + 0.5) * VOXEL
    labels[i] = np.linalg.norm(idx + 0.5 - centre, axis=1) < radius
    feats[i] = np.stack([idx[:, 2] / GRID, rng.standard_normal(POINTS)], 1)
  return pos, feats, labels, counts


def init_params(seed: int = 0):
  rng = np.random.default_rng(seed)

  def conv(cin, cout):
    return {"kernel": (rng.standard_normal((3, 3, 3, cin, cout)) / np.sqrt(27 * cin)
                       ).astype(np.float32), "bias": np.zeros(cout, np.float32)}

  return {"conv1": conv(CHANNELS, 8), "conv2": conv(8, 8), "head": conv(8, CLASSES)}


def cloud_loss(params, pos, feats, labels, count):
  """Summed cross-entropy over one cloud's valid points, and their number."""
  valid = jnp.arange(pos.shape[0]) < count
  km = sc.build_kernel_map(pos, pos, VOXEL, 3, in_valid=count, out_valid=count)  # one search
  h = sc.sparse_conv(params["conv1"], feats, pos, pos, VOXEL, kernel_map=km,
                     activation=jax.nn.relu)
  h = sc.sparse_conv(params["conv2"], h, pos, pos, VOXEL, kernel_map=km, activation=jax.nn.relu)
  logits = sc.sparse_conv(params["head"], h, pos, pos, VOXEL, kernel_map=km)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  return jnp.sum(jnp.where(valid, ce, 0)), jnp.sum(valid)


def loss_fn(params, pos, feats, labels, counts):
  """Mean cross-entropy over the valid points of the batch (vmapped over the clouds)."""
  total, n = jax.vmap(cloud_loss, in_axes=(None, 0, 0, 0, 0))(params, pos, feats, labels, counts)
  return jnp.sum(total) / jnp.maximum(jnp.sum(n), 1)


@jax.jit
def train_step(params, batch, lr=0.5):
  loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
  return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss, grads


def local_value(x) -> np.ndarray:
  """This process's copy of a replicated global array."""
  return np.asarray(x.addressable_data(0))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--coordinator", default="localhost:12355", help="host:port of process 0")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--gloo", action="store_true", help="CPU collectives over gloo (CPU hosts)")
  ap.add_argument("--clouds-per-device", type=int, default=2)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--check", action="store_true",
                  help="compare the first step with one device over the whole batch")
  args = ap.parse_args(argv)

  if args.gloo:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  me = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ("d",))  # Explicit axes (jax's default)

  # This process's clouds (its files, in practice) -> one global batch sharded over "d".
  local = local_clouds(seed=1000 + me, count=args.clouds_per_device * jax.local_device_count())
  batch = tuple(jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), a)
                for a in local)
  params0 = init_params()  # the same on every process
  params = jax.device_put(params0, NamedSharding(mesh, P()))

  with jax.set_mesh(mesh):
    for step in range(args.steps):
      params, loss, grads = train_step(params, batch)
      if step == 0:
        loss0, grads0 = local_value(loss), jax.tree.map(local_value, grads)
      if me == 0:
        print(f"step {step} loss={float(local_value(loss)):.6f}", flush=True)

  if not args.check:
    return 0
  # The same first step on one local device, over the whole batch gathered here.
  from jax.experimental import multihost_utils
  whole = [np.asarray(a) for a in multihost_utils.process_allgather(batch, tiled=True)]
  dev = jax.local_devices()[0]
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(
      jax.device_put(params0, dev), *jax.device_put(whole, dev))
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
  errors = [rel(loss0, np.asarray(ref_loss))] + [
      rel(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(ref_grads))]
  print(f"check process={me} devices={jax.device_count()} clouds={whole[0].shape[0]} "
        f"max_rel_err={max(errors):.3g}", flush=True)
  return 0 if max(errors) < 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
