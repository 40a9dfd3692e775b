"""jax.export: inference functions (a conv with its map built inside, a 2-layer Linen
model) exported with ``export_disabled_checks()`` under ``export_mode()``, serialized,
and deserialized and run in a fresh process after ``import jax_sparseconv``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv._src import ffi
from jax_sparseconv.linen import SparseConv

from tests.helpers import lattice_cloud

pytest.importorskip("flatbuffers", reason="Exported.serialize() needs the flatbuffers package")

VS = 0.2


def infer_conv(params, feats, pos, count):
  """A padded cloud (``count`` valid rows): its map built inside, one conv; the flags
  returned so that the loader can see invalid inputs (error mode "flag")."""
  km = sc.build_kernel_map(pos, pos, VS, 3, in_valid=count, out_valid=count)
  return sc.sparse_conv(params, feats, pos, pos, VS, kernel_map=km), km.flags


class TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, feats, pos):
    km = sc.build_kernel_map(pos, pos, VS, 3)
    x = SparseConv(8, activation=nn.relu)(feats, pos, pos, VS, kernel_map=km)
    return SparseConv(3)(x, pos, pos, VS, kernel_map=km)


def test_disabled_checks_name_every_registered_target():
  checks = sc.export_disabled_checks()
  assert all(isinstance(c, jax.export.DisabledSafetyCheck) for c in checks)
  names = sorted({name for name, _ in ffi.targets})
  assert [str(c) for c in checks] == [f"custom_call:{n}" for n in names]
  if sc.kernel_builds()["host"]:
    assert {"jsc_cpu_gather_matmul", "jsc_cpu_neighbors", "jsc_gather_matmul"} <= set(names)


def test_export_mode_sets_flag_and_restores():
  before = sc.get_error_mode()
  with sc.export_mode():
    assert sc.get_error_mode() == "flag"
  assert sc.get_error_mode() == before
  with pytest.raises(RuntimeError), sc.export_mode():
    raise RuntimeError
  assert sc.get_error_mode() == before


def custom_calls(exported):
  return sorted(set(re.findall(r"custom_call @(\w+)", exported.mlir_module())))


LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax

    blobs = {name: bytearray(open(f"{name}.bin", "rb").read()) for name in ("conv", "model")}
    inputs = np.load("inputs.npz")
    conv_args = ({"kernel": inputs["kernel"], "bias": inputs["bias"]}, inputs["feats"],
                 inputs["pos"], inputs["count"])
    report = {}

    # 1. before `import jax_sparseconv` the FFI targets are unknown to XLA
    conv = jax.export.deserialize(blobs["conv"])
    try:
      conv.call(*conv_args)
      report["without_import"] = "ran"
    except Exception as e:
      report["without_import"] = f"{type(e).__name__}: {e}"

    # 2. after it, both artifacts run
    import jax_sparseconv
    model = jax.export.deserialize(blobs["model"])
    y, flags = conv.call(*conv_args)
    variables = {}
    for key, value in np.load("variables.npz").items():   # "params/SparseConv_0/kernel"
      *parents, leaf = key.split("/")
      node = variables
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    z = model.call(variables, inputs["mfeats"], inputs["mpos"])
    report["platforms"] = [list(conv.platforms), list(model.platforms)]

    # 3. error mode "flag" was baked in: a NaN valid position gives NaN outputs and flags
    bad = inputs["pos"].copy()
    bad[0, 0] = np.nan
    y_bad, flags_bad = conv.call(conv_args[0], inputs["feats"], bad, inputs["count"])
    report["bad_all_nan"] = bool(np.all(np.isnan(np.asarray(y_bad))))
    report["bad_flags"] = int(flags_bad)
    np.savez("outputs.npz", y=y, flags=flags, z=z)
    print(json.dumps(report))
""")


def test_export_serialize_and_run_in_a_fresh_process(tmp_path):
  rng = np.random.default_rng(0)
  cap, count = 64, 50
  pos = np.full((cap, 3), np.nan, np.float32)       # padded: NaN rows past the count
  pos[:count] = lattice_cloud(rng, count, 5, VS)
  feats = np.zeros((cap, 4), np.float32)
  feats[:count] = rng.standard_normal((count, 4))
  params = {"kernel": rng.standard_normal((3, 3, 3, 4, 5)).astype(np.float32),
            "bias": rng.standard_normal(5).astype(np.float32)}
  model = TwoLayers()
  mpos, mfeats = pos[:count], feats[:count]
  variables = model.init(jax.random.key(0), mfeats, mpos)
  flat = {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(variables)}

  conv_fn = jax.jit(infer_conv)
  model_fn = jax.jit(model.apply)
  with sc.export_mode():
    conv_exp = jax.export.export(conv_fn, platforms=("cpu",),
                                 disabled_checks=sc.export_disabled_checks())(
                                     params, feats, pos, np.int32(count))
    # several platforms in one artifact: each lowering names only its own targets
    model_exp = jax.export.export(model_fn, platforms=("cpu", "cuda"),
                                  disabled_checks=sc.export_disabled_checks())(
                                      variables, mfeats, mpos)
    with jax.default_device(jax.devices("cpu")[0]):
      expect_y, expect_flags = conv_fn(params, feats, pos, np.int32(count))
      expect_z = model_fn(variables, mfeats, mpos)
  uses_kernels = bool(custom_calls(conv_exp))
  if sc.get_kernel_backend() != "jnp":
    assert uses_kernels == sc.kernel_builds()["host"]

  (tmp_path / "conv.bin").write_bytes(conv_exp.serialize())
  (tmp_path / "model.bin").write_bytes(model_exp.serialize())
  np.savez(tmp_path / "inputs.npz", pos=pos, feats=feats, count=np.int32(count), mpos=mpos,
           mfeats=mfeats, **params)
  np.savez(tmp_path / "variables.npz", **flat)  # "params/SparseConv_0/kernel": ...
  (tmp_path / "load.py").write_text(LOADER)

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "load.py"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  out = np.load(tmp_path / "outputs.npz")

  np.testing.assert_allclose(out["y"], expect_y, rtol=1e-6, atol=1e-6)
  assert int(out["flags"]) == int(expect_flags) == 0
  np.testing.assert_allclose(out["z"], expect_z, rtol=1e-6, atol=1e-6)
  assert report["platforms"] == [["cpu"], ["cpu", "cuda"]]
  if uses_kernels:
    assert "No FFI handler registered" in report["without_import"], report
  assert report["bad_all_nan"] and report["bad_flags"] & int(sc.ErrorCode.NONFINITE_POSITION)


def test_jnp_backend_exports_without_custom_calls():
  """``set_kernel_backend("jnp")`` while exporting: a portable artifact with no custom
  call (no disabled checks needed, no jax_sparseconv at load time)."""
  pos = lattice_cloud(np.random.default_rng(1), 30, 4, VS)
  params = {"kernel": jnp.ones((3, 3, 3, 2, 2))}
  previous = sc.set_kernel_backend("jnp")
  try:
    with sc.export_mode():
      exp = jax.export.export(jax.jit(infer_conv), platforms=("cpu", "cuda"))(
          params, jnp.ones((30, 2)), pos, 30)
  finally:
    sc.set_kernel_backend(previous)
  assert custom_calls(exp) == []
  y, flags = exp.call(params, jnp.ones((30, 2)), pos, 30)
  assert int(flags) == 0 and y.shape == (30, 2)
