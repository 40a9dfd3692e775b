"""Where the CUDA kernels run, and the jnp fallback elsewhere (_src/cuda_support.py, backend).

The checks are plain functions of the device's properties, so each condition is forced here
with fake ones: compute capability vs the built architectures (machine code, PTX JIT), the
driver version vs the CUDA 13 runtime, and a failed probe launch. Then the wiring: where the
check fails, ``dispatch`` lowers no CUDA target and warns once with the reason, and
``kernel_builds()`` reports it.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv._src import backend, ffi
from jax_sparseconv._src import cuda_support as cs

from tests.helpers import lattice_cloud, rel_err

DEFAULT = "75-real,80-real,90"  # ffi/CMakeLists.txt's JSC_CUDA_ARCHITECTURES
R580 = 13000  # cudaDriverGetVersion() of a driver for CUDA 13.0


# ------------------------------------------------------------------ architecture lists


def test_parse_architectures():
  a = cs.parse_architectures("75-real;80-real;90")
  assert a.known and a.sass == ((7, 5), (8, 0), (9, 0)) and a.ptx == ((9, 0),)
  assert cs.parse_architectures(DEFAULT) == a  # commas, as module.cc passes it
  v = cs.parse_architectures("80-virtual")
  assert v.sass == () and v.ptx == ((8, 0),)
  e = cs.parse_architectures("90a-real,100f")
  assert e.exact == ((9, 0),) and e.sass == ((10, 0),) and e.ptx == ()
  assert not cs.parse_architectures("native").known
  assert not cs.parse_architectures("all-major").known
  assert "sm_75" in a.describe() and "compute_90 PTX" in a.describe()


@pytest.mark.parametrize("cc,expect", [
    ("7.5", ("sass", (7, 5))), ("8.0", ("sass", (8, 0))), ("8.6", ("sass", (8, 0))),
    ("8.9", ("sass", (8, 0))), ((9, 0), ("sass", (9, 0))), (100, ("ptx", (9, 0))),
    ("12.0", ("ptx", (9, 0))), ("7.0", None), ("6.1", None)])
def test_image_for(cc, expect):
  assert cs.image_for(cs._cc_tuple(cc), cs.parse_architectures(DEFAULT)) == expect


# ------------------------------------------------------------------ one condition at a time


@pytest.mark.parametrize("cc,words", [
    ("8.0", "sm_80 machine code"), ("8.6", "sm_80 machine code"), ("9.0", "sm_90 machine code"),
    ("10.0", "compute_90 PTX JIT"), ("12.0", "compute_90 PTX JIT"),
    ("7.5", "sm_75 machine code"), (None, "the probe decides")])
def test_usable(cc, words):
  ok, reason = cs.cuda_usable(cc, R580, DEFAULT)
  assert ok, reason
  assert words in reason
  assert ("bfloat16 on the CUDA cores" in reason) == (cc == "7.5")


@pytest.mark.parametrize("cc", ["7.0", "6.1", "5.2"])
def test_gpus_cuda_13_cannot_build_for(cc):
  ok, reason = cs.cuda_usable(cc, R580, DEFAULT)
  assert not ok
  assert f"no kernel image for compute capability {cc}" in reason
  assert "below 7.5" in reason


def test_architecture_missing_from_the_build():
  ok, reason = cs.cuda_usable("9.0", R580, "80-real")  # SASS only, no PTX to JIT
  assert not ok and "including 90" in reason
  ok, reason = cs.cuda_usable("8.6", R580, "86-real")
  assert ok and "sm_86" in reason
  ok, reason = cs.cuda_usable("8.0", R580, "86-real")  # SASS does not run on a lower minor
  assert not ok
  ok, reason = cs.cuda_usable("9.0", R580, "90a-real")
  assert ok
  ok, reason = cs.cuda_usable("10.0", R580, "90a-real")  # arch-specific: no forward use
  assert not ok


@pytest.mark.parametrize("driver", [12080, 12040, 11080])
def test_driver_too_old_for_the_cuda_13_runtime(driver):
  ok, reason = cs.cuda_usable("8.0", driver, DEFAULT, runtime_version=13000)
  assert not ok
  assert f"supports CUDA {driver // 1000}.{driver % 1000 // 10}" in reason
  assert "R580" in reason


def test_no_driver():
  ok, reason = cs.cuda_usable("8.0", 0, DEFAULT)
  assert not ok and "no CUDA driver" in reason


def test_ptx_jit_needs_a_driver_as_new_as_the_toolkit():
  # Minor-version compatibility runs the machine code of a CUDA 13.2 build on a 13.0
  # driver, but the 13.0 driver cannot JIT 13.2's PTX.
  ok, _ = cs.cuda_usable("8.0", 13000, DEFAULT, runtime_version=13020)
  assert ok
  ok, reason = cs.cuda_usable("10.0", 13000, DEFAULT, runtime_version=13020)
  assert not ok and "older than the toolkit" in reason
  ok, _ = cs.cuda_usable("10.0", 13020, DEFAULT, runtime_version=13020)
  assert ok


def test_probe_failure_wins():
  ok, reason = cs.cuda_usable("8.0", R580, DEFAULT,
                              probe_error="launch: no kernel image is available for execution "
                                          "on the device (cudaErrorNoKernelImageForDevice)")
  assert not ok and "cudaErrorNoKernelImageForDevice" in reason


def test_compute_capability_forms():
  assert cs._cc_tuple("8.6") == cs._cc_tuple((8, 6)) == cs._cc_tuple(86) == (8, 6)
  with pytest.raises(ValueError):
    cs._cc_tuple("sm_86")


# ------------------------------------------------------------------ check_devices


class FakeModule:
  def __init__(self, driver=R580, runtime=13000, archs=DEFAULT, probe_errors=None):
    self.cuda_architectures = archs
    self._driver, self._runtime = driver, runtime
    self.probe_errors = probe_errors or {}
    self.probed = []

  def cuda_driver_version(self):
    return self._driver

  def cuda_runtime_version(self):
    return self._runtime

  def cuda_probe(self, device):
    self.probed.append(device)
    return self.probe_errors.get(device), 80, 90


class FakeDevice:
  def __init__(self, id, cc, kind="NVIDIA A100"):
    self.id, self.local_hardware_id, self.compute_capability = id, id, cc
    self.device_kind = kind


def test_check_devices_all_must_pass():
  mod = FakeModule()
  ok, reason = cs.check_devices(mod, [FakeDevice(0, "8.0"), FakeDevice(1, "9.0", "H100")])
  assert ok and reason.startswith("NVIDIA A100 0: sm_80") and mod.probed == [0, 1]
  mod = FakeModule()
  ok, reason = cs.check_devices(mod, [FakeDevice(0, "8.0"), FakeDevice(1, "7.0", "V100")])
  assert not ok and reason.startswith("V100 1: no kernel image")
  assert mod.probed == [0]  # no launch where the static check already fails
  mod = FakeModule(probe_errors={1: "cudaStreamSynchronize: unspecified launch failure"})
  ok, reason = cs.check_devices(mod, [FakeDevice(0, "8.0"), FakeDevice(1, "8.0")])
  assert not ok and "probe launch" in reason and "unspecified launch failure" in reason
  mod = FakeModule(driver=12090)
  ok, reason = cs.check_devices(mod, [FakeDevice(0, "9.0")])
  assert not ok and "R580" in reason and mod.probed == []


# ------------------------------------------------------------------ the real module


@pytest.mark.skipif(ffi.cuda is None, reason="built without nvcc")
def test_cuda_module_exports_what_the_check_needs():
  archs = cs.parse_architectures(ffi.cuda.cuda_architectures)
  assert archs.known and archs.sass, ffi.cuda.cuda_architectures
  assert ffi.cuda.cuda_runtime_version() >= 13000
  driver = ffi.cuda.cuda_driver_version()
  assert driver >= 0
  error, binary, ptx = ffi.cuda.cuda_probe(0)
  if driver == 0:  # no GPU driver on this machine: the probe fails, and says why
    assert isinstance(error, str) and error, error
    assert not cs.cuda_usable("8.0", driver, archs, probe_error=error)[0]
  elif jax.default_backend() == "gpu":
    assert error is None and binary > 0


# ------------------------------------------------------------------ dispatch and kernel_builds


def _conv_export(platform):
  rng = np.random.default_rng(0)
  pos = lattice_cloud(rng, 30, 4, 0.5)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 3)), jnp.float32)
  feats = jnp.asarray(rng.standard_normal((30, 2)), jnp.float32)

  def f(kernel, feats):
    return jnp.sum(sc.sparse_conv({"kernel": kernel}, feats, pos, pos, 0.5) ** 2)

  ours = [jax.export.DisabledSafetyCheck.custom_call(t)
          for t in sorted({t for mod in (ffi.host, ffi.cuda) if mod is not None
                           for t in mod.handlers()})]
  g = jax.jit(jax.grad(f, argnums=(0, 1)))
  return jax.export.export(g, platforms=(platform,), disabled_checks=ours)(
      kernel, feats).mlir_module()


@pytest.fixture
def forced_cuda_state(monkeypatch):
  """Sets what the CUDA check decided (and forgets the one warning) for one test."""
  def force(state):
    monkeypatch.setattr(backend, "_cuda_state", state)
    monkeypatch.setattr(backend, "_warned", False)
    jax.clear_caches()
  yield force
  jax.clear_caches()


@pytest.mark.skipif(ffi.cuda is None, reason="built without nvcc")
def test_failed_check_lowers_no_cuda_target_and_warns_once(forced_cuda_state, flag_errors):
  reason = "NVIDIA V100 0: no kernel image for compute capability 7.0 (fake)"
  forced_cuda_state((False, False, reason))
  with pytest.warns(RuntimeWarning, match="cannot run here") as record:
    text = _conv_export("cuda")
  assert "@jsc_" not in text  # the jnp path, on the GPU
  assert sum(reason in str(w.message) for w in record) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no second warning
    jax.clear_caches()
    _conv_export("cuda")
  builds = sc.kernel_builds()
  assert builds["cuda"] and builds["cuda_usable"] is False and builds["cuda_reason"] == reason


@pytest.mark.skipif(ffi.cuda is None, reason="built without nvcc")
def test_passed_check_lowers_the_cuda_kernels(forced_cuda_state, flag_errors):
  forced_cuda_state((True, True, "NVIDIA H100 0: sm_90 machine code (fake)"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text = _conv_export("cuda")
  assert "@jsc_gather_matmul" in text and "@jsc_kernel_grad" in text
  assert sc.kernel_builds()["cuda_usable"] is True


def test_kernel_builds_reports_the_choice():
  builds = sc.kernel_builds()
  assert set(builds) >= {"cuda", "host", "cuda_usable", "cuda_reason"}
  assert isinstance(builds["cuda_reason"], str) and builds["cuda_reason"]
  if jax.default_backend() != "gpu":
    assert builds["cuda_usable"] is False


def test_cpu_only_process_keeps_the_branch_for_exports():
  if jax.default_backend() == "gpu" or ffi.cuda is None:
    pytest.skip("a CPU-only process with the CUDA build")
  lower, usable, reason = backend.cuda_status()
  assert lower and not usable and "no CUDA device" in reason


# ------------------------------------------------------------------ bf16 below compute capability 8.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_types_at_compute_capability_7_5(rng, monkeypatch, dtype):
  """On a 7.5 GPU the launch runs bf16 on the CUDA cores (no bf16 WMMA there) and fp16 on
  the tensor cores; the host build takes the device's compute capability from
  $JSC_SHIM_CC (read at launch)."""
  if ffi.host is None:
    pytest.skip("no host build")
  from tests.helpers import kernel_inputs as _inputs, loop_gather_matmul, random_map
  n, m, s, cin, cout = 150, 131, 5, 70, 90
  x, w = _inputs(rng, dtype, n, m, s, cin, cout)
  nbr = random_map(rng, n, m, s)
  expect = loop_gather_matmul(x.astype(np.float64), w.astype(np.float64), nbr)
  previous = backend.set_kernel_backend("host")
  try:
    out = {}
    for cc in ("75", "90"):
      monkeypatch.setenv("JSC_SHIM_CC", cc)
      out[cc] = np.asarray(ffi.gather_matmul(jnp.asarray(x, dtype), jnp.asarray(w, dtype),
                                             jnp.asarray(nbr), jnp.dtype(dtype)), np.float64)
      assert rel_err(out[cc], expect) < (1.5e-2 if dtype == "bfloat16" else 2e-3)
  finally:
    backend.set_kernel_backend(previous)
