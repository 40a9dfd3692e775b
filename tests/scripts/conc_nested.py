"""Deadlock scenarios for tests/test_concurrency.py (run in a subprocess with a timeout):
a native kernel called from inside a ``jax.pure_callback`` of a jitted program (the map
build and a conv, both native, run from XLA's callback thread while the outer program
waits), nested in a program that itself runs native kernels; and two jitted programs
running native kernels at once from two Python threads, several times over. Prints "ok"."""

import threading

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparseconv as sc

rng = np.random.default_rng(0)
flat = rng.choice(16**3, 1500, replace=False)
pos = ((np.stack(np.unravel_index(flat, (16,) * 3), 1) + 0.5) * 0.5).astype(np.float32)
feats = rng.standard_normal((1500, 8)).astype(np.float32)
kernel = rng.standard_normal((3, 3, 3, 8, 8)).astype(np.float32)


def conv(k, f, p):
  return sc.sparse_conv({"kernel": k}, f, p, p, 0.5)


def host_conv(k, f):  # eager: its own native kernel calls, from XLA's callback thread
  return np.asarray(conv(jnp.asarray(k), jnp.asarray(f), pos))


@jax.jit
def nested(k, f, p):
  outer = conv(k, f, p)  # native kernels in the outer program too
  inner = jax.pure_callback(host_conv, jax.ShapeDtypeStruct((1500, 8), jnp.float32), k, f)
  return outer, inner


outer, inner = nested(kernel, feats, pos)
assert np.array_equal(np.asarray(outer), np.asarray(inner)), "callback result differs"

a = jax.jit(jax.grad(lambda k, f, p: jnp.sum(conv(k, f, p) ** 2), argnums=(0, 1)))
b = jax.jit(lambda p: sc.build_kernel_map(p, p, 0.5, 3).neighbors)
want_a, want_b = a(kernel, feats, pos), b(pos)
errors = []


def worker(fn, args, want):
  try:
    for _ in range(5):
      got = jax.block_until_ready(fn(*args))
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.array_equal(np.asarray(g), np.asarray(w))
  except Exception as e:  # noqa: BLE001
    errors.append(repr(e))


threads = [threading.Thread(target=worker, args=(a, (kernel, feats, pos), want_a)),
           threading.Thread(target=worker, args=(b, (pos,), want_b)),
           threading.Thread(target=worker, args=(nested, (kernel, feats, pos), (outer, inner)))]
for t in threads:
  t.start()
for t in threads:
  t.join()
assert not errors, errors
print("ok")
