"""The first GPU run: ``python3 bench/gpu.py`` (one command, at most 5 minutes).

One run of fixed steps, each a subprocess with its own timeout inside a total budget of
:data:`BUDGET_S` seconds (the plan's timeouts add up to less; ``--dry-run`` prints the plan
and fails if it does not fit; ``tests/kernels/test_gpu_bench.py`` checks it). No step ends the
run: a step that fails or times out is recorded and the next one starts, and the table
(``gpu_results.md``) is rewritten after every step, so whatever happens it holds every
result so far. Steps, in order:

 1. ``env``: ``nvidia-smi`` (GPU, driver, compute capability, clocks, throttling), versions.
 2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` with ``JSC_CUDA=ON`` for
    this GPU's architecture only (``JSC_CUDA_ARCHITECTURES=<cc>-real``: a third of the
    compile time); then this script re-executes itself (a fresh interpreter reads the
    editable install's ``.pth``) and goes on with the next step.
 3. ``probe``: ``sc.kernel_builds()`` and, per GPU of this process, the driver / compute
    capability / probe-launch check of ``cuda_support``.
 4. ``tests``: the kernel tests on the GPU (conv kernels against loops, bitwise
    reproducibility, handler checks, the CUDA search against the jnp one, the module checks).
 5. ``cmdbuf``: bf16 and f32 conv chains (forward and backward) under XLA command buffers
    (``--xla_gpu_graph_min_graph_size=1``, custom calls captured), against jnp.
 6. ``check``: forward AND backward, kernels vs jnp, float32 and bfloat16, at 100k voxels on
    the bench clouds; the CUDA search's kernel maps vs the jnp search's (bitwise); a repeat
    of each kernel call (bitwise).
 7. ``memcheck``, 8. ``racecheck``: ``compute-sanitizer`` on a few kernel tests, only the
    library's kernels instrumented (``sanitizer.txt``).
 9. ``timings``: 100k voxels, C = 64, kernels vs jnp, float32 at full precision (no TF32:
    ``jax_default_matmul_precision=highest``; the kernels are FP32 SIMT) and bfloat16,
    forward, backward and the kernel-map build (the search), with the measured dense matmul
    rate and copy bandwidth (the roofline).
10. ``ncu``: Nsight Compute on one forward + backward per dtype and the search, without
    clock locking (``--clock-control none``: the clocks the timings ran at), basic sections
    (``ncu.txt``, ``ncu.ncu-rep``).
11. ``trace``: one ``jax.profiler`` trace of the same calls (``trace.tar.gz``).

Every JAX step runs with ``JAX_PLATFORMS=cuda`` (a failed GPU initialisation is an error,
not a silent CPU run) and ``XLA_PYTHON_CLIENT_PREALLOCATE=false``; this driver never
imports JAX, so it holds no GPU memory. Result files (at most 8, :data:`RESULT_FILES`):
``gpu_results.md``, ``results.json``, ``log.txt`` (every step's output), ``sanitizer.txt``,
``ncu.txt``, ``ncu.ncu-rep``, ``trace.tar.gz``. ``bench/RESULTS.md`` ("GPU run checklist")
says what to record from them.

``--smoke`` runs the JAX steps on the CPU (host build of the kernels, small clouds): a check
of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
#: The whole run, seconds (a GPU slot is 15 minutes, a command at most 10).
BUDGET_S = 300
#: Seconds kept back for writing the table and the re-exec.
RESERVE_S = 6
#: What the run leaves in --out (nothing else).
RESULT_FILES = ("gpu_results.md", "results.json", "log.txt", "sanitizer.txt", "ncu.txt",
                "ncu.ncu-rep", "trace.tar.gz")
VS = 0.05  # voxel size of the bench clouds
N_VOXELS = 100_000
CHANNELS = 64
BENCH_CLOUDS = ("compact", "outdoor", "spread", "indoor")
#: Row marker of a JAX step's results on its stdout (parsed as they come: a step killed by
#: its timeout keeps the rows it printed).
ROW = "@@ROW "

GPU_ENV = {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
CMDBUF_FLAGS = ("--xla_gpu_graph_min_graph_size=1 "
                "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL")
# The kernel tests of step 4 (GPU) and the few that the sanitizers run (steps 7, 8).
GPU_TESTS = ["tests/core/test_gather_matmul.py", "tests/core/test_backend.py",
             "tests/core/test_lookup.py", "tests/kernels/test_cuda_support.py",
             "tests/kernels/test_host_shim.py"]
# The tests that run the CUDA kernels (conv kernels vs loops on every copy path, bitwise
# repeats, gradients, handler checks; the CUDA search vs the jnp one) and the real module's
# checks; not the gating tests on fake devices (CPU logic).
GPU_TESTS_K = ("(matches_loop and kernels-) or reproducible or primitive_grads or "
               "handler_checks or several_neighbour_blocks or (every_copy_path and 90) or "
               "cuda_search or block_table or cuda_module_exports or kernel_builds_reports or "
               "half_types or cuda_lowering_names")
SANITIZER_TESTS = ["tests/core/test_gather_matmul.py", "tests/core/test_lookup.py"]
SANITIZER_K = ("(matches_loop and kernels- and (tiles or small) and (float32 or bfloat16)) or "
               "(cuda_search and packed-padded)")


@dataclasses.dataclass(frozen=True)
class Step:
  """One step: ``argv`` run with ``env`` added, killed (with its children) after
  ``timeout`` seconds; ``output``: the result file it writes its log to (besides
  ``log.txt``)."""
  name: str
  timeout: int
  what: str
  argv: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()
  output: str | None = None


def _py_step(name, smoke, *extra):
  return (sys.executable, str(pathlib.Path(__file__).resolve()), "--step", name,
          *(("--smoke",) if smoke else ()), *extra)


def _tool(name):
  return shutil.which(name) or f"/usr/local/cuda/bin/{name}"


def plan(out: pathlib.Path, smoke: bool = False, cc: str | None = None) -> list[Step]:
  """The steps of one run, in order, with their timeouts (seconds)."""
  jax_env = tuple({**GPU_ENV, **({"JAX_PLATFORMS": "cpu"} if smoke else {})}.items())
  archs = f"{cc.replace('.', '')}-real" if cc else "75-real;80-real;90"
  pip = (sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
         "-e", str(ROOT), "-C", "cmake.define.JSC_CUDA=ON",
         "-C", f"cmake.define.JSC_CUDA_ARCHITECTURES={archs}", *_newer_ffi_flag())
  smi = ("nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,"
         "clocks.max.sm,clocks.mem,power.limit,clocks_throttle_reasons.active "
         "--format=csv; nvidia-smi; nvcc --version || /usr/local/cuda/bin/nvcc --version; "
         f"{shlex.quote(sys.executable)} -c \"import importlib.metadata as m; "
         "print({p: m.version(p) for p in ('jax', 'jaxlib')})\"")
  pytest = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")
  sanitizer = lambda tool: (_tool("compute-sanitizer"), "--tool", tool, "--target-processes",
                            "all", "--kernel-name-base", "mangled", "--kernel-name", "kns=jsc",
                            "--error-exitcode", "99", "--print-limit", "30", *pytest,
                            *SANITIZER_TESTS, "-k", SANITIZER_K)
  sanitizer_env = (*jax_env, ("XLA_PYTHON_CLIENT_ALLOCATOR", "platform"))
  ncu = (_tool("ncu"), "--clock-control", "none", "--target-processes", "all",
         "--kernel-name-base", "function", "--kernel-name",
         "regex:gather_matmul|weight_grad_partial|query_outputs|insert_inputs",
         "--launch-count", "8", "--section", "SpeedOfLight", "--section", "LaunchStats",
         "--section", "Occupancy", "--export", str(out / "ncu"), "--force-overwrite",
         *_py_step("profile-case", smoke))
  return [
      Step("env", 8, "nvidia-smi, nvcc and versions", ("bash", "-c", smi)),
      Step("build", 90, f"pip install -e . (JSC_CUDA=ON, {archs}), then re-exec", pip),
      Step("probe", 12, "kernel_builds() and the per-GPU check", _py_step("probe", smoke),
           jax_env),
      Step("tests", 40, "kernel tests on the GPU", (*pytest, *GPU_TESTS, "-k", GPU_TESTS_K),
           jax_env),
      Step("cmdbuf", 15, "bf16 / f32 conv chains in command buffers vs jnp",
           _py_step("cmdbuf", smoke), (*jax_env, ("XLA_FLAGS", CMDBUF_FLAGS))),
      Step("check", 25, "fwd + bwd vs jnp on the bench clouds; search bitwise; repeat bitwise",
           _py_step("check", smoke), jax_env),
      Step("memcheck", 20, "compute-sanitizer memcheck, a few kernel tests",
           sanitizer("memcheck"), sanitizer_env, "sanitizer.txt"),
      Step("racecheck", 20, "compute-sanitizer racecheck, a few kernel tests",
           sanitizer("racecheck"), sanitizer_env, "sanitizer.txt"),
      Step("timings", 28, "f32 (no TF32) and bf16, kernels vs jnp, search included",
           _py_step("timings", smoke), jax_env),
      Step("ncu", 22, "Nsight Compute, no clock locking", ncu, jax_env, "ncu.txt"),
      Step("trace", 10, "one jax.profiler trace", _py_step("trace", smoke, "--out", str(out)),
           jax_env),
  ]


def _newer_ffi_flag():
  """The CMake option for a jaxlib newer than 0.11.2 (its headers only, fine on this
  machine), read without importing jaxlib."""
  try:
    from importlib.metadata import version
    v = tuple(int(p) for p in re.findall(r"\d+", version("jaxlib"))[:3])
  except Exception:  # noqa: BLE001
    return ()
  return ("-C", "cmake.define.JSC_ALLOW_NEWER_FFI=ON") if v > (0, 11, 2) else ()


def plan_total(steps) -> int:
  return sum(s.timeout for s in steps)


# ------------------------------------------------------------------ running the plan


def run_step(step: Step, timeout: float, log) -> dict:
  """Runs one step (its process group killed at ``timeout``); returns its record: status
  (ok / failed / timeout / error), exit code, seconds, the rows it printed, its output."""
  t0 = time.monotonic()
  env = {**os.environ, **dict(step.env)}
  rec = {"step": step.name, "what": step.what, "timeout": step.timeout,
         "command": " ".join(shlex.quote(a) for a in step.argv)}
  try:
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
  except OSError as e:
    rec.update(status="error", rc=None, seconds=0.0, rows=[], text=f"cannot start: {e}")
    return rec
  try:
    text, _ = proc.communicate(timeout=max(1.0, timeout))
    status = "ok" if proc.returncode == 0 else "failed"
  except subprocess.TimeoutExpired:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    text, _ = proc.communicate()
    status = "timeout"
  rec.update(status=status, rc=proc.returncode, seconds=round(time.monotonic() - t0, 1),
             text=text or "")
  rec["rows"] = [json.loads(line[len(ROW):]) for line in rec["text"].splitlines()
                 if line.startswith(ROW)]
  log.write(f"\n===== {step.name}: {status} (rc {proc.returncode}, {rec['seconds']} s of "
            f"{timeout:.0f}) =====\n$ {rec['command']}\n{rec['text']}\n")
  log.flush()
  return rec


def summary(rec: dict) -> str:
  """One line of what a step found."""
  text = rec.get("text", "")
  if rec["step"] == "tests" or rec["step"] in ("memcheck", "racecheck"):
    found = re.findall(r"\d+ (?:passed|failed|skipped|errors?|deselected)", text)
    errors = re.findall(r"ERROR SUMMARY: \d+ errors?", text)
    return ", ".join(found + errors[-1:]) or _last_line(text)
  if rec["step"] == "env":
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("name,")]
    return lines[0] if lines else _last_line(text)
  if rec.get("rows"):
    return f"{len(rec['rows'])} result rows"
  return _last_line(text)


def _last_line(text):
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  return lines[-1][:200] if lines else ""


def write_table(out: pathlib.Path, records: list[dict], started: float, steps) -> None:
  """gpu_results.md and results.json from the records so far (rewritten after each step)."""
  lines = ["# bench/gpu.py", "",
           f"budget {BUDGET_S} s, planned {plan_total(steps)} s, elapsed "
           f"{time.time() - started:.0f} s", "",
           "| step | status | s | timeout | summary |", "|---|---|---|---|---|"]
  done = {r["step"]: r for r in records}
  for s in steps:
    r = done.get(s.name)
    if r is None:
      lines.append(f"| {s.name} | not run | | {s.timeout} | {s.what} |")
    else:
      cell = summary(r).replace("|", "/")
      lines.append(f"| {s.name} | {r['status']} | {r['seconds']} | {s.timeout} | {cell} |")
  for r in records:
    if r.get("rows"):
      keys = list(dict.fromkeys(k for row in r["rows"] for k in row))
      lines += ["", f"## {r['step']}", "", "| " + " | ".join(keys) + " |",
                "|" + "---|" * len(keys)]
      lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |"
                for row in r["rows"]]
  lines += ["", "What to record: bench/RESULTS.md, section \"GPU run checklist\"."]
  (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
  slim = [{k: v for k, v in r.items() if k != "text"} for r in records]
  (out / "results.json").write_text(json.dumps({"started": started, "records": slim},
                                               indent=1))


def _cell(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v).replace("|", "/")


def _cc_from(text: str) -> str | None:
  """The compute capability nvidia-smi's query printed ("9.0"), if any."""
  m = re.search(r"^[^,\n]+, [^,\n]+, (\d+\.\d+),", text, re.M)
  return m.group(1) if m else None


