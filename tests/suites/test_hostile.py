"""Hostile inputs (issue 12): every case of ``hostile_cases.CASES`` outside ``jit``, under
``jit`` in error mode "raise", and (value errors) under ``jit`` in mode "flag"; and the
README's "Hostile inputs" table is the one rendered from that list.

Every case runs in this process: none may crash it (the native kernels included).
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

import jax_sparseconv as sc

from tests.suites.hostile_cases import CASES, Invalid, Raises

ROOT = pathlib.Path(__file__).resolve().parents[2]
def _flag_cases():
  """Flag mode, once per (function group, error bit): the other cases of that pair differ
  only in how the input is broken, which the raise-mode run covers (mode switches and
  compilations dominate this module's time)."""
  seen, cases = set(), []
  for c in CASES:
    if isinstance(c.under_jit, Invalid) and c.flag:
      key = (c.group, c.under_jit.code)
      if key not in seen:
        seen.add(key)
        cases.append(c)
  return cases


FLAG_CASES = _flag_cases()


@pytest.fixture(scope="module", autouse=True)
def _restore_error_mode():
  previous = sc.get_error_mode()
  yield
  sc.set_error_mode(previous)


def _mode(mode):
  if sc.get_error_mode() != mode:  # switching clears JAX's caches: only when needed
    sc.set_error_mode(mode)


def _np(out):
  return jax.tree_util.tree_map(np.asarray, out)


def _check_raises(expect: Raises, run):
  with pytest.raises(expect.exc) as info:
    run()
  assert expect.match in str(info.value), f"{str(info.value)!r} lacks {expect.match!r}"


def _check_eager_invalid(expect: Invalid, run):
  with pytest.raises(ValueError) as info:
    run()
  assert expect.message in str(info.value), f"{str(info.value)!r} lacks {expect.message!r}"
  if expect.code is not None:
    assert isinstance(info.value, sc.InvalidInputError), type(info.value)
    assert info.value.code & expect.code, info.value.code


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_eager(case):
  _mode("raise")
  fn, args = case.make()
  expect = case.eager
  if isinstance(expect, Raises):
    _check_raises(expect, lambda: fn(*args))
  elif isinstance(expect, Invalid):
    _check_eager_invalid(expect, lambda: fn(*args))
  else:
    out = _np(fn(*args))
    if expect.check is not None:
      expect.check(out)


@pytest.mark.parametrize("case", [c for c in CASES if c.jit_run], ids=lambda c: c.id)
def test_jit_raise_mode(case):
  _mode("raise")
  if case.xfail_jit:
    pytest.xfail(case.xfail_jit)
  fn, args = case.make()
  expect = case.under_jit
  jitted = getattr(fn, "jitted", None) or jax.jit(fn)
  run = lambda: jax.block_until_ready(jitted(*args))  # noqa: E731
  if isinstance(expect, Raises):
    _check_raises(expect, run)
  elif isinstance(expect, Invalid):
    with pytest.raises(Exception) as info:
      run()
    assert isinstance(info.value, jax.errors.JaxRuntimeError), type(info.value)
    assert expect.message in str(info.value), f"{str(info.value)!r} lacks {expect.message!r}"
  else:
    out = _np(run())
    if expect.check is not None:
      expect.check(out)


def _poison_report(out, code):
  """What flag mode must leave: every kernel map of the result flagged (with ``code`` when
  the result is the map itself); without maps, every floating result NaN."""
  maps = [x for x in jax.tree_util.tree_leaves(out, is_leaf=lambda x: isinstance(x, sc.KernelMap))
          if isinstance(x, sc.KernelMap)]
  problems, checked = [], 0
  for km in maps:
    checked += 1
    if int(np.bitwise_or.reduce(np.asarray(km.flags).ravel())) == 0:
      problems.append("a kernel map without flags")
  if isinstance(out, sc.KernelMap) and code is not None and not int(out.flags) & code:
    problems.append(f"flags {int(out.flags)} lack {code!r}")
  if maps:  # a SparseTensor's own arrays are its inputs: its maps carry the error
    return problems
  for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
    if path and getattr(path[-1], "name", None) == "voxel_size":
      continue
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and a.size:
      checked += 1
      if not np.all(np.isnan(a)):
        problems.append(f"{jax.tree_util.keystr(path)} not all NaN")
  if not checked:
    problems.append("nothing carries the error")
  return problems


@pytest.mark.parametrize("case", FLAG_CASES, ids=lambda c: c.id)
def test_jit_flag_mode(case):
  _mode("flag")
  fn, args = case.make()
  out = (getattr(fn, "jitted", None) or jax.jit(fn))(*args)
  problems = _poison_report(_np(out), case.under_jit.code)
  assert not problems, problems


def test_every_category_and_group_is_known():
  from tests.suites.hostile_cases import CATEGORIES, GROUPS, by_id
  by_id()
  for c in CASES:
    assert c.group in GROUPS and c.category in CATEGORIES, c.id
  assert {c.group for c in CASES} == set(GROUPS)
  assert {c.category for c in CASES} == set(CATEGORIES)


def test_readme_table_is_generated_from_the_cases():
  spec = importlib.util.spec_from_file_location(
      "hostile_table", ROOT / "tests" / "scripts" / "hostile_table.py")
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  readme = (ROOT / "README.md").read_text()
  section = readme.split("### Hostile inputs\n", 1)[1].split("\n### ", 1)[0]
  assert table.render() in section, "rerun: python tests/scripts/hostile_table.py --write"
