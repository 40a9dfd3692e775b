"""Can the CUDA kernels run on this machine? The checks, as plain functions.

The CUDA build of the kernels (``_cuda_kernels``) is compiled by nvcc 13 for a fixed list
of GPU architectures and links the CUDA 13 runtime statically. It runs on a GPU when

* the **driver** supports the major CUDA version of the runtime linked in (minor-version
  compatibility: a CUDA 13.x build runs on any driver for CUDA 13.0+, a CUDA 12.8 build on any
  driver for CUDA 12.0+): ``cudaDriverGetVersion() >= 1000 * major``, i.e. for the default
  CUDA 13 build an NVIDIA driver of branch **R580 or newer** (CUDA 12: R525+). Source: NVIDIA's CUDA Compatibility guide,
  "Minor Version Compatibility", Table 1 "CUDA Toolkit 11.x, 12.x, and 13.x Driver Version
  Ranges": CUDA 13.x needs a minimum driver ">= 580" (the CUDA 13.0 GA toolkit shipped with
  580.65.06); https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html
  and the CUDA 13.0 release notes' "CUDA Driver" section. A driver that runs JAX's CUDA-12
  plugin (R525..R575) is too old for it;
* the GPU's **compute capability** has a kernel image: machine code (SASS) built for
  ``sm_XY`` runs on compute capability ``X.Z`` with ``Z >= Y`` (same major), and PTX built
  for ``compute_XY`` is JIT-compiled by the driver for any compute capability ``>= X.Y`` -
  provided the driver is at least as new as the toolkit that wrote the PTX. The default
  build (``JSC_CUDA_ARCHITECTURES = 75-real;80-real;90``) covers 7.5 (T4), 8.x (A100, A10,
  L4 ...), 9.0 (H100) and, through compute_90 PTX, newer GPUs. CUDA 13 cannot build for
  compute capability below 7.5 (V100 and older: its release notes drop Maxwell, Pascal and
  Volta), so those GPUs use the jnp path;
* a **probe launch** of a trivial kernel of the module (same fat binary, same
  architectures) on each GPU succeeds and writes its result: this catches for real what the
  two checks above only predict ("no kernel image is available", an insufficient driver, a
  failed PTX JIT).

``cuda_usable`` takes those properties as arguments (tests pass fake ones);
``check_devices`` collects them from the machine. ``backend.dispatch`` takes the CUDA branch
only where the check passes, and otherwise serves the jnp path with one warning saying why.
"""

from __future__ import annotations

import dataclasses
import re

#: ``cudaDriverGetVersion()`` the default build (static CUDA 13 runtime) needs: 13.0 (R580+).
MIN_DRIVER_VERSION = 13000
#: The driver branch that first supports CUDA 13.0 (for messages; the check uses the above).
MIN_DRIVER_BRANCH = 580
#: The first driver branch of each CUDA major version (minor-version compatibility holds
#: from there on; NVIDIA's CUDA Compatibility guide, Table 1). For messages only.
DRIVER_BRANCHES = {11: 450, 12: 525, 13: 580}


