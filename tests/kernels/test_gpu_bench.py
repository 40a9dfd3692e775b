"""bench/gpu.py, the first GPU run, without a GPU (issue 22, defects 1 and 2): its plan fits
the budget (5 minutes, every step with its own timeout, at most 8 result files), its JAX
steps run on the GPU only (``JAX_PLATFORMS=cuda``, no preallocation), it re-executes itself
after the install (defect 1: the new install is invisible to the interpreter that ran pip),
and no failing or hanging step ends the run or loses the table."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu():
  spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["bench_gpu"] = mod  # (dataclasses look their module up)
  spec.loader.exec_module(mod)
  yield mod
  sys.modules.pop("bench_gpu", None)


def test_dry_run_fits_the_budget(gpu, tmp_path):
  r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out",
                      str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "fits" in r.stdout, r.stdout + r.stderr
  assert not any(tmp_path.iterdir())  # a dry run writes nothing
  for cc in (None, "9.0"):
    steps = gpu.plan(tmp_path, cc=cc)
    assert gpu.BUDGET_S <= 300
    assert gpu.plan_total(steps) + gpu.RESERVE_S <= gpu.BUDGET_S
    assert all(0 < s.timeout <= 120 for s in steps)
  assert len(gpu.RESULT_FILES) <= 8
  assert {s.output for s in steps} - {None} <= set(gpu.RESULT_FILES)


def test_plan_has_the_required_steps(gpu, tmp_path):
  steps = {s.name: s for s in gpu.plan(tmp_path, cc="9.0")}
  order = list(steps)
  assert order.index("build") < order.index("probe") < order.index("tests")
  for name in ("env", "build", "probe", "tests", "cmdbuf", "check", "memcheck", "racecheck",
               "timings", "ncu", "trace"):
    assert name in steps, name
  for name in ("probe", "tests", "cmdbuf", "check", "memcheck", "racecheck", "timings", "ncu",
               "trace"):
    env = dict(steps[name].env)
    assert env["JAX_PLATFORMS"] == "cuda" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["JAX_DEFAULT_MATMUL_PRECISION"] == "highest"  # no TF32
  assert "-x" not in steps["tests"].argv and "-n" not in steps["tests"].argv
  assert "cmake.define.JSC_CUDA=ON" in steps["build"].argv
  assert "cmake.define.JSC_CUDA_ARCHITECTURES=90-real" in steps["build"].argv
  assert "--xla_gpu_graph_min_graph_size=1" in dict(steps["cmdbuf"].env)["XLA_FLAGS"]
  assert "memcheck" in steps["memcheck"].argv and "racecheck" in steps["racecheck"].argv
  ncu = steps["ncu"].argv
  assert ncu[ncu.index("--clock-control") + 1] == "none"
  assert "--set" not in ncu or ncu[ncu.index("--set") + 1] != "full"


class Exec(Exception):
  pass


def _fake_plan(gpu, steps):
  def plan(out, smoke=False, cc=None):
    return [gpu.Step(name, timeout, name, (sys.executable, "-c", code))
            for name, timeout, code in steps]
  return plan


def test_no_step_ends_the_run_and_the_table_is_always_written(gpu, tmp_path, monkeypatch):
  """A failing step, a hanging one (killed at its timeout, with the rows it printed), then the
  install: the driver re-executes itself (defect 1), and the resumed run goes on with the
  rest; the table lists every step."""
  row = f"print({gpu.ROW!r} + '{{\"what\": \"x\", \"v\": 1}}', flush=True)"
  steps = [("env", 5, "print('GPU, 555.1, 9.0, 80 GiB')"),
           ("failing", 5, "import sys; sys.exit(3)"),
           ("hanging", 2, row + "; import time; time.sleep(60)"),
           ("build", 5, "print('installed')"),
           ("after", 5, row)]
  monkeypatch.setattr(gpu, "plan", _fake_plan(gpu, steps))
  execs = []

  def execv(path, argv):
    execs.append(argv)
    raise Exec
  monkeypatch.setattr(gpu.os, "execv", execv)
  with pytest.raises(Exec):
    gpu.main(["--out", str(tmp_path)])
  argv = execs[0]
  assert argv[argv.index("--resume-at") + 1] == "after"
  table = (tmp_path / "gpu_results.md").read_text()
  assert "| failing | failed |" in table and "| hanging | timeout |" in table
  assert "| after | not run |" in table
  state = json.loads((tmp_path / "results.json").read_text())
  hanging = [r for r in state["records"] if r["step"] == "hanging"][0]
  assert hanging["rows"] == [{"what": "x", "v": 1}] and hanging["seconds"] < 30
  assert state["cc"] == "9.0"
  # The re-executed run (here in-process) resumes after the build.
  assert gpu.main(argv[2:]) == 0
  table = (tmp_path / "gpu_results.md").read_text()
  for name in ("env", "failing", "hanging", "build", "after"):
    assert f"| {name} | " in table and f"| {name} | not run" not in table
  assert {p.name for p in tmp_path.iterdir()} <= set(gpu.RESULT_FILES)


def test_budget_spent_skips_the_rest_but_writes_them(gpu, tmp_path, monkeypatch):
  monkeypatch.setattr(gpu, "plan", _fake_plan(gpu, [("a", 5, "pass"), ("b", 5, "pass")]))
  monkeypatch.setattr(gpu, "BUDGET_S", gpu.RESERVE_S)  # nothing left
  assert gpu.main(["--out", str(tmp_path)]) == 0
  table = (tmp_path / "gpu_results.md").read_text()
  assert "| a | no time |" in table and "| b | no time |" in table


def test_compute_capability_from_nvidia_smi(gpu):
  text = ("name, driver_version, compute_cap, memory.total [MiB]\n"
          "NVIDIA H100 80GB HBM3, 580.65.06, 9.0, 81559 MiB, 1980 MHz\n")
  assert gpu._cc_from(text) == "9.0"
  assert gpu._cc_from("nvidia-smi: command not found") is None


def test_driver_never_imports_jax(tmp_path):
  """The driver holds no GPU memory (defect 2: the parent held 75% of it, so the test
  workers ran out or fell back to the CPU): planning, the dry run and the table import no
  JAX; only the steps' own processes do."""
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('g', {str(ROOT / 'bench' / 'gpu.py')!r})\n"
          "g = importlib.util.module_from_spec(spec); sys.modules['g'] = g\n"
          "spec.loader.exec_module(g)\n"
          f"assert g.main(['--dry-run', '--out', {str(tmp_path)!r}]) == 0\n"
          "g.write_table(__import__('pathlib').Path(sys.argv[1]), [], 0.0, g.plan(__import__('pathlib').Path(sys.argv[1])))\n"
          "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'jax_sparseconv', 'numpy')]\n"
          "assert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
