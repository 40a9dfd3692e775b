"""Self-test for users' machines: ``python -m jax_sparseconv.selftest``.

Checks this installation on the local hardware: every kernel backend
(:func:`jax_sparseconv.set_kernel_backend`) on every local platform (the CPU, and the
GPU when present, so the CUDA build is checked on the user's own card), against

* the **Open3D golden cases** shipped in ``jax_sparseconv/data/golden`` (computed by
  Open3D 0.20 itself; ``--golden-dir`` adds a directory of more, e.g. a source
  checkout's ``tests/data/golden``): outputs and gradients;
* the slow **references** of :mod:`jax_sparseconv.reference` on random clouds: a NumPy
  loop in float64 for the outputs and the dense-grid conv in float64 for the gradients
  (features, kernel, bias and importance), for a submanifold K=3 conv, a K=2 strided
  conv, and their transposes; a bfloat16 forward;
* ``jax.test_util.check_grads`` in float64 (forward and reverse mode; ``--grad-order 2``
  adds second derivatives);
* the other backends: every backend's outputs and gradients against the ``jnp`` one.

It prints a pass/fail table and exits with status 1 when a check fails (2 for a
command-line error). It takes well under a minute on a small CPU.

Backends per platform: on the CPU ``jnp``, ``auto`` (the native CPU kernels for float32)
and ``host`` (the CUDA kernels' source compiled for the CPU) when the compiled build is
installed; on a GPU ``jnp`` and ``auto`` (the CUDA kernels when the package was built
with nvcc; ``host`` is the same there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.resources
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import jax_sparseconv as sc
from jax_sparseconv import reference
from jax_sparseconv._src import ffi
from jax_sparseconv._src.backend import BACKENDS

__all__ = ["main", "golden_cases", "Result"]

TOL_F32 = 1e-4     # float32 against float64 references and Open3D's float32 results
TOL_BF16 = 2e-2    # bfloat16 outputs (8-bit mantissa), against the rounded inputs' result
TOL_BACKENDS = 1e-4


def f32_tolerance(platform: str, backend_description: str) -> float:
  """The float32 tolerance of a platform and backend: TOL_F32 everywhere. The jnp path's
  matmuls ask for ``Precision.HIGHEST`` (full float32, never TF32, on any GPU) and the
  self-test runs under ``jax.default_matmul_precision("highest")`` besides, so a GPU gets
  no looser bound (a TF32 slip shows as a failure, not as noise)."""
  del platform, backend_description
  return TOL_F32


@dataclasses.dataclass
class Result:
  """One row of the table."""
  platform: str
  backend: str
  check: str
  error: float | None   # max relative error (None: a check without a number)
  tol: float | None
  status: str          # PASS, FAIL (a check failed), ERROR (an exception)
  message: str = ""
  detail: str = ""     # the traceback of an exception

  @property
  def ok(self) -> bool:
    return self.status == "PASS"


def rel_err(a, b) -> float:
  """``max |a - b| / max |b|`` (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float("inf")
  return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30))


def tree_rel_err(a, b) -> float:
  """The largest :func:`rel_err` over matching leaves of two pytrees."""
  errs = jax.tree_util.tree_map(rel_err, a, b)
  return max(jax.tree_util.tree_leaves(errs), default=0.0)


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # older jax
  return enable_x64()


# ------------------------------------------------------------------ golden cases


def golden_cases(extra_dir: str | pathlib.Path | None = None) -> dict[str, pathlib.Path]:
  """``{name: path}`` of the Open3D golden ``.npz`` files: the package's, then those of
  ``extra_dir`` (same names replaced)."""
  cases = {}
  packaged = importlib.resources.files("jax_sparseconv") / "data" / "golden"
  if packaged.is_dir():
    for entry in packaged.iterdir():
      if entry.name.endswith(".npz"):
        cases[entry.name[:-4]] = pathlib.Path(str(entry))
  if extra_dir is not None:
    for path in sorted(pathlib.Path(extra_dir).glob("*.npz")):
      cases[path.stem] = path
  return dict(sorted(cases.items()))


