"""Writes the torch.save test files of ``tests/models/test_torch_file.py`` with real torch.

Run from the repository root with a venv that has torch (no ml_dtypes needed):

    /work/spconv-venv/bin/python tests/data/torch_files/make_files.py

Every case is saved twice, ``<case>_zip.pth`` (``torch.save`` default) and
``<case>_legacy.pth`` (``_use_new_zipfile_serialization=False``):

* ``dtypes``: a bare state dict, every dtype the zoos save (float32/64/16, bfloat16,
  int64/32/16/8, uint8, bool, and, in the zip file only (torch cannot load it from a legacy
  one), uint16, which torch pickles with ``_rebuild_tensor_v3`` over an ``UntypedStorage``),
  0-d, 1-d, 4-d and 5-d, an empty tensor.
* ``views``: a transposed tensor, a strided slice, a stride-0 expand, two (overlapping)
  views with offsets into one storage, a negative view (``neg`` metadata), an
  ``nn.Parameter``, a tensor with a Python attribute (``_rebuild_from_type_v2``).
* ``openpcdet``: ``{'epoch', 'it', 'model_state', 'optimizer_state', 'version'}`` as
  OpenPCDet's ``checkpoint_state`` builds it (``model_state`` an ``OrderedDict`` with
  ``_metadata``; an Adam ``state_dict`` with nested dicts, lists, tuples, ints, floats,
  bools, None and tensors).
* ``pointcept``: ``{'epoch', 'state_dict', 'optimizer', 'scheduler', 'scaler',
  'best_metric_value', ...}`` with ``module.backbone.`` keys, a float, a NumPy float64
  scalar and a NumPy array.
* ``spvnas``: ``{'model': state_dict}``; ``open3d_ml``: ``{'epoch', 'model_state_dict',
  'optimizer_state_dict', 'scheduler_state_dict'}``; ``whole_model``: a pickled
  ``nn.Module`` (the reader must refuse it).

Plus ``dtypes_big_zip.pth`` (the ``dtypes`` zip with a ``big`` byteorder record and
byte-swapped storages, checked here with ``torch.load``) and ``evil_zip.pth`` /
``evil_legacy.pth``: files whose pickle calls ``os.system`` / ``builtins.eval`` through a
custom ``__reduce__`` (written with plain pickle, never loaded).

``expected.npz`` holds every tensor as ``<file stem>/<path>``, the path joining the
container keys/indices with ``/``; bfloat16 tensors are stored as their uint16 bits under
``<file stem>/<path>::bfloat16``.
"""

import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
PWNED = "/tmp/jax_sparseconv_torch_file_pwned"


def small_model():
  torch.manual_seed(0)
  return torch.nn.Sequential(
      torch.nn.Conv3d(2, 3, 2, bias=False), torch.nn.BatchNorm3d(3), torch.nn.Flatten(),
      torch.nn.Linear(3, 2))


def trained(model):
  """An Adam optimizer after two steps (its state_dict holds tensors, ints, tuples...)."""
  opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.01)
  for _ in range(2):
    opt.zero_grad()
    model(torch.ones(2, 2, 2, 2, 2)).sum().backward()
    opt.step()
  model.eval()
  return opt


def cases():
  g = torch.Generator().manual_seed(1)
  dtypes = collections.OrderedDict()
  dtypes["f32_4d"] = torch.randn(2, 3, 2, 2, generator=g)
  dtypes["f64_1d"] = torch.randn(5, generator=g, dtype=torch.float64)
  dtypes["f16_5d"] = torch.randn(2, 1, 2, 3, 2, generator=g).half()
  dtypes["bf16_1d"] = torch.randn(7, generator=g).bfloat16()
  dtypes["bf16_0d"] = torch.tensor(-3.25, dtype=torch.bfloat16)
  dtypes["i64_0d"] = torch.tensor(12345678901234, dtype=torch.int64)
  dtypes["i32_4d"] = torch.randint(-2**31, 2**31 - 1, (1, 2, 3, 2), generator=g,
                                   dtype=torch.int32)
  dtypes["i16_1d"] = torch.tensor([-32768, -1, 0, 32767], dtype=torch.int16)
  dtypes["i8_5d"] = torch.randint(-128, 127, (1, 2, 1, 2, 3), generator=g, dtype=torch.int8)
  dtypes["u8_1d"] = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
  dtypes["bool_4d"] = torch.rand(2, 1, 3, 2, generator=g) > 0.5
  dtypes["f32_0d"] = torch.tensor(float("inf"))
  dtypes["u16_1d"] = torch.tensor([0, 1, 40000, 65535], dtype=torch.uint16)
  dtypes["f32_empty"] = torch.zeros(0, 3)

  base = torch.arange(40, dtype=torch.float64)
  plain = torch.ones(2)
  plain.note = "a python attribute"
  views = {
      "transposed": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).permute(2, 0, 1),
      "sliced": torch.arange(30, dtype=torch.int32).reshape(5, 6)[1:4, ::2],
      "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),
      "shared_a": base[3:13].view(2, 5),
      "shared_b": base[10:30].view(4, 5)[:, 1:4],  # overlaps shared_a, same storage
      "negative": torch._neg_view(torch.tensor([1.0, -2.0, 3.5])),
      "parameter": torch.nn.Parameter(torch.tensor([[0.5, 1.5]])),
      "with_attribute": plain,
  }

  model = small_model()
  opt = trained(model)
  sd = model.state_dict()
  assert hasattr(sd, "_metadata")
  openpcdet = {"epoch": 80, "it": 37120, "model_state": sd, "optimizer_state": opt.state_dict(),
               "version": "pcdet+0.6.0+8caccce"}
  pointcept = {
      "epoch": 100,
      "state_dict": collections.OrderedDict(("module.backbone." + k if not k.startswith("3.")
                                             else "module.seg_head." + k[2:], v)
                                            for k, v in sd.items()),
      "optimizer": opt.state_dict(),
      "scheduler": {"last_epoch": 99, "base_lrs": [0.01], "_step_count": 100},
      "scaler": None,
      "best_metric_value": np.float64(0.7321),
      "best_metric": 0.7321,
      "class_iou": np.array([0.5, 0.75, 1.0]),
  }
  open3d_ml = {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(),
               "scheduler_state_dict": {"last_epoch": 3, "gamma": 0.99}}
  return {"dtypes": dtypes, "views": views, "openpcdet": openpcdet, "pointcept": pointcept,
          "spvnas": {"model": sd}, "open3d_ml": open3d_ml}