def drive(args) -> int:
  """Runs the plan from step ``args.resume_at`` on; re-executes itself after the build."""
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  state_path = out / "results.json"
  records, started, cc = [], time.time(), None
  if not args.resume_at:  # a fresh run: no file of an earlier one mixes in
    for name in RESULT_FILES:
      (out / name).unlink(missing_ok=True)
  if args.resume_at:
    state = json.loads(state_path.read_text())
    records, started = state["records"], state["started"]
    cc = state.get("cc")
  steps = plan(out, args.smoke, cc)
  names = [s.name for s in steps]
  first = names.index(args.resume_at) if args.resume_at else 0
  with open(out / "log.txt", "a") as log:
    for step in steps[first:]:
      if args.smoke and step.name in ("env", "build", "memcheck", "racecheck", "ncu"):
        records.append({"step": step.name, "what": step.what, "status": "skipped",
                        "rc": None, "seconds": 0.0, "rows": [],
                        "text": "--smoke: needs a GPU", "timeout": step.timeout})
        write_table(out, records, started, steps)
        continue
      left = started + BUDGET_S - RESERVE_S - time.time()
      if left < 2:
        records.append({"step": step.name, "what": step.what, "status": "no time",
                        "rc": None, "seconds": 0.0, "rows": [], "text": "budget spent",
                        "timeout": step.timeout})
        write_table(out, records, started, steps)
        continue
      rec = run_step(step, min(step.timeout, left), log)
      records.append(rec)
      if step.output:
        with open(out / step.output, "a") as f:
          f.write(f"===== {step.name} =====\n{rec['text']}\n")
      if step.name == "env":
        cc = _cc_from(rec["text"])
        steps = plan(out, args.smoke, cc)  # the build for this GPU's architecture
      write_table(out, records, started, steps)
      if step.name == "build":
        # A fresh interpreter sees the editable install (.pth files are read at start-up).
        state = json.loads(state_path.read_text())
        state_path.write_text(json.dumps({**state, "records": _with_text(records), "cc": cc},
                                         indent=1))
        nxt = names[names.index("build") + 1]
        argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--out", str(out),
                "--resume-at", nxt, *(("--smoke",) if args.smoke else ())]
        log.write(f"\n===== re-exec: {' '.join(argv)} =====\n")
        log.flush()
        os.execv(sys.executable, argv)
  print((out / "gpu_results.md").read_text())
  return 0