def _golden_fn(d):
  transpose = bool(d["transpose"])
  fn = sc.sparse_conv_transpose if transpose else sc.sparse_conv
  imp_name = "out_importance" if transpose else "inp_importance"
  offset = None if "offset" not in d else tuple(float(v) for v in d["offset"])
  in_pos, out_pos, vs = d["inp_positions"], d["out_positions"], float(d["voxel_size"])
  normalize = bool(d["normalize"])

  def run(params, feats, imp, ct):
    def f(p, x):
      return fn(p, x, in_pos, out_pos, vs, offset=offset, normalize=normalize,
                **{imp_name: imp})
    out, vjp = jax.vjp(f, params, feats)
    g_params, g_feats = vjp(ct)
    return out, g_params, g_feats
  return jax.jit(run)


def check_golden(path: pathlib.Path) -> float:
  d = dict(np.load(path))
  params = {"kernel": d["kernel"].astype(np.float32)}
  if "bias" in d:
    params["bias"] = d["bias"].astype(np.float32)
  imp = d.get("out_importance" if d["transpose"] else "inp_importance")
  out, g_params, g_feats = _golden_fn(d)(params, d["inp_features"], imp, d["grad_out"])
  errs = [rel_err(out, d["expect_out_features"]),
          rel_err(g_feats, d["expect_grad_inp_features"]),
          rel_err(g_params["kernel"], d["expect_grad_kernel"])]
  if "bias" in params:
    errs.append(rel_err(g_params["bias"], d["expect_grad_bias"]))
  return max(errs)


# ------------------------------------------------------------------ random cases


@dataclasses.dataclass
class Case:
  """A random conv problem with its references (computed once, in float64, on the CPU)."""
  name: str
  transpose: bool
  kernel_size: int
  in_pos: np.ndarray
  out_pos: np.ndarray
  vs: float
  normalize: bool
  params: dict
  feats: np.ndarray
  imp: np.ndarray
  ct: np.ndarray
  expect_out: np.ndarray | None = None
  expect_grads: tuple | None = None

  @property
  def fn(self):
    return sc.sparse_conv_transpose if self.transpose else sc.sparse_conv

  @property
  def imp_name(self):
    return "out_importance" if self.transpose else "inp_importance"


def _grid_points(rng, n, extent, vs):
  """``n`` distinct voxel centres of an ``extent**3`` grid."""
  flat = rng.choice(extent**3, size=min(n, extent**3), replace=False)
  idx = np.stack(np.unravel_index(flat, (extent,) * 3), axis=1)
  return ((idx + 0.5) * vs).astype(np.float32)


def make_cases(seed: int) -> list[Case]:
  """Four random problems on a 90-voxel cloud and its coarse level, with references."""
  rng = np.random.default_rng(seed)
  vs = 0.25
  fine = _grid_points(rng, 90, 6, vs)
  # the coarse level of a K=2 strided conv: each occupied 2-block's first voxel
  blocks = np.unique(np.floor(fine / vs).astype(np.int64) // 2, axis=0)
  coarse = ((2 * blocks + 0.5) * vs).astype(np.float32)
  cin, cout = 4, 5
  cases = []
  for name, transpose, k, pin, pout, normalize in [
      ("conv K=3 (normalize, importance)", False, 3, fine, fine, True),
      ("conv K=2 strided", False, 2, fine, coarse, False),
      ("transpose K=3 (normalize, importance)", True, 3, fine, fine, True),
      ("transpose K=2 up-sampling", True, 2, coarse, fine, False)]:
    params = {"kernel": rng.standard_normal((k, k, k, cin, cout)).astype(np.float32),
              "bias": rng.standard_normal(cout).astype(np.float32)}
    imp_len = len(pout) if transpose else len(pin)
    cases.append(Case(
        name, transpose, k, pin, pout, vs, normalize, params,
        rng.standard_normal((len(pin), cin)).astype(np.float32),
        rng.uniform(0.5, 1.5, imp_len).astype(np.float32),
        rng.standard_normal((len(pout), cout)).astype(np.float32)))
  cpu = local_platforms().get("cpu")
  with (jax.default_device(cpu) if cpu else contextlib.nullcontext()), _x64():
    for c in cases:
      c.expect_out = reference.loop_sparse_conv(
          c.params["kernel"], c.params["bias"], c.feats, c.in_pos, c.out_pos, vs,
          normalize=c.normalize, importance=c.imp, transpose=c.transpose)

      def dense(p, x, i, c=c):
        return reference.dense_sparse_conv(p["kernel"], p["bias"], x, c.in_pos, c.out_pos, vs,
                                           normalize=c.normalize, importance=i,
                                           transpose=c.transpose)
      args64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                      (c.params, c.feats, c.imp))
      def value_and_vjp(args, ct, dense=dense):
        out, vjp = jax.vjp(dense, *args)
        return out, vjp(ct)
      out, grads = jax.jit(value_and_vjp)(args64, jnp.asarray(c.ct, jnp.float64))
      c.expect_grads = jax.tree_util.tree_map(np.asarray, grads)
      assert rel_err(out, c.expect_out) < 1e-9, "the two references disagree"
  return cases


