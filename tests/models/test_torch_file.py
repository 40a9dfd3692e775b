"""The torch-free ``torch.save`` reader (:mod:`jax_sparseconv.models.torch_file`) on files
written by real torch 2.13 (``tests/data/torch_files/make_files.py``): zip and legacy
formats, every dtype, views, the model zoos' checkpoint layouts, refusing code, truncation.
"""

import io
import os
import pathlib
import pickle
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

from jax_sparseconv.models import (load_open3d_ml_checkpoint, load_torch_checkpoint,
                                   read_torch_file, strip_prefixes)
from tests.helpers import DATA_DIR

DATA = DATA_DIR / "torch_files"
EXPECTED = np.load(DATA / "expected.npz")
CASES = ["dtypes", "views", "openpcdet", "pointcept", "spvnas", "open3d_ml"]
STEMS = [f"{c}_{f}" for c in CASES for f in ("zip", "legacy")] + ["dtypes_big_zip"]
PWNED = pathlib.Path("/tmp/jax_sparseconv_torch_file_pwned")  # what the evil files create


def expected(stem):
  """``{path: array}`` of one file, as make_files.py stored it (bfloat16 from its bits)."""
  out = {}
  for k in EXPECTED.files:
    if k.startswith(stem + "/"):
      a = EXPECTED[k]
      if k.endswith("::bfloat16"):
        k, a = k[:-len("::bfloat16")], a.view(ml_dtypes.bfloat16)
      out[k[len(stem) + 1:]] = a
  return out


def arrays(obj, prefix=""):
  """Every array in ``obj`` by its container path, like make_files.py's ``collect``."""
  if isinstance(obj, np.ndarray):
    return {prefix: obj}
  items = obj.items() if isinstance(obj, dict) else (
      enumerate(obj) if isinstance(obj, (list, tuple)) else ())
  out = {}
  for k, v in items:
    out.update(arrays(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def assert_bits_equal(got, want):
  assert list(got) == list(want)
  for k, a in want.items():
    assert type(got[k]) is np.ndarray, k
    assert got[k].dtype == a.dtype and got[k].shape == a.shape, (k, got[k].dtype, a.dtype)
    assert got[k].tobytes() == a.tobytes(), k


def legacy_bytes(obj):
  """A legacy-format torch.save file of a tensor-free ``obj`` (what torch writes for it)."""
  buf = io.BytesIO()
  for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                              "type_sizes": {"short": 2, "int": 4, "long": 4}},
               obj, []):
    pickle.dump(part, buf, protocol=2)
  return buf.getvalue()


