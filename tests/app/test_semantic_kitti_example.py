"""``examples/semantic_kitti.py`` end to end on a tiny generated SemanticKITTI folder: it
trains, checkpoints, resumes bit-identically (3 straight steps equal 2 + a resumed 1),
reports the per-class IoU and the mIoU, plots, and evaluates a checkpoint (``--eval``).

The runs are subprocesses sharing a persistent compilation cache, so only the first one
compiles (MinkowskiEngine's MinkUNet14A here: it compiles faster than the default SPVNAS
net, the rest of the script is the same)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "semantic_kitti.py"
TINY = ["--model", "minkunet14a", "--train-scans", "2", "--val-scans", "1", "--az-steps", "128",
        "--range", "10", "--width", "0.125", "--voxel-size", "0.4", "--batch-size", "2",
        "--eval-every", "0", "--ckpt-every", "1", "--log-every", "1"]


def run(args, cache):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  return p.stdout


def miou(out):
  m = re.findall(r"^mIoU (\d+\.\d+)$", out, re.M)
  assert m, out
  return float(m[-1])


def arrays(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files if k.startswith("state")}


def test_trains_resumes_reports_and_evaluates(tmp_path):
  cache, full, part = tmp_path / "cache", tmp_path / "full", tmp_path / "part"
  out = run(["--workdir", str(full), "--steps", "3", "--keep-checkpoints", "--no-plot", *TINY],
            cache)
  assert "writing a synthetic SemanticKITTI set" in out and "3/3" in out
  for name in ("car", "road", "building", "mIoU (19)", "mIoU (present)"):
    assert re.search(rf"^  {re.escape(name)} +\d+\.\d+", out, re.M), (name, out)
  full_miou = miou(out)
  assert 0.0 <= full_miou <= 100.0
  straight = arrays(full / "checkpoint_000003.npz")
  assert any(not np.array_equal(v, arrays(full / "checkpoint_000002.npz")[k])
             for k, v in straight.items())  # it trained

  # a run stopped after step 2, resumed to 3: the same parameters, statistics, optimiser
  part.mkdir()
  shutil.copy(full / "checkpoint_000002.npz", part / "checkpoint.npz")
  out = run(["--workdir", str(part), "--steps", "3", *TINY], cache)
  assert "resumed from step 2" in out and "3/3" in out and "1/3" not in out
  resumed = arrays(part / "checkpoint.npz")
  assert set(straight) == set(resumed)
  for k in straight:
    np.testing.assert_allclose(resumed[k], straight[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert abs(miou(out) - full_miou) < 0.01
  metrics = json.loads((part / "metrics.json").read_text())
  assert [s for s, _ in metrics["history"]["loss"]] == [1, 2, 3]
  assert abs(100 * metrics["final"]["miou"] - full_miou) < 0.01
  assert len(metrics["final"]["iou"]) == 19
  assert (part / "training.png").stat().st_size > 0

  out = run(["--eval", str(full / "checkpoint.npz")], cache)
  assert "evaluating" in out and "step 3" in out and "writing a synthetic" not in out
  assert abs(miou(out) - full_miou) < 0.01
