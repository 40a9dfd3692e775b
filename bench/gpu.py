"""GPU benchmark of the CUDA kernels: ``python3 bench/gpu.py`` (one command).

Steps, in order (most can be skipped), everything they print saved under ``--out``
(default ``$OUT`` or ``.``):

1. ``nvidia-smi`` (``nvidia-smi.txt``);
2. install this checkout without network access (``pip install --no-build-isolation
   --no-deps -e .`` with ``JSC_CUDA=ON``: the CUDA kernels must build);
3. the driver / compute-capability check of ``jax_sparseconv._src.cuda_support`` on every
   GPU (``cuda_check.txt``): driver and runtime versions, built architectures, each GPU's
   compute capability and probe launch; where the kernels cannot run, the reason, and no
   timings (they would compare jnp with jnp);
4. ``compute-sanitizer`` with racecheck, synccheck, initcheck and memcheck on a small
   subset of the kernel tests, only the library's kernels instrumented
   (``sanitizer_<tool>.txt``);
5. the test suite, whose conv modules run through both the jnp path and the CUDA kernels;
6. timings (``gpu_results.md``), for surface voxel clouds of N = 100k and 1M
   (K = 3 submanifold, ~15 neighbours per voxel), C = 32 / 64 / 128 (Cin = Cout), float32
   and bfloat16:

* forward ``y = sum_s x[nbr[:, s]] @ W[s]`` with a reused kernel map, and backward
  (feature gradient through the inverse map + kernel gradient), in milliseconds;
* useful TFLOP/s (2 * pairs * Cin * Cout per product; backward does two) and the bytes
  that must move (features in and out, kernel, map) in GB/s;
* the roofline bound ``max(flops / matmul rate, bytes / copy bandwidth)`` from a dense
  matmul and a device copy measured in the same run, and the kernel's time over it;
* the jnp path on the same device, and the ratio;

7. an Nsight Compute (``ncu --set full``) profile of the gather-matmul and kernel-gradient
   kernels at N = 1M, C = 64, float32 and bfloat16, forward and backward
   (``ncu_conv_n1m_c64.ncu-rep`` and its per-kernel summary ``ncu_summary.txt``).

Medians over ``--repeats`` after a warm-up; timing synchronises with
``block_until_ready``. Without a GPU, steps 1, 3, 4 and 7 say so and are skipped, and
``--sizes 2000 --skip-install --skip-tests`` runs the rest through the host build of the
kernels (a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def install():
  import jaxlib
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
         "-e", str(ROOT), "-C", "cmake.define.JSC_CUDA=ON"]
  if tuple(int(v) for v in jaxlib.__version__.split(".")[:3]) > (0, 11, 2):
    # Headers of this jaxlib only (no network for 0.11.2's): fine for use on this machine.
    cmd += ["-C", "cmake.define.JSC_ALLOW_NEWER_FFI=ON"]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def save(out, name, text):
  path = pathlib.Path(out) / name
  path.write_text(text)
  return path


def run_logged(cmd, out, name, timeout, env=None):
  """Runs cmd, echoing it; stdout + stderr saved to out/name. Returns (rc, text)."""
  print("+", " ".join(map(str, cmd)), flush=True)
  try:
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    rc, text = r.returncode, r.stdout + r.stderr
  except subprocess.TimeoutExpired as e:
    rc = -1
    text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
            else (e.stdout or "")) + f"\n[timed out after {timeout} s]\n"
  save(out, name, " ".join(map(str, cmd)) + "\n\n" + text)
  return rc, text


def nvidia_smi(out):
  """Step 1: the GPU, driver and clocks, as nvidia-smi reports them."""
  if shutil.which("nvidia-smi") is None:
    print("nvidia-smi: not found (no NVIDIA driver here): skipped", flush=True)
    return ["nvidia-smi: not found"]
  rc, text = run_logged(["nvidia-smi"], out, "nvidia-smi.txt", 60)
  print(text, flush=True)
  q = ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm",
       "--format=csv,noheader"]
  rc2, line = run_logged(q, out, "nvidia-smi-query.txt", 60)
  return [f"nvidia-smi: {line.strip() if rc2 == 0 else 'query failed'}"]


def cuda_check(out):
  """Step 3: can the CUDA kernels run on this machine's GPUs, and why (not)."""
  import jax_sparseconv as sc
  from jax_sparseconv._src import backend, cuda_support, ffi
  lines = [f"kernel_builds(): {sc.kernel_builds()}"]
  mod = ffi.cuda
  if mod is not None:
    driver, runtime = mod.cuda_driver_version(), mod.cuda_runtime_version()
    lines.append(f"_cuda_kernels: built for {mod.cuda_architectures} "
                 f"({cuda_support.parse_architectures(mod.cuda_architectures).describe()}); "
                 f"static CUDA runtime {runtime}; driver supports CUDA {driver} "
                 f"(needs >= {cuda_support.MIN_DRIVER_VERSION}, "
                 f"driver branch R{cuda_support.MIN_DRIVER_BRANCH}+)")
    for d in backend._cuda_devices():
      cc = getattr(d, "compute_capability", None)
      ordinal = getattr(d, "local_hardware_id", None)
      error, binary, ptx = mod.cuda_probe(int(d.id if ordinal is None else ordinal))
      ok, reason = cuda_support.cuda_usable(cc, driver, mod.cuda_architectures,
                                            runtime_version=runtime, probe_error=error)
      lines.append(f"GPU {d.id} {d.device_kind}: compute capability {cc}; probe: "
                   f"{error or 'ok'} (binaryVersion {binary}, ptxVersion {ptx}); "
                   f"usable: {ok} ({reason})")
  text = "\n".join(lines)
  print(text, flush=True)
  save(out, "cuda_check.txt", text + "\n")
  return lines, bool(sc.kernel_builds()["cuda_usable"])


