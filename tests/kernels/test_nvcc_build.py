"""The CUDA sources through nvcc itself (skipped without nvcc): ptxas reports no register
spills for any kernel at the launch bounds chosen in ffi/conv_cuda.cu and ffi/search_cuda.cu
(one architecture, sm_90, to keep it short; the install builds them all)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

FFI = pathlib.Path(__file__).resolve().parents[2] / "ffi"
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if pathlib.Path(p).exists()), None)


@pytest.mark.skipif(NVCC is None, reason="no nvcc")
@pytest.mark.parametrize("source", ["conv_cuda.cu", "search_cuda.cu"])
def test_kernels_do_not_spill(tmp_path, source):
  import jax
  r = subprocess.run([NVCC, "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90",
                      "-Xptxas", "-v", f"-I{FFI}", "-isystem", jax.ffi.include_dir(), "-c",
                      str(FFI / source), "-o", str(tmp_path / "k.o")],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "warning" not in r.stderr.lower(), r.stderr[-3000:]
  kernels = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
  spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
  assert kernels and len(spills) == len(kernels)
  bad = [k for k, s in zip(kernels, spills) if int(s)]
  assert not bad, bad
