"""Data-parallel value_and_grad under jax.shard_map (check_vma=True) on 2 forced host devices,
against the single-device result; prints one line per kernel backend: name, max errors."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_sparseconv as sc  # noqa: E402

rng = np.random.default_rng(int(sys.argv[1]))


def cloud(n):
  idx = rng.choice(8**3, n, replace=False)
  return (np.stack(np.unravel_index(idx, (8, 8, 8)), 1) + 0.5).astype(np.float32)


pos = np.stack([cloud(100), cloud(100), cloud(100), cloud(100)])
feats = rng.standard_normal((4, 100, 4)).astype(np.float32)
params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 4, 5)), jnp.float32),
          "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}


def loss(params, feats, pos):
  y = jax.vmap(lambda f, p: sc.sparse_conv(params, f, p, p, 1.0, activation=jnp.tanh))(feats, pos)
  return jnp.sum(y**2)


mesh = jax.make_mesh((2,), ("d",))


def local(params, f, p):  # gradients of replicated params come back summed over devices
  v, g = jax.value_and_grad(loss)(params, f, p)
  return jax.lax.psum(v, "d"), g


sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                                out_specs=(P(), P())))
args = (jax.device_put(params, NamedSharding(mesh, P())),
        jax.device_put(feats, NamedSharding(mesh, P("d"))),
        jax.device_put(pos, NamedSharding(mesh, P("d"))))
for backend in sys.argv[2:]:
  sc.set_kernel_backend(backend)
  ref = jax.jit(jax.value_and_grad(loss))(params, feats, pos)
  out = sharded(*args)
  err = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  print(backend, err(out[0], ref[0]), err(out[1]["kernel"], ref[1]["kernel"]),
        err(out[1]["bias"], ref[1]["bias"]), flush=True)
