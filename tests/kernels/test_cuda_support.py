"""Where the CUDA kernels run, and the jnp fallback elsewhere (_src/cuda_support.py, backend).

The checks are plain functions of the device's properties, so each condition is forced here
with fake ones: compute capability vs the built architectures (machine code, PTX JIT), the
driver version vs the CUDA 13 runtime, and a failed probe launch. Then the wiring: where the
check fails, ``dispatch`` lowers no CUDA target and warns once with the reason, and
``kernel_builds()`` reports it.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
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
  def __init__(self, id, cc, kind="NVIDIA A100", process_index=0, local_id=None):
    self.id, self.compute_capability = id, cc
    self.local_hardware_id = id if local_id is None else local_id
    self.device_kind, self.process_index = kind, process_index


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
  assert "@jsc_gather_matmul" in text and "@jsc_weight_grad" in text
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


# ------------------------------------------------------------------ issue 22, defects 4-7


def test_multi_host_checks_and_probes_local_gpus_only():
  """Defect 4: jax.devices("cuda") lists every process's GPUs. Only this process's are
  checked, each probed by its local ordinal (global ids 8, 9 are local GPUs 0, 1 of host 1);
  another host's unusable GPU does not switch the CUDA path off here."""
  mod = FakeModule()
  devices = [FakeDevice(i, "7.0" if i < 8 else "9.0", process_index=i // 8, local_id=i % 8)
             for i in range(10)]  # host 0: V100s (no image); host 1: two H100s
  ok, reason = cs.check_devices(mod, devices, process_index=1)
  assert ok, reason
  assert mod.probed == [0, 1] and reason.startswith("NVIDIA A100 8:")
  ok, reason = cs.check_devices(FakeModule(), devices, process_index=0)
  assert not ok and "no kernel image" in reason
  assert cs.local_only(devices, 1) == devices[8:]


def test_cuda_devices_are_this_process_s(monkeypatch):
  """backend._cuda_devices asks for this process's devices (jax.local_devices), never the
  global list."""
  fakes = [FakeDevice(0, "9.0")]
  calls = []
  monkeypatch.setattr(jax, "local_devices",
                      lambda process_index=None, backend=None: calls.append(backend) or fakes)
  monkeypatch.setattr(jax, "devices", lambda *a, **k: pytest.fail("global device list used"))
  assert backend._cuda_devices() == fakes and calls == ["cuda"]


@pytest.mark.parametrize("runtime,driver,ok", [
    (12080, 12020, True),    # a CUDA 12.8 build on a 12.2 driver: minor-version compatible
    (12090, 12000, True),
    (12080, 11080, False),   # another major
    (13000, 12090, False),   # the default CUDA 13 build needs R580
    (13020, 13000, True),
])
def test_driver_gate_follows_the_runtime_major(runtime, driver, ok):
  """Defect 5: the driver must support the build's runtime major version, not 13.0 always."""
  got, reason = cs.cuda_usable("8.0", driver, DEFAULT, runtime_version=runtime)
  assert got == ok, reason
  assert cs.min_driver_version(runtime) == runtime // 1000 * 1000
  if not ok:
    assert f"CUDA >= {runtime // 1000}.0" in reason
    assert f"R{cs.DRIVER_BRANCHES[runtime // 1000]}" in reason


CMAKE = shutil.which("cmake")
NVCC_CMAKE = pathlib.Path(__file__).resolve().parents[2] / "ffi" / "jsc_nvcc.cmake"


def _fake_nvcc(tmp_path, release):
  d = tmp_path / f"cuda-{release}" / "bin"
  d.mkdir(parents=True)
  nvcc = d / "nvcc"
  nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, "
                  f"V{release}.1'\n")
  nvcc.chmod(0o755)
  return nvcc


def _find_nvcc(mode, candidate="", env=None):
  run_env = {"PATH": "/usr/bin:/bin", **(env or {})}
  r = subprocess.run([CMAKE, f"-DJSC_CUDA={mode}", f"-DJSC_NVCC_CANDIDATE={candidate}", "-P",
                      str(NVCC_CMAKE)], capture_output=True, text=True, env=run_env)
  line = re.search(r"JSC_NVCC_RESULT=(.*)", r.stderr)
  return r.returncode, (line.group(1).split(";", 2) if line else None), r.stderr


@pytest.mark.skipif(CMAKE is None, reason="no cmake")
def test_nvcc_too_old_skips_cuda_under_auto_and_fails_under_on(tmp_path):
  """Defect 5: nvcc < 12.8 skips the CUDA kernels with JSC_CUDA=AUTO (the install goes on
  with the host build) and fails the configuration with JSC_CUDA=ON."""
  old = _fake_nvcc(tmp_path, "12.4")
  rc, (nvcc, version, why), _ = _find_nvcc("AUTO", old)
  assert rc == 0 and nvcc == "" and version == "12.4" and "need nvcc >= 12.8" in why
  rc, _, err = _find_nvcc("ON", old)
  assert rc != 0 and "JSC_CUDA=ON, but no usable CUDA compiler" in err
  new = _fake_nvcc(tmp_path, "12.8")
  rc, (nvcc, version, _), _ = _find_nvcc("ON", new)
  assert rc == 0 and nvcc == str(new) and version == "12.8"