# Step 4: a small subset of the kernel tests (CUDA kernels on tile edges, float32 and the
# tensor-core path, several neighbour blocks), each tool instrumenting only the library's
# kernels (their names contain "jsc").
SANITIZER_TESTS = [
    "tests/test_kernels.py", "tests/test_host_shim.py", "-k",
    "(matches_loop and kernels- and (tiles or small) and (float32 or bfloat16)) or "
    "(several_neighbour_blocks and 70 and (float32 or bfloat16))"]
SANITIZER_TOOLS = ("racecheck", "synccheck", "initcheck", "memcheck")


def sanitize(out, timeout):
  tool_bin = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
  if not os.path.exists(tool_bin):
    print("compute-sanitizer: not found: skipped", flush=True)
    return ["compute-sanitizer: not found"], True
  # XLA's allocator hands out pieces of one pool; the platform allocator gives every buffer
  # its own cudaMalloc, so memcheck sees each buffer's bounds.
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
         "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
  lines, clean = [], True
  for tool in SANITIZER_TOOLS:
    cmd = [tool_bin, "--tool", tool, "--target-processes", "all", "--kernel-name", "kns=jsc",
           "--error-exitcode", "99", "--print-limit", "50",
           sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SANITIZER_TESTS]
    rc, text = run_logged(cmd, out, f"sanitizer_{tool}.txt", timeout)
    summary = [ln for ln in text.splitlines() if "ERROR SUMMARY" in ln or " passed" in ln]
    ok = rc == 0
    clean &= ok
    lines.append(f"compute-sanitizer {tool}: {'clean' if ok else f'FAILED (exit {rc})'}; "
                 + "; ".join(s.strip() for s in summary[-2:]))
    print(lines[-1], flush=True)
  return lines, clean


def profile_case():
  """What ncu profiles (step 7): N = 1M, C = 64, float32 and bfloat16, forward and backward
  once each (the first launches: no warm-up, so ncu's launch count covers them)."""
  import jax_sparseconv as sc
  from jax_sparseconv import scenes
  from jax_sparseconv._src import gather_matmul as gm
  sc.set_kernel_backend("auto")
  pos = scenes.surface_voxels(1_000_000, 0.05, 0)
  km = sc.build_kernel_map(pos, pos, 0.05, 3)
  maps = (km.neighbors, km.inverse, km.out_unique)
  rng = np.random.default_rng(0)
  c = 64
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((km.num_in, c)), dtype)
    w = jnp.asarray(rng.standard_normal((km.neighbors.shape[1], c, c)) / np.sqrt(27 * c), dtype)
    ct = jnp.asarray(rng.standard_normal((km.neighbors.shape[0], c)), dtype)

    def conv(x, w, maps, dtype=dtype):
      return gm.gather_matmul(x, w, *maps, dtype)

    fwd = jax.jit(conv).lower(x, w, maps).compile()
    bwd = jax.jit(lambda x, w, ct, maps: jax.vjp(lambda x, w: conv(x, w, maps), x, w)[1](ct)
                  ).lower(x, w, ct, maps).compile()
    jax.block_until_ready(fwd(x, w, maps))
    jax.block_until_ready(bwd(x, w, ct, maps))
    print(f"profiled {jnp.dtype(dtype).name}: N = {km.num_in}, C = {c}", flush=True)