def min_driver_version(runtime_version: int) -> int:
  """The ``cudaDriverGetVersion()`` a build linking the CUDA runtime ``runtime_version``
  (e.g. 12080) needs: the first version of its major (12000). Minor-version compatibility
  runs the build's machine code on any driver of that major; only PTX JIT needs a driver as
  new as the toolkit (checked separately)."""
  return max(1000, runtime_version // 1000 * 1000)
#: The oldest GPU generation nvcc 13 compiles for (sm_75, Turing).
MIN_BUILDABLE_CC = (7, 5)
#: bfloat16 tensor cores (WMMA): from compute capability 8.0; below, bfloat16 runs on the
#: CUDA cores in the same kernels (chosen at launch), so it is no reason to fall back.
MIN_CC_BF16_TENSOR_CORES = (8, 0)


@dataclasses.dataclass(frozen=True)
class Architectures:
  """What a build carries: machine code for ``sass`` and PTX for ``ptx`` (each a list of
  (major, minor)); ``exact`` holds the arch-specific SASS ("90a") that runs on its own
  compute capability only. ``known`` is False for lists like "native" or "all", which CMake
  expands itself: then only the probe can tell."""
  sass: tuple[tuple[int, int], ...] = ()
  ptx: tuple[tuple[int, int], ...] = ()
  exact: tuple[tuple[int, int], ...] = ()
  known: bool = True

  def describe(self) -> str:
    if not self.known:
      return "an architecture list only CMake resolved"
    parts = [f"sm_{a}{b}" for a, b in self.sass] + [f"sm_{a}{b}a" for a, b in self.exact]
    parts += [f"compute_{a}{b} PTX" for a, b in self.ptx]
    return ", ".join(parts) or "no architecture"


def _cc_tuple(value) -> tuple[int, int] | None:
  """(major, minor) from "8.6", (8, 6), 8.6 or 86; None for None or ""."""
  if value is None or value == "":
    return None
  if isinstance(value, tuple):
    return int(value[0]), int(value[1])
  if isinstance(value, int):
    return divmod(value, 10)
  text = str(value).strip()
  m = re.fullmatch(r"(\d+)\.(\d+)", text)
  if m:
    return int(m.group(1)), int(m.group(2))
  if text.isdigit():
    return divmod(int(text), 10)
  raise ValueError(f"compute capability {value!r}: expected e.g. '8.6', (8, 6) or 86")


def parse_architectures(spec: str) -> Architectures:
  """CMake's CUDA_ARCHITECTURES ("75-real;80-real;90", commas too) -> what the build holds:
  "NN-real" machine code only, "NN-virtual" PTX only, "NN" both; "NNa"/"NNf" arch- or
  family-specific machine code."""
  sass, ptx, exact = [], [], []
  for item in re.split(r"[;,\s]+", spec.strip()):
    if not item:
      continue
    m = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", item)
    if m is None:
      return Architectures(known=False)
    cc = divmod(int(m.group(1)), 10)
    kind = m.group(3)
    if m.group(2) == "a":  # arch-specific: this compute capability only, no PTX use
      if kind != "virtual":
        exact.append(cc)
      continue
    if kind in (None, "real"):
      sass.append(cc)
    if kind in (None, "virtual") and m.group(2) == "":
      ptx.append(cc)
  return Architectures(tuple(sass), tuple(ptx), tuple(exact))


def _version(v: int) -> str:
  return f"{v // 1000}.{v % 1000 // 10}"


def image_for(cc: tuple[int, int], archs: Architectures) -> tuple[str, tuple[int, int]] | None:
  """("sass", arch) or ("ptx", arch): the image the driver would pick for compute capability
  ``cc`` (the newest fitting machine code, else the newest PTX at or below it); None if none."""
  sass = [a for a in archs.sass if a[0] == cc[0] and a[1] <= cc[1]] + \
         [a for a in archs.exact if a == cc]
  if sass:
    return "sass", max(sass)
  ptx = [a for a in archs.ptx if a <= cc]
  if ptx:
    return "ptx", max(ptx)
  return None


def cuda_usable(compute_capability, driver_version: int, built_arches, *,
                runtime_version: int = MIN_DRIVER_VERSION,
                probe_error: str | None = None) -> tuple[bool, str]:
  """Whether the CUDA kernels can run on one GPU, and why (or why not).

  ``compute_capability``: the GPU's ("8.6", (8, 6) or 86; None = unknown, left to the
  probe); ``driver_version``: ``cudaDriverGetVersion()`` (13000 = CUDA 13.0; 0 = no
  driver); ``built_arches``: the build's CMake architecture list (a string) or an
  :class:`Architectures`; ``runtime_version``: ``cudaRuntimeGetVersion()`` of the static
  runtime linked in (the toolkit that wrote the PTX); ``probe_error``: what the probe launch
  reported (None = it succeeded, or was not run).
  """
  archs = built_arches if isinstance(built_arches, Architectures) else \
      parse_architectures(built_arches)
  cc = _cc_tuple(compute_capability)
  if driver_version <= 0:
    return False, "no CUDA driver found (cudaDriverGetVersion() gave 0)"
  need = min_driver_version(runtime_version)
  if driver_version < need:
    branch = DRIVER_BRANCHES.get(need // 1000)
    return False, (f"the NVIDIA driver supports CUDA {_version(driver_version)}, but the kernels "
                   f"link the CUDA {_version(runtime_version)} runtime, which needs a driver for "
                   f"CUDA >= {_version(need)}"
                   + (f" (branch R{branch} or newer)" if branch else ""))
  how = "the probe decides"
  if cc is not None and archs.known:
    image = image_for(cc, archs)
    ccs = f"{cc[0]}.{cc[1]}"
    if image is None:
      why = (f"no kernel image for compute capability {ccs}: built for {archs.describe()}")
      if cc < MIN_BUILDABLE_CC:
        why += (f" (CUDA 13 cannot compile for compute capability below "
                f"{MIN_BUILDABLE_CC[0]}.{MIN_BUILDABLE_CC[1]})")
      else:
        why += f" (rebuild with JSC_CUDA_ARCHITECTURES including {cc[0]}{cc[1]})"
      return False, why
    kind, (a, b) = image
    if kind == "ptx" and driver_version < runtime_version:
      return False, (f"compute capability {ccs} needs the compute_{a}{b} PTX JIT-compiled, and "
                     f"the driver (CUDA {_version(driver_version)}) is older than the toolkit "
                     f"that wrote it (CUDA {_version(runtime_version)})")
    how = (f"sm_{a}{b} machine code" if kind == "sass"
           else f"compute_{a}{b} PTX JIT-compiled by the driver")
    how += f" on compute capability {ccs}"
    if cc < MIN_CC_BF16_TENSOR_CORES:
      how += " (bfloat16 on the CUDA cores: no bfloat16 tensor cores)"
  if probe_error is not None:
    return False, f"a probe launch of the kernels' module failed: {probe_error}"
  return True, f"{how}; driver for CUDA {_version(driver_version)}"


def local_only(devices, process_index: int):
  """The devices of ``devices`` attached to process ``process_index``: in a multi-host run
  ``jax.devices("cuda")`` lists every process's GPUs, and only this process's can be probed
  (by their local ordinal); a device without ``process_index`` counts as local."""
  return [d for d in devices if getattr(d, "process_index", process_index) == process_index]


def check_devices(module, devices, process_index: int | None = None) -> tuple[bool, str]:
  """:func:`cuda_usable` for every device of ``devices`` (JAX CUDA devices) that belongs to
  this process (``process_index``, default ``jax.process_index()``; other hosts' GPUs are
  theirs to check), with the versions and probe of ``module`` (``_cuda_kernels``). All must
  pass; the reason is the first failure's, else the first device's. Each is probed by its
  local ordinal (``local_hardware_id``), never by its global id."""
  if process_index is None:
    import jax
    process_index = jax.process_index()
  devices = local_only(devices, process_index)
  archs = parse_architectures(getattr(module, "cuda_architectures", ""))
  driver = int(module.cuda_driver_version())
  runtime = int(module.cuda_runtime_version())
  first = None
  for d in devices:
    cc = getattr(d, "compute_capability", None)
    ok, reason = cuda_usable(cc, driver, archs, runtime_version=runtime)
    if ok:  # the static checks pass: launch for real
      ordinal = getattr(d, "local_hardware_id", None)
      if ordinal is None:  # no local ordinal known: the position among this process's GPUs
        ordinal = devices.index(d)
      error, _, _ = module.cuda_probe(int(ordinal))
      ok, reason = cuda_usable(cc, driver, archs, runtime_version=runtime, probe_error=error)
    reason = f"{d.device_kind if hasattr(d, 'device_kind') else 'GPU'} {d.id}: {reason}"
    if not ok:
      return False, reason
    first = first or reason
  if first is None:
    return False, "no CUDA device"
  return True, first