@pytest.mark.skipif(CMAKE is None, reason="no cmake")
def test_nvcc_found_off_path(tmp_path):
  """Defect 6: nvcc is found in $CUDA_HOME/bin (and /usr/local/cuda/bin), not only on PATH."""
  nvcc = _fake_nvcc(tmp_path, "13.0")
  rc, (found, version, _), _ = _find_nvcc("AUTO", env={"CUDA_HOME": str(nvcc.parents[1])})
  assert rc == 0 and found == str(nvcc) and version == "13.0"
  assert "/usr/local/cuda/bin" in NVCC_CMAKE.read_text()
  if pathlib.Path("/usr/local/cuda/bin/nvcc").exists():  # a machine with a toolkit
    rc, (found, _, _), _ = _find_nvcc("AUTO")
    assert found == "/usr/local/cuda/bin/nvcc"


def test_broken_build_is_reported_not_swallowed(monkeypatch):
  """Defect 6: an installed module that fails to import is recorded and warned about; only
  a module that is not there at all is quiet."""
  def fail(name):
    if name.endswith("_broken"):
      raise ImportError("libcuda.so.1: cannot open shared object file")
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
  monkeypatch.setattr(ffi.importlib, "import_module", fail)
  monkeypatch.setattr(ffi, "load_errors", {})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert ffi._load("_absent", "CUDA") is None  # not built: quiet
  with pytest.warns(RuntimeWarning, match="installed but cannot be imported"):
    assert ffi._load("_broken", "CUDA") is None
  assert "libcuda.so.1" in ffi.load_errors["_broken"]


@pytest.mark.parametrize("error", [None, "ImportError: undefined symbol: cudaLaunchKernel"])
def test_missing_cuda_build_on_a_gpu_machine_warns(monkeypatch, error):
  """Defect 6: with GPUs but no (or a broken) CUDA build, dispatch serves the jnp path with
  one warning saying why (a jax[cuda] wheel user without nvcc is told), not silently."""
  monkeypatch.setattr(ffi, "cuda", None)
  monkeypatch.setattr(ffi, "load_errors", {} if error is None else {"_cuda_kernels": error})
  monkeypatch.setattr(backend, "_cuda_state", None)
  monkeypatch.setattr(backend, "_warned", False)
  monkeypatch.setattr(backend, "_cuda_devices", lambda: [FakeDevice(0, "9.0")])
  x = jnp.arange(3.0)
  with pytest.warns(RuntimeWarning, match="cannot run here") as record:
    out = backend.dispatch(lambda v: v + 1, lambda v: v * 0, x, backend="auto")
  np.testing.assert_array_equal(np.asarray(out), [1.0, 2.0, 3.0])
  text = str(record[0].message)
  assert ("failed to load" in text and "cudaLaunchKernel" in text) if error else \
      ("not built" in text and "jax[cuda]" in text)
  assert sc.kernel_builds()["cuda_usable"] is False
  # No GPU in the process: nothing to warn about.
  monkeypatch.setattr(backend, "_warned", False)
  monkeypatch.setattr(backend, "_cuda_devices", lambda: [])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    backend.dispatch(lambda v: v + 1, lambda v: v * 0, x, backend="auto")


def test_weight_gradient_partitions_fill_one_wave():
  """Defect 7: the partition count rounds down, S * tiles * P <= 528 (132 SMs x 4 blocks):
  27 slots at 64 x 64 channels get 19 partitions (513 blocks), not 20 (540: a second wave
  of 12 blocks)."""
  assert ffi.num_partitions(1_000_000, 27, 64, 64) == 19
  for m, s, cin, cout in [(10**6, 27, 64, 64), (10**6, 8, 32, 32), (10**6, 125, 64, 64),
                          (10**5, 27, 128, 128), (10**6, 1, 64, 64), (5000, 27, 16, 16)]:
    parts = ffi.num_partitions(m, s, cin, cout)
    tiles = -(-cin // 64) * -(-cout // 64)
    assert parts >= 1 and (s * tiles * parts <= 528 or parts == 1), (m, s, cin, cout, parts)


def test_selftest_float32_tolerance_is_not_loosened_for_gpus():
  """Defect 2: the jnp path's matmuls use Precision.HIGHEST, so the self-test checks GPUs to
  the float32 tolerance too (no 50x TF32 allowance)."""
  from jax_sparseconv import selftest
  assert not hasattr(selftest, "TOL_TF32")
  for platform in ("cpu", "gpu"):
    for what in ("jnp (XLA)", "cuda kernels"):
      assert selftest.f32_tolerance(platform, what) == selftest.TOL_F32
  from jax_sparseconv._src import gather_matmul
  assert gather_matmul._EXACT == jax.lax.Precision.HIGHEST
