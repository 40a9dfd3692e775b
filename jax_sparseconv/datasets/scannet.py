"""ScanNet v2 as Pointcept preprocesses it: a folder of ``.npy`` arrays per scene.

Layout (``root`` is Pointcept's ``data/scannet``)::

  root/train/scene0000_00/coord.npy      float32 (N, 3) metres
                          color.npy      uint8 (N, 3) RGB 0..255
                          normal.npy     float32 (N, 3) unit normals
                          segment20.npy  int (N,) ScanNet-20 class, -1 ignored
                          segment200.npy int (N,) ScanNet-200 class, -1 (optional)
                          instance.npy   int (N,) instance id, -1 none (optional)
  root/val/scene0011_00/...
  root/test/...                          (no segment / instance files)

``segment20`` indexes :data:`SCANNET20_CLASS_NAMES` (Pointcept's order: the benchmark's
NYU40 ids :data:`SCANNET20_NYU40_IDS` in increasing order); everything else is -1.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable

import numpy as np

#: The 20 ScanNet benchmark classes in Pointcept's order (its configs' ``names``; the
#: benchmark's spelling "refridgerator").
SCANNET20_CLASS_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "desk", "curtain", "refridgerator", "shower curtain",
    "toilet", "sink", "bathtub", "otherfurniture")

#: NYU40 id of each class of :data:`SCANNET20_CLASS_NAMES` (``VALID_CLASS_IDS_20``).
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

#: Label of unannotated / other points in ``segment20``, ``segment200`` and ``instance``.
IGNORE_INDEX = -1

#: Splits of the Pointcept layout (folders under ``root``).
SPLITS = ("train", "val", "test")

#: The arrays of a scene folder: required ones first, then optional ones.
REQUIRED_ASSETS = ("coord", "color", "normal")
OPTIONAL_ASSETS = ("segment20", "segment200", "instance")


def read_scene(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads one scene folder.

  Returns:
    ``dict(coord, color, normal)`` as stored (float32 ``(N, 3)``, uint8 ``(N, 3)``,
    float32 ``(N, 3)``) plus whichever of ``segment20``, ``segment200``, ``instance``
    (int ``(N,)``) the folder has, and ``name`` (the folder's name).

  Raises:
    FileNotFoundError: a required array is missing.
    ValueError: arrays of different lengths or shapes.
  """
  folder = pathlib.Path(folder)
  out = {}
  for key in REQUIRED_ASSETS + OPTIONAL_ASSETS:
    f = folder / f"{key}.npy"
    if f.is_file():
      out[key] = np.load(f)
    elif key in REQUIRED_ASSETS:
      raise FileNotFoundError(f"{f} is missing")
  n = len(out["coord"])
  for key, v in out.items():
    want = (n, 3) if key in REQUIRED_ASSETS else (n,)
    if v.shape != want:
      raise ValueError(f"{folder}: {key} has shape {v.shape}, expected {want}")
  out["name"] = folder.name
  return out


def write_scene(folder: str | os.PathLike, coord, color, normal, segment20=None, *,
                segment200=None, instance=None) -> pathlib.Path:
  """Writes one scene folder in Pointcept's layout (the dtypes its preprocessing saves).

  Args:
    folder: the scene folder (created).
    coord: ``(N, 3)`` positions, saved float32.
    color: ``(N, 3)`` RGB 0..255 (floats are rounded), saved uint8.
    normal: ``(N, 3)`` normals, saved float32.
    segment20: optional int ``(N,)`` in -1..19, saved int64.
    segment200: optional int ``(N,)`` in -1..199, saved int64.
    instance: optional int ``(N,)``, -1 for none, saved int64.

  Returns:
    The folder.
  """
  folder = pathlib.Path(folder)
  coord = np.asarray(coord, np.float32)
  n = len(coord)
  arrays = {"coord": coord, "color": np.asarray(np.round(np.asarray(color)), np.uint8)
            if np.asarray(color).dtype.kind == "f" else np.asarray(color, np.uint8),
            "normal": np.asarray(normal, np.float32)}
  for key, v, hi in (("segment20", segment20, 20), ("segment200", segment200, 200),
                     ("instance", instance, None)):
    if v is not None:
      v = np.asarray(v, np.int64)
      if v.size and (v.min() < IGNORE_INDEX or (hi is not None and v.max() >= hi)):
        raise ValueError(f"{key} values must be in -1..{hi - 1}")
      arrays[key] = v
  for key, v in arrays.items():
    want = (n, 3) if key in REQUIRED_ASSETS else (n,)
    if v.shape != want:
      raise ValueError(f"{key} has shape {v.shape}, expected {want}")
  folder.mkdir(parents=True, exist_ok=True)
  for key, v in arrays.items():
    np.save(folder / f"{key}.npy", v)
  return folder


def scene_folders(root: str | os.PathLike, split: str | Iterable[str] = "train"
                  ) -> list[pathlib.Path]:
  """The scene folders of one or several splits, sorted by split then name."""
  splits = (split,) if isinstance(split, str) else tuple(split)
  for s in splits:
    if s not in SPLITS:
      raise ValueError(f"unknown split {s!r}: one of {SPLITS}")
  return [p for s in splits for p in sorted(pathlib.Path(root, s).glob("scene*"))
          if p.is_dir()]


class PointceptScanNet:
  """Random access to the scenes of a Pointcept ScanNet layout (a data source).

  ``ds[i]`` is :func:`read_scene`'s dict plus ``label``: int32 ``(N,)`` ``segment20``
  (or ``segment200`` with ``classes=200``; all -1 where the file is absent, as in the
  test split).

  Args:
    root: Pointcept's ``data/scannet``.
    split: ``train``, ``val``, ``test`` or several of them.
    classes: 20 or 200, which segmentation becomes ``label``.
  """

  def __init__(self, root: str | os.PathLike, split: str | Iterable[str] = "train",
               classes: int = 20):
    if classes not in (20, 200):
      raise ValueError(f"classes must be 20 or 200, got {classes}")
    self.root, self.split, self.classes = pathlib.Path(root), split, classes
    self.folders = scene_folders(root, split)

  def __len__(self) -> int:
    return len(self.folders)

  def __getitem__(self, i: int) -> dict:
    scene = read_scene(self.folders[i])
    seg = scene.get(f"segment{self.classes}")
    scene["label"] = (np.full(len(scene["coord"]), IGNORE_INDEX, np.int32) if seg is None
                      else seg.astype(np.int32))
    return scene

  def __repr__(self):
    return f"PointceptScanNet({str(self.root)!r}, {self.split!r}, classes={self.classes})"
