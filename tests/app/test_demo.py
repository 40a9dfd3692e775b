"""The main demo (training): runs, writes its outputs, resumes bit-identically, and trains
data-parallel equal to one device. Small sizes; the full run is README's first command."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from jax_sparseconv import demo

SMALL = ["--scenes", "3", "--eval-scenes", "1", "--multiplier", "4", "--levels", "3",
         "--eval-every", "3", "--ckpt-every", "3"]


def _params(out: pathlib.Path, step: int):
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore((out / "checkpoints" / f"step_{step:06d}").resolve())
  return jax.tree_util.tree_leaves(restored["params"]) + jax.tree_util.tree_leaves(
      restored["batch_stats"])


def test_demo_trains_writes_plots_and_resumes_bit_identically(tmp_path, capsys):
  full, part = tmp_path / "full", tmp_path / "part"
  assert demo.main(["--out", str(full), "--steps", "6", *SMALL]) == 0
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1]
  assert last.startswith("mIoU=") and 0.0 <= float(last[5:]) <= 1.0
  assert (full / "training.png").stat().st_size > 0
  assert (full / "predictions.png").stat().st_size > 0
  # Killed after 4 steps (the Ctrl-C path saves), then resumed to 6.
  assert demo.main(["--out", str(part), "--steps", "6", "--stop-after", "4", "--no-plots",
                    *SMALL]) == 130
  assert "continue with --resume" in capsys.readouterr().out
  assert demo.main(["--out", str(part), "--steps", "6", "--resume", "--no-plots", *SMALL]) == 0
  for a, b in zip(_params(full, 6), _params(part, 6), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_data_parallel_training_equals_one_device(tmp_path):
  args = ["--steps", "2", "--batch", "2", "--no-plots", *SMALL]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for name, extra in (("one", []), ("two", ["--devices", "2"])):
    run = subprocess.run([sys.executable, "-m", "jax_sparseconv.demo", "--out",
                          str(tmp_path / name), *args, *extra], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
  for a, b in zip(_params(tmp_path / "one", 2), _params(tmp_path / "two", 2), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)