def np_of(t):
  t = t.detach().resolve_neg().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(np.uint16)
  if t.dtype == torch.uint16:
    return t.view(torch.int16).numpy().view(np.uint16)
  return t.numpy().copy()


def collect(obj, prefix, out):
  if isinstance(obj, torch.Tensor):
    out[prefix + ("::bfloat16" if obj.dtype == torch.bfloat16 else "")] = np_of(obj)
  elif isinstance(obj, dict):
    for k, v in obj.items():
      collect(v, f"{prefix}/{k}", out)
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      collect(v, f"{prefix}/{i}", out)


def big_endian_copy(src, dst, sd):
  """``src`` (a zip of the bare state dict ``sd``, storage ``i`` = the i-th tensor) with a
  ``big`` byteorder record and byte-swapped storages."""
  tensors = list(sd.values())
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info)
      root, _, name = info.filename.partition("/")
      if name == "byteorder":
        data = b"big"
      elif name.startswith("data/"):
        t = tensors[int(name[5:])]
        a = np_of(t)
        if t.dtype.itemsize > 1:
          a = a.byteswap()
        data = a.tobytes()
      zout.writestr(info, data)


class Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return (self.fn, (self.arg,))


def evil_files():
  # zip: the data.pkl of a state dict whose value calls os.system
  payload = pickle.dumps(collections.OrderedDict(w=Evil(os.system, f"touch {PWNED}")),
                         protocol=2)
  with zipfile.ZipFile(HERE / "evil_zip.pth", "w") as zf:
    zf.writestr("archive/data.pkl", payload)
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
  # legacy: magic, protocol, sys_info, a pickle calling eval after a plain entry, keys
  with open(HERE / "evil_legacy.pth", "wb") as f:
    for part in (0x1950A86A20F9469CFC6C, 1001,
                 {"protocol_version": 1001, "little_endian": True,
                  "type_sizes": {"short": 2, "int": 4, "long": 4}},
                 {"epoch": 1, "model_state": {
                     "x": Evil(eval, f"open({PWNED!r}, 'w').close()")}},
                 []):
      pickle.dump(part, f, protocol=2)


def main():
  expected = {}
  for name, obj in cases().items():
    for fmt in ("zip", "legacy"):
      stem = f"{name}_{fmt}"
      if stem == "dtypes_legacy":  # torch cannot load uint16 (v3) tensors from legacy files
        obj = collections.OrderedDict((k, v) for k, v in obj.items() if k != "u16_1d")
      torch.save(obj, HERE / f"{stem}.pth", _use_new_zipfile_serialization=fmt == "zip")
      back = torch.load(HERE / f"{stem}.pth", weights_only=False)
      collect(back, stem, expected)
  dtypes = cases()["dtypes"]
  big_endian_copy(HERE / "dtypes_zip.pth", HERE / "dtypes_big_zip.pth", dtypes)
  back = torch.load(HERE / "dtypes_big_zip.pth", weights_only=True)
  for k, t in dtypes.items():  # torch byteswaps typed storages (not uint16: raw bytes)
    if t.dtype != torch.uint16:
      assert torch.equal(back[k], t), k
  collect(dtypes, "dtypes_big_zip", expected)
  torch.save(torch.nn.Linear(2, 1), HERE / "whole_model_legacy.pth", _use_new_zipfile_serialization=False)
  evil_files()
  np.savez_compressed(HERE / "expected.npz", **expected)
  total = sum(p.stat().st_size for p in HERE.iterdir() if p.suffix in (".pth", ".npz"))
  print(f"{len(expected)} arrays, {total} bytes")


if __name__ == "__main__":
  main()
