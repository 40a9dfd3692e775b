"""Sharding in types (issue 11 A): ``jax.jit(jax.value_and_grad(loss))`` under
``jax.set_mesh`` of a 2-device mesh (forced host devices), the batch of padded clouds
``device_put`` with ``NamedSharding(mesh, P("d"))``, against the single-device result.

Usage: ``explicit_sharding.py SEED MESH[,MESH] LOSS[,LOSS] BACKEND [BACKEND ...]`` with
MESH in ``explicit``/``auto`` and LOSS in ``vmapped``/``packed``; prints one line per (mesh, backend, loss): the names, then the
relative max errors of the loss and of every gradient (parameters and features).
"""
import os
import sys
import time

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_backend_optimization_level=0")  # compile time
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_sparseconv as sc  # noqa: E402

rng = np.random.default_rng(int(sys.argv[1]))
B, N, C = 4, 64, 3


def cloud(n):
  idx = rng.choice(6**3, n, replace=False)
  return (np.stack(np.unravel_index(idx, (6, 6, 6)), 1) + 0.5).astype(np.float32)


pos = np.stack([cloud(N) for _ in range(B)])
feats = rng.standard_normal((B, N, C)).astype(np.float32)
counts = np.array([N, N - 10, N - 25, N - 3], np.int32)


def layer(ks, cin, cout):
  return {"kernel": jnp.asarray(rng.standard_normal((ks, ks, ks, cin, cout)) / 4, jnp.float32),
          "bias": jnp.asarray(rng.standard_normal(cout), jnp.float32)}


params = {"a": layer(3, C, 4), "b": layer(3, 4, 4), "c": layer(3, 4, 2)}


def per_cloud(params, f, p, c):
  """One cloud: a conv with its own search (to outputs with a repeated position: the
  feature gradient takes the scatter path), two convs on one map (padding masked)."""
  valid = jnp.arange(N) < c
  y = sc.sparse_conv(params["a"], f, p, p.at[1].set(p[0]), 1.0, activation=jnp.tanh)
  km = sc.build_kernel_map(p, p, 1.0, 3, in_valid=c, out_valid=c)
  y = sc.sparse_conv(params["b"], y, p, p, 1.0, kernel_map=km, activation=jnp.tanh)
  y = sc.sparse_conv(params["c"], y, p, p, 1.0, kernel_map=km, normalize=True)
  return jnp.sum(jnp.where(valid[:, None], y, 0) ** 2)


def vmapped(params, feats, pos, counts):
  return jnp.sum(jax.vmap(per_cloud, in_axes=(None, 0, 0, 0))(params, feats, pos, counts))


def packed(params, feats, pos, counts):
  """The clouds packed into one point set with cloud indices (no vmap)."""
  valid = (jnp.arange(N)[None, :] < counts[:, None]).reshape(-1)
  batch = jnp.repeat(jnp.arange(B, dtype=jnp.int32), N)
  p, f = pos.reshape(B * N, 3), feats.reshape(B * N, C)
  km = sc.build_kernel_map(p, p, 1.0, 3, in_valid=valid, out_valid=valid, in_batch=batch,
                           out_batch=batch)
  y = sc.sparse_conv(params["a"], f, p, p, 1.0, kernel_map=km, activation=jnp.tanh)
  return jnp.sum(jnp.where(valid[:, None], y, 0) ** 2)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b), initial=0) / max(np.max(np.abs(b), initial=0), 1e-30))


meshes = {kind: jax.make_mesh((2,), ("d",), axis_types=(
    {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind],)) for kind in sys.argv[2].split(",")}
losses = {"vmapped": vmapped, "packed": packed}
for backend in sys.argv[4:]:
  sc.set_kernel_backend(backend)
  for name in sys.argv[3].split(","):
    loss = losses[name]
    step = jax.value_and_grad(loss, argnums=(0, 1))
    t0 = time.perf_counter()
    ref = jax.block_until_ready(jax.jit(step)(params, feats, pos, counts))
    print(f"{backend} {name}: {time.perf_counter() - t0:.1f} s one device", file=sys.stderr)
    for mesh_kind, mesh in meshes.items():
      t0 = time.perf_counter()
      data = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (feats, pos, counts)]
      with jax.set_mesh(mesh):
        out = jax.block_until_ready(jax.jit(step)(params, *data))
      print(f"{mesh_kind} {backend} {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
            flush=True)
      if mesh_kind == "explicit":  # the batch stays sharded, its gradient too
        assert jax.typeof(out[1][1]).sharding.spec[0] == "d", jax.typeof(out[1][1])
      errors = [rel(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]
      print(mesh_kind, backend, name, *errors, flush=True)