def _run_case(c: Case, dtype=jnp.float32):
  """Outputs and gradients (params, feats, importance) of the library, one jitted call;
  the kernel map is built inside (so the search runs on the backend under test)."""
  def run(params, feats, imp, ct):
    def f(p, x, i):
      return c.fn(p, x, c.in_pos, c.out_pos, c.vs, normalize=c.normalize,
                  **{c.imp_name: i})
    out, vjp = jax.vjp(f, params, feats, imp)
    return out, vjp(ct)
  args = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), (c.params, c.feats, c.imp, c.ct))
  return jax.tree_util.tree_map(np.asarray, jax.jit(run)(*args))


def check_bf16(c: Case) -> float:
  """bfloat16 features and kernel (float32 accumulation): against the float64 result of
  the rounded inputs."""
  p16 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), c.params)
  x16, i16 = jnp.asarray(c.feats, jnp.bfloat16), jnp.asarray(c.imp, jnp.bfloat16)
  y = jax.jit(lambda p, x, i: c.fn(p, x, c.in_pos, c.out_pos, c.vs, normalize=c.normalize,
                                   **{c.imp_name: i}))(p16, x16, i16)
  assert y.dtype == jnp.bfloat16, y.dtype
  p64, x64, i64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), (p16, x16, i16))
  expect = reference.loop_sparse_conv(p64["kernel"], p64["bias"], x64, c.in_pos, c.out_pos,
                                      c.vs, normalize=c.normalize, importance=i64,
                                      transpose=c.transpose)
  return rel_err(np.asarray(y, np.float32), expect)