def _with_text(records):
  """Records for the re-exec (the step texts stay in log.txt; summaries need a little)."""
  return [{**r, "text": r.get("text", "")[-4000:]} for r in records]


# ------------------------------------------------------------------ the JAX steps


def _row(**kv):
  print(ROW + json.dumps(kv, default=str), flush=True)


def _jax_setup(smoke):
  """Imports JAX and the package; the kernels' backend ("auto" on a GPU, the host build's
  "host" for --smoke) and the cloud size."""
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  if not smoke and jax.default_backend() != "gpu":
    raise SystemExit(f"expected a GPU, JAX runs on {jax.default_backend()}")
  return ("host" if smoke else "auto"), (3000 if smoke else N_VOXELS)


def _median_ms(fn, *args, repeats):
  import jax
  import numpy as np
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def _cloud(cloud, n, seed=0):
  """A bench cloud's voxel centres (``scenes.CLOUDS``: compact, outdoor, spread, indoor)."""
  import numpy as np
  from jax_sparseconv import scenes
  return np.asarray(scenes.CLOUDS[cloud](n, VS, seed), np.float32)


def _arrays(rows, c, dtype, seed=0):
  """Random features (rows, c), weights (27, c, c) and cotangent (rows, c)."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((rows, c)), dtype)
  w = jnp.asarray(rng.standard_normal((27, c, c)) / np.sqrt(27 * c), dtype)
  ct = jnp.asarray(rng.standard_normal((rows, c)), dtype)
  return x, w, ct


@functools.lru_cache(maxsize=None)
def _builder(backend):
  """The jit-compiled K=3 kernel-map build, traced under ``backend`` (one per backend, so
  that clouds of one size share a compilation)."""
  import jax
  import jax_sparseconv as sc
  f = jax.jit(lambda p: sc.build_kernel_map(p, p, VS, 3))

  def build(pos):
    with sc.kernel_backend(backend):
      return f(pos)
  return build


def _build(pos, backend):
  return _builder(backend)(pos)


@functools.lru_cache(maxsize=None)
def _fwd_bwd(backend, dtype):
  """jit-compiled forward and backward of one conv with a given map, lowered under
  ``backend``."""
  import jax
  from jax_sparseconv._src import gather_matmul as gm

  def conv(x, w, maps):  # the backend is a static argument: it holds whenever traced
    return gm.gather_matmul(x, w, *maps, dtype, backend_name=backend)

  fwd = jax.jit(conv)
  bwd = jax.jit(lambda x, w, ct, maps: jax.vjp(lambda x, w: conv(x, w, maps), x, w)[1](ct))
  return fwd, bwd


def _maps(km):
  return (km.neighbors, km.inverse, km.out_unique)


def _rel(a, b):
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def step_probe(smoke):
  import jax
  import jax_sparseconv as sc
  from jax_sparseconv._src import backend, cuda_support, ffi
  _jax_setup(smoke)
  _row(what="kernel_builds", **sc.kernel_builds())
  _row(what="jax", backend=jax.default_backend(), devices=len(jax.local_devices()),
       processes=jax.process_count())
  mod = ffi.cuda
  if mod is None:
    _row(what="cuda build", error=ffi.load_errors.get("_cuda_kernels", "not built"))
    return
  driver, runtime = mod.cuda_driver_version(), mod.cuda_runtime_version()
  _row(what="cuda build", archs=mod.cuda_architectures, runtime=runtime, driver=driver,
       needs=cuda_support.min_driver_version(runtime))
  for d in backend._cuda_devices():
    cc = getattr(d, "compute_capability", None)
    ordinal = getattr(d, "local_hardware_id", None)
    error, binary, ptx = mod.cuda_probe(int(d.id if ordinal is None else ordinal))
    ok, reason = cuda_support.cuda_usable(cc, driver, mod.cuda_architectures,
                                          runtime_version=runtime, probe_error=error)
    _row(what=f"GPU {d.id}", kind=d.device_kind, cc=cc, probe=error or "ok", binary=binary,
         ptx=ptx, usable=ok, reason=reason)


def step_cmdbuf(smoke):
  """bf16 and f32 chains of three convs, forward and backward in one jit (many custom calls
  next to fusions: command buffers capture them), against the jnp backend."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jax_sparseconv as sc
  from jax_sparseconv._src import gather_matmul as gm
  kernels, n = _jax_setup(smoke)
  n = min(n, 20_000)
  pos = _cloud("compact", n)
  km = _build(pos, kernels)
  maps = _maps(km)
  rng = np.random.default_rng(1)
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jnp.asarray(rng.standard_normal((km.num_in, 32)), dtype)
    ws = [jnp.asarray(rng.standard_normal((27, 32, 32)) / np.sqrt(27 * 32), dtype)
          for _ in range(3)]

    def chain(x, ws, maps, dtype=dtype):
      for w in ws:
        x = jax.nn.relu(gm.gather_matmul(x, w, *maps, dtype))
      return jnp.sum(x.astype(jnp.float32) ** 2)

    out = {}
    for b in (kernels, "jnp"):
      with sc.kernel_backend(b):
        f = jax.jit(jax.value_and_grad(chain, argnums=(0, 1)))
        hlo = f.lower(x, ws, maps).compile().as_text() or ""
        v, (gx, gw) = f(x, ws, maps)
        v2, (gx2, _) = f(x, ws, maps)
        out[b] = (v, gx, gw)
        if b == kernels:
          _row(what=f"chain {jnp.dtype(dtype).name}", command_buffer="command_buffer" in hlo,
               custom_calls=hlo.count("custom_call_target=\"jsc_"),
               repeat_bitwise=bool(np.array_equal(np.asarray(gx), np.asarray(gx2))
                                   and float(v) == float(v2)))
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    err = max(_rel(out[kernels][0], out["jnp"][0]), _rel(out[kernels][1], out["jnp"][1]),
              max(_rel(a, b) for a, b in zip(out[kernels][2], out["jnp"][2])))
    _row(what=f"chain {jnp.dtype(dtype).name} vs jnp", rel_err=err, tol=tol, ok=err <= tol)


