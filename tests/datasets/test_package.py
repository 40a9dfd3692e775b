"""The package's front: every name of ``__all__`` is there, no module imports jax at
import time, and the usage example of the package docstring runs as written."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from jax_sparseconv import datasets

_STALE = ("jax_sparseconv.datasets was imported as a namespace package: the editable "
          "install predates datasets/__init__.py (re-run the editable install)")


def test_package_is_a_regular_package():
  assert getattr(datasets, "__file__", None), _STALE


def test_public_names():
  assert getattr(datasets, "__file__", None), _STALE
  assert set(datasets.__all__) <= set(dir(datasets))
  for name in ("SemanticKITTI", "PointceptScanNet", "Pipeline", "PipelineState",
               "voxel_example", "point_example", "voxelize", "pad_batch", "pack_batch",
               "augment", "crop", "read_ply", "write_ply", "read_label", "write_label",
               "read_velodyne", "read_nuscenes_lidar", "read_scene", "grain_dataset"):
    assert name in datasets.__all__, name
  assert datasets.semantic_kitti.CLASS_NAMES[0] == "car"


def test_modules_do_not_use_jax():
  """The readers and transforms never import jax themselves: with ``jax_sparseconv``'s
  ``__init__`` skipped (as a loader process could), they load without it."""
  code = (
      "import importlib.abc, importlib.util, sys, types, pathlib\n"
      "class NoJax(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('jax', 'jaxlib', 'grain'):\n"
      "      raise ImportError('blocked: ' + name)\n"
      "sys.meta_path.insert(0, NoJax())\n"
      f"root = pathlib.Path({str(datasets.__path__[0])!r}).parent\n"
      "pkg = types.ModuleType('jax_sparseconv'); pkg.__path__ = [str(root)]\n"
      "sys.modules['jax_sparseconv'] = pkg\n"
      "for sub in ('scenes', 'datasets'):\n"
      "  spec = importlib.util.spec_from_file_location('jax_sparseconv.' + sub,\n"
      "      root / sub / '__init__.py', submodule_search_locations=[str(root / sub)])\n"
      "  m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m\n"
      "  setattr(pkg, sub, m); spec.loader.exec_module(m)\n"
      "D = sys.modules['jax_sparseconv.datasets']\n"
      "import tempfile\n"
      "d = tempfile.mkdtemp()\n"
      "D.synthetic.write_semantic_kitti(d, {'00': 2}, az_steps=128)\n"
      "p = D.Pipeline(D.SemanticKITTI(d), lambda c, r: D.voxel_example(c, r, voxel_size=0.5),\n"
      "               batch_size=2, capacity=20000)\n"
      "print(int(p[0]['count'][0]) > 0, any(m.split('.')[0] == 'jax' for m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["True", "False"]


def test_docstring_usage_runs(tmp_path):
  assert getattr(datasets, "__file__", None), _STALE
  block = re.search(r"Usage \(.*?\)::\n\n(.*?)\n\n(?=\S)", datasets.__doc__, re.S).group(1)
  code = "\n".join(line[2:] for line in block.splitlines())
  code = code.replace('"/tmp/skitti"', repr(str(tmp_path)))
  code = re.sub(r"(?m)^( +)\.\.\.$", r"\1seen.append(batch)\n\1break", code)
  assert "break" in code and str(tmp_path) in code
  env = {"restored_step": 3, "seen": []}
  exec(compile(code, "datasets-docstring", "exec"), env)
  batch = env["seen"][0]
  assert int(batch["step"]) == 3 and batch["positions"].shape == (2, 40_000, 3)
  assert batch["feats"].shape == (2, 40_000, 1) and batch["valid"].shape == (2, 40_000)
  assert np.all(batch["overflow"] == 0) and int(batch["epoch"]) == 1
  val = env["val"]
  assert len(val) == 2 and val[0]["positions"].shape == (1, 40_000, 3)