def check_grads_f64(conv: Case, transpose: Case, n: int = 24, order: int = 1) -> None:
  """``jax.test_util.check_grads`` in float64, forward and reverse mode, of a
  conv followed by a transposed conv (submanifold, with normalisation and importance) on
  the first ``n`` points of ``conv``, with respect to every differentiable argument (both
  layers' parameters, the features and both importance arrays)."""
  from jax.test_util import check_grads
  pos, vs, k = conv.in_pos[:n], conv.vs, conv.kernel_size
  cin, cout = conv.params["kernel"].shape[3:]
  with _x64():
    km = sc.build_kernel_map(pos, pos, vs, k)
    km_t = sc.build_kernel_map(pos, pos, vs, k, transpose=True)

    def f(p1, p2, x, i1, i2):
      y = sc.sparse_conv(p1, x, pos, pos, vs, normalize=True, inp_importance=i1, kernel_map=km)
      return sc.sparse_conv_transpose(p2, y, pos, pos, vs, normalize=True, out_importance=i2,
                                      kernel_map=km_t)
    # the transposed layer maps Cout -> Cin: the second case's kernel, channel axes swapped
    p2 = {"kernel": np.swapaxes(transpose.params["kernel"], 3, 4)[..., :cout, :cin],
          "bias": transpose.params["bias"][:cin]}
    args = (conv.params, p2, conv.feats[:n], conv.imp[:n], transpose.imp[:n])
    args = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), args)
    f = jax.jit(f)
    assert f(*args).dtype == jnp.float64
    check_grads(f, args, order=order, modes=("fwd", "rev"), eps=1e-4, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ platforms, backends


def local_platforms() -> dict[str, jax.Device]:
  """``{name: first device}`` of the CPU and each accelerator platform present."""
  found = {}
  for name in ("cpu", "gpu", "tpu"):
    try:
      found[name] = jax.devices(name)[0]
    except RuntimeError:
      pass
  default = jax.devices()[0]
  if default.platform not in found and not any(d == default for d in found.values()):
    found[default.platform] = default
  return found


def _is_cuda(device) -> bool:
  try:
    return device in jax.devices("cuda")
  except RuntimeError:
    return False


def backends_for(platform: str, device) -> dict[str, str]:
  """``{backend: what runs}`` for one platform (see the module docstring)."""
  builds = sc.kernel_builds()
  if platform == "cpu":
    out = {"jnp": "jnp everywhere"}
    if builds["host"]:
      out["auto"] = "native CPU kernels (float32; jnp for other dtypes)"
      out["host"] = "the CUDA kernels' source compiled for the CPU"
    else:
      out["auto"] = "jnp (no compiled build installed)"
    return out
  out = {"jnp": "jnp everywhere"}
  if _is_cuda(device) and builds["cuda"] and builds.get("cuda_usable", True):
    out["auto"] = "CUDA kernels"
  elif _is_cuda(device) and builds["cuda"]:
    out["auto"] = f"jnp (CUDA build not usable here: {builds.get('cuda_reason', '?')})"
  else:
    out["auto"] = ("jnp (no CUDA build: reinstall with nvcc)" if _is_cuda(device) else
                   "jnp (no kernels for this platform)")
  return out


@contextlib.contextmanager
def _backend(name: str):
  previous = sc.set_kernel_backend(name)
  try:
    yield
  finally:
    sc.set_kernel_backend(previous)


# ------------------------------------------------------------------ the run


def _attempt(results, platform, backend, check, tol, fn: Callable[[], float | None]):
  try:
    err = fn()
  except Exception as e:  # noqa: BLE001 - every failure becomes a row
    line = (str(e).strip().splitlines() or [""])[0]
    status = "FAIL" if isinstance(e, AssertionError) else "ERROR"
    results.append(Result(platform, backend, check, None, tol, status,
                          f"{type(e).__name__}: {line[:300]}", traceback.format_exc()))
    return None
  ok = err is None or bool(np.isfinite(err) and err <= tol)
  results.append(Result(platform, backend, check, err, tol, "PASS" if ok else "FAIL",
                        "" if ok else f"max relative error {err:.3g} > {tol:g}"))
  return err


def run_selftest(platforms: Sequence[str] | None = None, backends: Sequence[str] | None = None,
                 golden_dir=None, seed: int = 0, grad_order: int = 1,
                 log=print) -> list[Result]:
  """Runs every check; returns the rows of the table (see :func:`main`).
  ``grad_order=0`` skips ``check_grads``."""
  results: list[Result] = []
  found = local_platforms()
  unknown = set(platforms or ()) - set(found)
  if unknown:
    raise ValueError(f"platform(s) {sorted(unknown)} not present; local: {sorted(found)}")
  cases = make_cases(seed)
  goldens = golden_cases(golden_dir)
  if not goldens:
    log("(no golden cases found: the package data is missing; random checks only)")
  jax.clear_caches()  # nothing compiled before this run is reused
  with jax.default_matmul_precision("highest"):  # full float32 (no TF32) everywhere
    _run_platforms(results, found, platforms, backends, cases, goldens, grad_order, log)
  return results


def _run_platforms(results, found, platforms, backends, cases, goldens, grad_order, log):
  """The checks of :func:`run_selftest`, appended to ``results``."""
  for platform, device in found.items():
    if platforms and platform not in platforms:
      continue
    available = backends_for(platform, device)
    for b, what in available.items():
      if not backends or b in backends:
        log(f"  {platform}/{b}: {what}")
    per_backend, tols = {}, {}
    with jax.default_device(device):
      for b in available:
        if backends and b not in backends:
          continue
        with _backend(b):
          tol = f32_tolerance(platform, available[b])
          tols[b] = tol
          for name, path in goldens.items():
            _attempt(results, platform, b, f"Open3D golden {name}", tol,
                     lambda path=path: check_golden(path))
          outs = {}
          for c in cases:
            def one(c=c):
              out, grads = _run_case(c)
              outs[c.name] = (out, grads)
              return max(rel_err(out, c.expect_out), tree_rel_err(grads, c.expect_grads))
            _attempt(results, platform, b, f"{c.name}: out+grads vs reference", tol, one)
          per_backend[b] = outs
          _attempt(results, platform, b, f"bfloat16 {cases[0].name}", TOL_BF16,
                   lambda: check_bf16(cases[0]))
          if grad_order:
            _attempt(results, platform, b,
                     f"check_grads float64 fwd+rev order {grad_order}: conv -> transpose K=3",
                     None, lambda: check_grads_f64(cases[0], cases[2], order=grad_order))
      base = per_backend.get("jnp")
      for b, outs in per_backend.items():
        if b == "jnp" or base is None:
          continue
        def agree(outs=outs):
          common = [k for k in outs if k in base]
          assert common, "no case ran on both backends"
          return max(tree_rel_err(outs[k], base[k]) for k in common)
        _attempt(results, platform, b, "out+grads agree with the jnp backend",
                 max(TOL_BACKENDS, tols[b], tols["jnp"]), agree)


def format_table(results: Sequence[Result]) -> str:
  head = ("platform", "backend", "check", "max rel err", "tol", "result")
  rows = [(r.platform, r.backend, r.check, "-" if r.error is None else f"{r.error:.2e}",
           "-" if r.tol is None else f"{r.tol:.0e}", r.status) for r in results]
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

  def line(cols):
    return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)).rstrip()
  out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
  return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0: every check passed)."""
  parser = argparse.ArgumentParser(
      prog="python -m jax_sparseconv.selftest",
      description="Checks jax_sparseconv on this machine: every kernel backend on every "
                  "local platform, against Open3D's results and the slow references.")
  parser.add_argument("--platforms", help="comma-separated subset of the local platforms "
                      "(cpu, gpu); default: all")
  parser.add_argument("--backends", help="comma-separated subset of jnp, auto, host; "
                      "default: all available")
  parser.add_argument("--golden-dir", help="a directory of more Open3D golden .npz files "
                      "(e.g. tests/data/golden of a source checkout)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random clouds")
  parser.add_argument("--grad-order", type=int, default=1, choices=(0, 1, 2),
                      help="order of jax.test_util.check_grads in float64 (0 skips it; "
                      "2 also checks second derivatives, a few times slower); default 1")
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="print the traceback of each check that raised")
  args = parser.parse_args(argv)

  def split(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else None
  backends = split(args.backends)
  if backends and set(backends) - set(BACKENDS):
    parser.error(f"--backends: choose from {BACKENDS}")

  builds = sc.kernel_builds()
  print(f"jax_sparseconv {sc.__version__} self-test: jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}; "
        f"compiled builds: host={'yes' if builds['host'] else 'no'}, "
        f"cuda={'yes' if builds['cuda'] else 'no'}"
        + (f" (FFI API 0.{min(ffi.xla_ffi_api_minor().values())})"
           if ffi.xla_ffi_api_minor() else ""))
  print("devices: " + ", ".join(f"{d.platform}:{d.device_kind}" for d in
                                local_platforms().values()))
  start = time.perf_counter()
  try:
    results = run_selftest(split(args.platforms), backends, args.golden_dir, args.seed,
                           grad_order=args.grad_order)
  except ValueError as e:
    parser.error(str(e))
  print()
  print(format_table(results))
  failed = [r for r in results if not r.ok]
  for r in failed:
    print(f"\n{r.status} {r.platform}/{r.backend} {r.check}: {r.message}")
    if args.verbose and r.detail:
      print(r.detail.rstrip())
  print(f"\n{len(results) - len(failed)} of {len(results)} checks passed "
        f"({time.perf_counter() - start:.0f} s): {'FAILED' if failed else 'OK'}")
  return 1 if failed or not results else 0


if __name__ == "__main__":
  sys.exit(main())