@pytest.mark.parametrize("stem", STEMS)
def test_every_tensor_bit_for_bit(stem):
  raw = read_torch_file(DATA / f"{stem}.pth")
  got = arrays(raw)
  if stem.startswith("pointcept"):  # a NumPy array, not a tensor
    np.testing.assert_array_equal(got.pop("class_iou"), [0.5, 0.75, 1.0])
  assert_bits_equal(got, expected(stem))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_dtypes_file_is_a_bare_state_dict(fmt):
  raw = read_torch_file(DATA / f"dtypes_{fmt}.pth")
  assert type(raw) is OrderedDict
  want = {"f32_4d": ("float32", (2, 3, 2, 2)), "f64_1d": ("float64", (5,)),
          "f16_5d": ("float16", (2, 1, 2, 3, 2)), "bf16_1d": ("bfloat16", (7,)),
          "bf16_0d": ("bfloat16", ()), "i64_0d": ("int64", ()), "i32_4d": ("int32", (1, 2, 3, 2)),
          "i16_1d": ("int16", (4,)), "i8_5d": ("int8", (1, 2, 1, 2, 3)), "u8_1d": ("uint8", (4,)),
          "bool_4d": ("bool", (2, 1, 3, 2)), "f32_0d": ("float32", ()),
          "u16_1d": ("uint16", (4,)), "f32_empty": ("float32", (0, 3))}
  if fmt == "legacy":
    del want["u16_1d"]
  assert {k: (str(v.dtype), v.shape) for k, v in raw.items()} == want
  assert raw["bf16_0d"] == -3.25 and raw["i64_0d"] == 12345678901234
  assert raw["u8_1d"].tolist() == [0, 1, 128, 255] and np.isinf(raw["f32_0d"])
  assert_bits_equal(load_torch_checkpoint(DATA / f"dtypes_{fmt}.pth"), dict(raw))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_views_and_shared_storages(fmt):
  raw = read_torch_file(DATA / f"views_{fmt}.pth")
  base = np.arange(40, dtype=np.float64)
  np.testing.assert_array_equal(raw["transposed"],
                                np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1))
  np.testing.assert_array_equal(raw["shared_a"], base[3:13].reshape(2, 5))
  np.testing.assert_array_equal(raw["shared_b"], base[10:30].reshape(4, 5)[:, 1:4])
  np.testing.assert_array_equal(raw["expanded"], np.tile([1.0, 2.0, 3.0], (4, 1)))
  np.testing.assert_array_equal(raw["negative"], [-1.0, 2.0, -3.5])
  for a in raw.values():  # copies, each owning its data
    assert a.flags.c_contiguous and a.flags.writeable and a.base is None
  raw["shared_a"][0, 0] = 99  # sharing a storage in the file, not in memory
  assert raw["shared_b"].min() == 11
  if fmt == "zip":  # the two views really share one storage record
    with zipfile.ZipFile(DATA / "views_zip.pth") as zf:
      assert sum("/data/" in n for n in zf.namelist()) == len(raw) - 1


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_openpcdet_checkpoint(fmt):
  path = DATA / f"openpcdet_{fmt}.pth"
  if fmt == "legacy":
    assert not zipfile.is_zipfile(path)
  raw = read_torch_file(path)
  assert list(raw) == ["epoch", "it", "model_state", "optimizer_state", "version"]
  assert raw["epoch"] == 80 and raw["it"] == 37120 and raw["version"] == "pcdet+0.6.0+8caccce"
  model_state = raw["model_state"]
  assert type(model_state) is OrderedDict
  assert model_state._metadata[""] == {"version": 1}  # the OrderedDict's attribute
  opt = raw["optimizer_state"]
  group = opt["param_groups"][0]
  assert group["params"] == [0, 1, 2, 3, 4] and group["betas"] == (0.9, 0.99)
  assert group["lr"] == 0.01 and group["foreach"] is None and group["amsgrad"] is False
  assert list(opt["state"]) == [0, 1, 2, 3, 4]
  assert set(opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
  sd = load_torch_checkpoint(path)
  assert type(sd) is dict and not hasattr(sd, "_metadata") and "_metadata" not in sd
  assert_bits_equal(sd, {k[len("model_state/"):]: v for k, v in expected(f"openpcdet_{fmt}").items()
                        if k.startswith("model_state/")})
  assert sd["1.num_batches_tracked"].dtype == np.int64 and sd["1.num_batches_tracked"].shape == ()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pointcept_checkpoint_and_prefixes(fmt):
  path = DATA / f"pointcept_{fmt}.pth"
  raw = read_torch_file(path)
  assert raw["epoch"] == 100 and raw["scaler"] is None
  assert type(raw["best_metric_value"]) is np.float64 and raw["best_metric_value"] == 0.7321
  assert type(raw["best_metric"]) is float and raw["best_metric"] == 0.7321
  sd = load_torch_checkpoint(path)
  assert all(k.startswith(("module.backbone.", "module.seg_head.")) for k in sd)
  ref = load_torch_checkpoint(DATA / f"openpcdet_{fmt}.pth")  # the same weights
  stripped = strip_prefixes(sd, ("module.", "backbone."))
  assert list(stripped) == [k if not k.startswith("3.") else "seg_head." + k[2:] for k in ref]
  for k, v in ref.items():
    assert stripped[k if not k.startswith("3.") else "seg_head." + k[2:]].tobytes() == v.tobytes()
  assert list(strip_prefixes(sd))[0] == "backbone.0.weight"  # default: only "module."
  assert_bits_equal(load_torch_checkpoint(path, key="state_dict"), sd)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_spvnas_and_open3d_ml_nesting(fmt):
  ref = load_torch_checkpoint(DATA / f"openpcdet_{fmt}.pth")
  assert_bits_equal(load_torch_checkpoint(DATA / f"spvnas_{fmt}.pth"), ref)
  assert_bits_equal(load_torch_checkpoint(DATA / f"open3d_ml_{fmt}.pth"), ref)
  assert_bits_equal(load_open3d_ml_checkpoint(DATA / f"open3d_ml_{fmt}.pth"), ref)
  with open(DATA / f"spvnas_{fmt}.pth", "rb") as f:  # a file object works too
    assert_bits_equal(load_torch_checkpoint(f), ref)


def test_no_state_dict_errors():
  f = io.BytesIO(legacy_bytes({"epoch": 1, "weights": {"a": 1}}))
  with pytest.raises(ValueError, match=r"no state dict.*'epoch': int, 'weights': dict"):
    load_torch_checkpoint(f)
  with pytest.raises(ValueError, match=r"no entry 'model'.*'epoch': int"):
    load_torch_checkpoint(DATA / "openpcdet_legacy.pth", key="model")
  with pytest.raises(ValueError, match="no state dict"):
    load_torch_checkpoint(DATA / "pointcept_zip.pth", key="optimizer")
  assert read_torch_file(io.BytesIO(legacy_bytes([1, "a", None, {2.5}]))) == [1, "a", None, {2.5}]


def test_strip_prefixes():
  sd = {"module.backbone.x": 1, "backbone.y": 2, "neck.backbone.z": 3, "module.head.w": 4}
  assert strip_prefixes(sd, ("module.", "backbone.")) == {"x": 1, "y": 2, "neck.backbone.z": 3,
                                                          "head.w": 4}
  assert strip_prefixes(sd) == {"backbone.x": 1, "backbone.y": 2, "neck.backbone.z": 3,
                                "head.w": 4}
  with pytest.raises(ValueError, match="collide"):
    strip_prefixes({"module.a": 1, "a": 2})


@pytest.mark.parametrize("fname,name", [("evil_zip.pth", "posix.system"),
                                        ("evil_legacy.pth", "builtins.eval"),
                                        ("whole_model_legacy.pth",
                                         "torch.nn.modules.linear.Linear")])
def test_malicious_and_unsupported_pickles_are_refused(fname, name):
  PWNED.unlink(missing_ok=True)
  for load in (read_torch_file, load_torch_checkpoint, load_open3d_ml_checkpoint):
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {name}"):
      load(DATA / fname)
  assert not PWNED.exists()


@pytest.mark.parametrize("stem", ["openpcdet_legacy", "dtypes_zip", "views_legacy"])
def test_truncated_files(stem):
  data = (DATA / f"{stem}.pth").read_bytes()
  for cut in list(range(40, len(data), 37)) + [len(data) - 1]:
    with pytest.raises(ValueError, match="truncated|corrupt"):
      read_torch_file(io.BytesIO(data[:cut]))
  with pytest.raises(ValueError, match="zip"):
    read_torch_file(io.BytesIO(b"not a torch file at all"))


def test_byteorder_record_is_honoured():
  data = (DATA / "dtypes_zip.pth").read_bytes()

  def with_byteorder(order):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
      for info in zin.infolist():
        zout.writestr(info, order if info.filename.endswith("/byteorder") else zin.read(info))
    out.seek(0)
    return out

  little, swapped = read_torch_file(with_byteorder("little")), read_torch_file(with_byteorder("big"))
  for k, a in little.items():
    assert swapped[k].tobytes() == a.byteswap().tobytes(), k
  with pytest.raises(ValueError, match="byteorder"):
    read_torch_file(with_byteorder("middle"))


@pytest.mark.parametrize("fname", ["small_checkpoint.pth", "small_state_dict.pth"])
def test_open3d_ml_unet_checkpoints_unchanged(fname):
  d = np.load(DATA_DIR / "unet" / "small_checkpoint.npz")
  want = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
  sd = load_open3d_ml_checkpoint(DATA_DIR / "unet" / fname)
  assert_bits_equal(sd, want)
  assert_bits_equal(load_torch_checkpoint(DATA_DIR / "unet" / fname), want)
  raw = read_torch_file(os.fspath(DATA_DIR / "unet" / fname))
  assert type(raw) is (dict if fname == "small_checkpoint.pth" else OrderedDict)