def ncu_profile(out, timeout):
  ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
  if not os.path.exists(ncu):
    print("ncu: not found: skipped", flush=True)
    return ["ncu: not found"]
  report = pathlib.Path(out) / "ncu_conv_n1m_c64"
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  # Per dtype: forward (1 gather-matmul), backward (gather-matmul of the feature gradient,
  # kernel-gradient partial sums): 3 launches, 6 in all.
  cmd = [ncu, "--target-processes", "all", "--kernel-name-base", "function",
         "--kernel-name", "regex:gather_matmul|kernel_grad_partial", "--launch-count", "6",
         "--set", "full", "--export", report, "--force-overwrite",
         sys.executable, pathlib.Path(__file__).resolve(), "--profile-case"]
  rc, text = run_logged(cmd, out, "ncu_log.txt", timeout, env=env)
  if rc != 0:
    print(text[-3000:], flush=True)
    return [f"ncu: FAILED (exit {rc}); see ncu_log.txt"]
  rc, summary = run_logged([ncu, "--import", f"{report}.ncu-rep", "--print-summary",
                            "per-kernel"], out, "ncu_summary.txt", 600)
  run_logged([ncu, "--import", f"{report}.ncu-rep", "--page", "details", "--csv"], out,
             "ncu_details.csv", 600)
  print(summary[-6000:], flush=True)
  return [f"ncu: {report.name}.ncu-rep, ncu_summary.txt, ncu_details.csv"]


def run_tests():
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "4", str(ROOT / "tests")]
  print("+", " ".join(cmd), flush=True)
  return subprocess.run(cmd, cwd=ROOT).returncode


def rooflines(repeats):
  """Dense matmul rate (float32 and bfloat16) and device-copy bandwidth, measured."""
  from run import median_ms
  rates = {}
  n = 8192 if jax.default_backend() == "gpu" else 512
  for dt in (jnp.float32, jnp.bfloat16):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    ms = median_ms(jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32)), a,
                   repeats=repeats)
    rates[jnp.dtype(dt).name] = 2 * n**3 / (ms * 1e-3)
  size = 2**28 if jax.default_backend() == "gpu" else 2**22
  x = jax.random.normal(jax.random.key(1), (size,), jnp.float32)
  ms = median_ms(jax.jit(lambda x: x * 1.0001), x, repeats=repeats)
  return rates, 2 * 4 * size / (ms * 1e-3)