def step_check(smoke):
  """Forward and backward, kernels vs jnp, on the bench clouds (f32 and bf16 on the compact
  and outdoor clouds, f32 on the others); the CUDA search's maps vs the jnp search's; each
  kernel call repeated (bitwise)."""
  import jax.numpy as jnp
  import numpy as np
  kernels, n = _jax_setup(smoke)
  for cloud in BENCH_CLOUDS[:2] if smoke else BENCH_CLOUDS:
    pos = _cloud(cloud, n)
    km_k, km_j = _build(pos, kernels), _build(pos, "jnp")
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(_maps(km_k), _maps(km_j)))
    _row(what=f"search {cloud}", n=len(pos), maps_bitwise_equal=same,
         pairs=int(np.sum(np.asarray(km_k.neighbors) < km_k.num_in)))
    # Both dtypes on the compact cloud, float32 on the others (compilations are shared
    # between clouds of one size).
    dtypes = (jnp.float32, jnp.bfloat16) if cloud == "compact" else (jnp.float32,)
    for dtype in dtypes:
      x, w, ct = _arrays(len(pos), CHANNELS, dtype)
      maps = _maps(km_j)
      (fk, bk), (fj, bj) = _fwd_bwd(kernels, dtype), _fwd_bwd("jnp", dtype)
      y_k, y_j = fk(x, w, maps), fj(x, w, maps)
      (gx_k, gw_k), (gx_j, gw_j) = bk(x, w, ct, maps), bj(x, w, ct, maps)
      y_k2 = fk(x, w, maps)
      gx_k2, gw_k2 = bk(x, w, ct, maps)
      tol = 1e-5 if dtype == jnp.float32 else 2e-2
      errs = {"fwd": _rel(y_k, y_j), "dx": _rel(gx_k, gx_j), "dw": _rel(gw_k, gw_j)}
      bitwise = all(np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in ((y_k, y_k2), (gx_k, gx_k2), (gw_k, gw_k2)))
      _row(what=f"conv {cloud} {jnp.dtype(dtype).name}", **errs, tol=tol,
           ok=max(errs.values()) <= tol, repeat_bitwise=bitwise)


