"""``python -m jax_sparseconv.selftest``: the table and exit status, the packaged golden
cases, and that a wrong kernel (planted) or a raising check makes it fail."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax_sparseconv as sc
from jax_sparseconv import selftest
from jax_sparseconv._src import ffi

from tests.helpers import GOLDEN_DIR


def rows(out):
  """``{(platform, backend, check): status}`` from the printed table."""
  table = {}
  for line in out.splitlines():
    m = re.match(r"^(\w+)\s{2,}(\w+)\s{2,}(.+?)\s{2,}(\S+)\s{2,}(\S+)\s{2,}(PASS|FAIL|ERROR)$",
                 line)
    if m:
      table[m.group(1), m.group(2), m.group(3)] = m.group(6)
  return table


def test_packaged_golden_cases_are_the_open3d_files():
  cases = selftest.golden_cases()
  assert set(cases) == {"subm_k3", "down_k2", "transpose_k3_norm_imp"}
  for name, path in cases.items():
    assert path.read_bytes() == (GOLDEN_DIR / f"{name}.npz").read_bytes()
  assert len(selftest.golden_cases(GOLDEN_DIR)) == 13  # --golden-dir adds a checkout's


def test_selftest_passes(capsys):
  previous = (sc.get_kernel_backend(), sc.get_error_mode())
  assert selftest.main([]) == 0
  assert (sc.get_kernel_backend(), sc.get_error_mode()) == previous  # restored
  out = capsys.readouterr().out
  table = rows(out)
  backends = {"jnp", "auto", "host"} if sc.kernel_builds()["host"] else {"jnp", "auto"}
  assert {b for (p, b, _) in table if p == "cpu"} == backends
  for b in backends:
    for check in ("Open3D golden subm_k3", "Open3D golden down_k2",
                  "Open3D golden transpose_k3_norm_imp",
                  "conv K=2 strided: out+grads vs reference",
                  "transpose K=2 up-sampling: out+grads vs reference",
                  "check_grads float64 fwd+rev order 1: conv -> transpose K=3"):
      assert table["cpu", b, check] == "PASS"
  assert table["cpu", "auto", "out+grads agree with the jnp backend"] == "PASS"
  assert set(table.values()) == {"PASS"}
  assert re.search(r"^(\d+) of \1 checks passed \(\d+ s\): OK$", out, re.M)


@pytest.mark.skipif(not sc.kernel_builds()["host"], reason="needs the native CPU kernels")
def test_planted_wrong_kernel_and_raising_check_fail(capsys, monkeypatch):
  real = ffi.cpu_gather_matmul
  # the native CPU conv kernel ("auto" on the CPU) 1% off
  monkeypatch.setattr(ffi, "cpu_gather_matmul", lambda x, w, nbr: real(x, w, nbr) * 1.01)

  def raising(case):
    raise RuntimeError("planted")
  monkeypatch.setattr(selftest, "check_bf16", raising)

  assert selftest.main(["--platforms", "cpu", "--backends", "jnp,auto", "--grad-order",
                        "0"]) == 1
  out = capsys.readouterr().out
  table = rows(out)
  jnp_rows = {k: v for k, v in table.items() if k[1] == "jnp"}
  auto_rows = {k: v for k, v in table.items() if k[1] == "auto"}
  assert jnp_rows and auto_rows
  bf16 = "bfloat16 conv K=3 (normalize, importance)"
  assert table["cpu", "jnp", bf16] == table["cpu", "auto", bf16] == "ERROR"
  assert all(v == "PASS" for k, v in jnp_rows.items() if k[2] != bf16)
  # every float32 forward through the planted kernel fails, and so does the comparison
  assert table["cpu", "auto", "Open3D golden subm_k3"] == "FAIL"
  assert table["cpu", "auto", "conv K=3 (normalize, importance): out+grads vs reference"] == \
      "FAIL"
  assert table["cpu", "auto", "out+grads agree with the jnp backend"] == "FAIL"
  assert "RuntimeError: planted" in out and "max relative error" in out
  assert re.search(r"checks passed \(\d+ s\): FAILED$", out, re.M)


def test_bad_arguments():
  with pytest.raises(SystemExit) as e:
    selftest.main(["--backends", "cuda"])
  assert e.value.code == 2
  with pytest.raises(SystemExit):
    selftest.main(["--platforms", "no_such_platform"])


def test_rel_err():
  assert selftest.rel_err(np.ones(3), np.ones(3)) == 0.0
  assert selftest.rel_err(np.ones(3), np.ones(4)) == float("inf")
  assert np.isclose(selftest.rel_err([1.0, 2.02], [1.0, 2.0]), 0.01)