def case(n_vox, c, dtype, backend, repeats, km):
  from run import median_ms
  import jax_sparseconv as sc
  from jax_sparseconv._src import gather_matmul as gm
  sc.set_kernel_backend(backend)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((km.num_in, c)), dtype)
  w = jnp.asarray(rng.standard_normal((km.neighbors.shape[1], c, c)) / np.sqrt(27 * c), dtype)
  ct = jnp.asarray(rng.standard_normal((km.neighbors.shape[0], c)), dtype)
  maps = (km.neighbors, km.inverse, km.out_unique)  # arguments, never jit constants

  def conv(x, w, maps):
    return gm.gather_matmul(x, w, *maps, dtype)

  fwd = jax.jit(conv)

  @jax.jit
  def bwd(x, w, ct, maps):
    return jax.vjp(lambda x, w: conv(x, w, maps), x, w)[1](ct)

  y = fwd(x, w, maps)
  return (y, median_ms(fwd, x, w, maps, repeats=repeats),
          median_ms(bwd, x, w, ct, maps, repeats=repeats))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
  ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--skip-install", action="store_true")
  ap.add_argument("--skip-tests", action="store_true")
  ap.add_argument("--skip-sanitizer", action="store_true")
  ap.add_argument("--skip-ncu", action="store_true")
  ap.add_argument("--tool-timeout", type=int, default=1800,
                  help="seconds for each compute-sanitizer tool and for ncu")
  ap.add_argument("--profile-case", action="store_true",
                  help="internal: the run ncu profiles (step 7)")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args()
  if args.profile_case:
    profile_case()
    return
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  header = nvidia_smi(out)
  if not args.skip_install:
    install()

  import jax_sparseconv as sc
  from jax_sparseconv import scenes
  on_gpu = jax.default_backend() == "gpu"
  kernels_backend = "auto" if on_gpu else "host"
  builds = sc.kernel_builds()
  if on_gpu and not builds["cuda"]:
    sys.exit("no CUDA build of the kernels: install with nvcc (JSC_CUDA=ON)")
  check, usable = cuda_check(out)
  header += check
  if on_gpu and not usable:
    save(out, "gpu_results.md", "\n".join(header) + "\n")
    sys.exit(f"the CUDA kernels cannot run here ({builds['cuda_reason']}): no timings")
  sanitizer_clean = True
  if not on_gpu:
    print("no GPU: compute-sanitizer and ncu skipped", flush=True)
  elif not args.skip_sanitizer:
    lines, sanitizer_clean = sanitize(out, args.tool_timeout)
    header += lines
  if not args.skip_tests and run_tests() != 0:
    save(out, "gpu_results.md", "\n".join(header) + "\ntests failed: no timings\n")
    sys.exit("tests failed: no timings")

  device = jax.devices()[0].device_kind
  rates, bw = rooflines(max(5, args.repeats // 2))
  lines = [*header, "",
           f"device: {device} ({jax.default_backend()}); kernels: "
           f"{'CUDA' if on_gpu else 'host build (smoke test, not a measurement)'}; "
           f"jax {jax.__version__}",
           f"rooflines measured here: matmul float32 {rates['float32'] / 1e12:.1f} TFLOP/s, "
           f"bfloat16 {rates['bfloat16'] / 1e12:.1f} TFLOP/s; copy {bw / 1e9:.0f} GB/s", "",
           "| N | C | dtype | pairs | fwd ms | fwd TFLOP/s | fwd GB/s | fwd / roofline | "
           "bwd ms | bwd TFLOP/s | jnp fwd ms | jnp bwd ms | fwd speed-up | bwd speed-up |",
           "|" + "---|" * 14]
  print("\n".join(lines), flush=True)
  for n_vox in args.sizes:
    pos = scenes.surface_voxels(n_vox, 0.05, 0)
    km = sc.build_kernel_map(pos, pos, 0.05, 3)
    pairs = int(jnp.sum(km.neighbors < km.num_in))
    for c in args.channels:
      for dtype in (jnp.float32, jnp.bfloat16):
        item = jnp.dtype(dtype).itemsize
        y_k, fwd_ms, bwd_ms = case(n_vox, c, dtype, kernels_backend, args.repeats, km)
        y_j, jfwd_ms, jbwd_ms = case(n_vox, c, dtype, "jnp", args.repeats, km)
        err = float(jnp.linalg.norm((y_k - y_j).astype(jnp.float32)) /
                    jnp.linalg.norm(y_j.astype(jnp.float32)))
        if not err < (1e-5 if dtype == jnp.float32 else 2e-2):
          sys.exit(f"kernel and jnp results differ: rel. error {err:.2e}")
        flops = 2.0 * pairs * c * c
        nbytes = (km.num_in + len(pos)) * c * item + 27 * c * c * item + km.neighbors.size * 4
        bound = max(flops / rates[jnp.dtype(dtype).name], nbytes / bw)
        row = (f"| {len(pos)} | {c} | {jnp.dtype(dtype).name} | {pairs} | {fwd_ms:.3f} | "
               f"{flops / fwd_ms / 1e9:.1f} | {nbytes / fwd_ms / 1e6:.0f} | "
               f"{fwd_ms * 1e-3 / bound:.1f}x | {bwd_ms:.3f} | {2 * flops / bwd_ms / 1e9:.1f} | "
               f"{jfwd_ms:.3f} | {jbwd_ms:.3f} | {jfwd_ms / fwd_ms:.1f}x | "
               f"{jbwd_ms / bwd_ms:.1f}x |")
        lines.append(row)
        print(row, flush=True)
  sc.set_kernel_backend("auto")
  if on_gpu and not args.skip_ncu:
    lines += ["", *ncu_profile(out, args.tool_timeout)]
  path = save(out, "gpu_results.md", "\n".join(lines) + "\n")
  print(f"table written to {path}")
  if not sanitizer_clean:
    sys.exit("compute-sanitizer reported errors: see sanitizer_*.txt")


if __name__ == "__main__":
  main()