def step_timings(smoke):
  """Milliseconds (median of 10 after a warm-up) at 100k voxels, C = 64: the kernel-map
  build, forward and backward, kernels vs jnp, float32 (full precision) and bfloat16; and
  the dense matmul rate and copy bandwidth measured here."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  kernels, n = _jax_setup(smoke)
  reps = 3 if smoke else 10
  dense = 512 if smoke else 8192
  rates = {}
  for dt in (jnp.float32, jnp.bfloat16):
    a = jax.random.normal(jax.random.key(0), (dense, dense), dt)
    f = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32))
    rates[jnp.dtype(dt).name] = 2 * dense**3 / (_median_ms(f, a, repeats=reps) * 1e-3)
  size = 2**22 if smoke else 2**28
  v = jax.random.normal(jax.random.key(1), (size,), jnp.float32)
  bw = 8 * size / (_median_ms(jax.jit(lambda v: v * 1.0001), v, repeats=reps) * 1e-3)
  _row(what="roofline", f32_tflops=rates["float32"] / 1e12,
       bf16_tflops=rates["bfloat16"] / 1e12, copy_gbs=bw / 1e9)
  pos = _cloud("compact", n)
  search = {}
  for b in (kernels, "jnp"):
    search[b] = _median_ms(_builder(b), pos, repeats=reps)
  _row(what="kernel map build (search + inverse)", n=len(pos), kernels_ms=search[kernels],
       jnp_ms=search["jnp"], speedup=search["jnp"] / search[kernels])
  km = _build(pos, kernels)
  maps = _maps(km)
  pairs = int(np.sum(np.asarray(km.neighbors) < km.num_in))
  for dtype in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dtype).name
    x, w, ct = _arrays(len(pos), CHANNELS, dtype)
    ms = {}
    for b in (kernels, "jnp"):
      fwd, bwd = _fwd_bwd(b, dtype)
      ms[b] = (_median_ms(fwd, x, w, maps, repeats=reps),
               _median_ms(bwd, x, w, ct, maps, repeats=reps))
    flops = 2.0 * pairs * CHANNELS * CHANNELS
    item = jnp.dtype(dtype).itemsize
    nbytes = 2 * len(pos) * CHANNELS * item + 27 * CHANNELS**2 * item + km.neighbors.size * 4
    bound_ms = 1e3 * max(flops / rates[name], nbytes / bw)
    _row(what=f"conv {name}", n=len(pos), c=CHANNELS, pairs=pairs, fwd_ms=ms[kernels][0],
         bwd_ms=ms[kernels][1], jnp_fwd_ms=ms["jnp"][0], jnp_bwd_ms=ms["jnp"][1],
         fwd_tflops=flops / ms[kernels][0] / 1e9, fwd_over_roofline=ms[kernels][0] / bound_ms,
         fwd_speedup=ms["jnp"][0] / ms[kernels][0], bwd_speedup=ms["jnp"][1] / ms[kernels][1])


def _profile_calls(smoke):
  """The calls ncu and the trace see: the search once, then forward + backward per dtype."""
  import jax
  import jax.numpy as jnp
  kernels, n = _jax_setup(smoke)
  pos = _cloud("compact", n)
  km = jax.block_until_ready(_build(pos, kernels))
  maps = _maps(km)
  calls = []
  for dtype in (jnp.float32, jnp.bfloat16):
    x, w, ct = _arrays(len(pos), CHANNELS, dtype)
    fwd, bwd = _fwd_bwd(kernels, dtype)
    calls.append(lambda fwd=fwd, bwd=bwd, x=x, w=w, ct=ct: jax.block_until_ready(
        (fwd(x, w, maps), bwd(x, w, ct, maps))))
  return calls


def step_profile_case(smoke):
  for call in _profile_calls(smoke):
    call()
  _row(what="profiled", ok=True)


def step_trace(smoke, out):
  import jax
  pathlib.Path(out).mkdir(parents=True, exist_ok=True)
  calls = _profile_calls(smoke)
  for call in calls:  # compiled before the trace
    call()
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(3):
        for call in calls:
          call()
    with tarfile.open(pathlib.Path(out) / "trace.tar.gz", "w:gz") as tar:
      tar.add(d, arcname="trace")
    files = [str(p.relative_to(d)) for p in pathlib.Path(d).rglob("*") if p.is_file()]
  _row(what="trace", files=len(files), archive="trace.tar.gz")


STEPS = {"probe": step_probe, "cmdbuf": step_cmdbuf, "check": step_check,
         "timings": step_timings, "profile-case": step_profile_case}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
  ap.add_argument("--dry-run", action="store_true",
                  help="print the plan and check it against the budget; run nothing")
  ap.add_argument("--smoke", action="store_true",
                  help="the JAX steps on the CPU (host build), small clouds: a script check")
  ap.add_argument("--resume-at", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.step == "trace":
    step_trace(args.smoke, args.out)
    return 0
  if args.step:
    STEPS[args.step](args.smoke)
    return 0
  if args.dry_run:
    steps = plan(pathlib.Path(args.out), args.smoke)
    for s in steps:
      env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.env)
      print(f"{s.name:10s} {s.timeout:4d} s  {s.what}\n           {env} "
            f"{' '.join(shlex.quote(a) for a in s.argv)}")
    total = plan_total(steps)
    fits = total + RESERVE_S <= BUDGET_S and len(RESULT_FILES) <= 8
    print(f"total {total} s + {RESERVE_S} s reserve of a {BUDGET_S} s budget: "
          f"{'fits' if fits else 'DOES NOT FIT'}; result files: {', '.join(RESULT_FILES)}")
    return 0 if fits else 1
  return drive(args)


if __name__ == "__main__":
  sys.exit(main())
