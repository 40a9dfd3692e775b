"""SemanticKITTI: scans, labels, the official learning map and splits (NumPy only).

Layout (``root`` is the folder holding ``sequences``)::

  root/sequences/00/velodyne/000000.bin   float32 (P, 4): x, y, z, remission
  root/sequences/00/labels/000000.label   uint32 (P,): semantic | instance << 16
  root/sequences/00/poses.txt             3x4 row-major pose per scan (optional)
  root/sequences/00/calib.txt, times.txt  (optional)

Labels are raw ids (``LABEL_NAMES``: 10 car, 40 road, 252 moving-car, ...) in the low 16
bits and an instance id in the high 16. Training uses the 19 classes of
:data:`CLASS_NAMES` through :data:`LEARNING_MAP` (semantic-kitti.yaml's
``learning_map``): raw ids to 1..19, 0 "unlabeled" (ignored in training and in the
mIoU); moving classes (252-259) go to their static class; ids not in the map go to 0.
:data:`LEARNING_MAP_INV` goes back (``learning_map_inv``). Splits are
:data:`SPLITS` (train 00-07, 09, 10; valid 08; test 11-21, which has no labels).
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, NamedTuple

import numpy as np

from .kitti import read_velodyne, write_velodyne

#: Raw label ids and names (semantic-kitti.yaml ``labels``).
LABEL_NAMES = {
    0: "unlabeled", 1: "outlier", 10: "car", 11: "bicycle", 13: "bus", 15: "motorcycle",
    16: "on-rails", 18: "truck", 20: "other-vehicle", 30: "person", 31: "bicyclist",
    32: "motorcyclist", 40: "road", 44: "parking", 48: "sidewalk", 49: "other-ground",
    50: "building", 51: "fence", 52: "other-structure", 60: "lane-marking", 70: "vegetation",
    71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign", 99: "other-object",
    252: "moving-car", 253: "moving-bicyclist", 254: "moving-person",
    255: "moving-motorcyclist", 256: "moving-on-rails", 257: "moving-bus",
    258: "moving-truck", 259: "moving-other-vehicle",
}

#: The 19 training classes, training ids 1..19 in this order (0 is "unlabeled").
CLASS_NAMES = ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person",
               "bicyclist", "motorcyclist", "road", "parking", "sidewalk", "other-ground",
               "building", "fence", "vegetation", "trunk", "terrain", "pole", "traffic-sign")

#: Training id of "unlabeled": ignored by the loss and the metric.
IGNORE_INDEX = 0

#: Raw id -> training id (semantic-kitti.yaml ``learning_map``).
LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8,
    40: 9, 44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17,
    80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}

#: Training id -> raw id (semantic-kitti.yaml ``learning_map_inv``).
LEARNING_MAP_INV = {
    0: 0, 1: 10, 2: 11, 3: 15, 4: 18, 5: 20, 6: 30, 7: 31, 8: 32, 9: 40, 10: 44, 11: 48,
    12: 49, 13: 50, 14: 51, 15: 70, 16: 71, 17: 72, 18: 80, 19: 81,
}

#: Sequences of each split (semantic-kitti.yaml ``split``), as two-digit folder names.
SPLITS = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "valid": ("08",),
    "test": tuple(f"{i:02d}" for i in range(11, 22)),
}

_MAP_LUT = np.zeros(max(LEARNING_MAP) + 1, np.int32)
_MAP_LUT[list(LEARNING_MAP)] = list(LEARNING_MAP.values())
_INV_LUT = np.zeros(len(CLASS_NAMES) + 1, np.int32)
_INV_LUT[list(LEARNING_MAP_INV)] = list(LEARNING_MAP_INV.values())


def learning_map(raw) -> np.ndarray:
  """Raw semantic ids to training ids.

  Args:
    raw: int ``(...)`` raw ids (the low 16 bits of a ``.label`` value; a whole uint32
      label is masked to them first).

  Returns:
    int32 ``(...)`` training ids in 0..19; ids not in :data:`LEARNING_MAP` give 0.
  """
  raw = np.asarray(raw).astype(np.int64) & 0xFFFF
  known = raw < len(_MAP_LUT)
  return np.where(known, _MAP_LUT[np.where(known, raw, 0)], 0).astype(np.int32)


def learning_map_inv(train) -> np.ndarray:
  """Training ids (0..19) to raw ids (a car is 10, never 252).

  Returns:
    int32 ``(...)``; ids outside 0..19 give 0.
  """
  train = np.asarray(train).astype(np.int64)
  known = (train >= 0) & (train < len(_INV_LUT))
  return np.where(known, _INV_LUT[np.where(known, train, 0)], 0).astype(np.int32)


def to_zero_based(train) -> np.ndarray:
  """Training ids 1..19 to 0..18 (a 19-way classifier's targets), 0 "unlabeled" to -1.

  Returns:
    int32 ``(...)``: ``train - 1``; ids outside 1..19 give -1.
  """
  train = np.asarray(train).astype(np.int64)
  return np.where((train >= 1) & (train <= len(CLASS_NAMES)), train - 1, -1).astype(np.int32)


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a ``.label`` file.

  Returns:
    ``(semantic, instance)``: int32 ``(P,)`` raw semantic ids (low 16 bits) and int32
    ``(P,)`` instance ids (high 16 bits).
  """
  raw = np.fromfile(path, dtype="<u4")
  return (raw & 0xFFFF).astype(np.int32), (raw >> 16).astype(np.int32)


def write_label(path: str | os.PathLike, semantic, instance=None) -> None:
  """Writes a ``.label`` file: uint32 ``semantic | instance << 16`` per point.

  Args:
    path: the file (folders are created).
    semantic: int ``(P,)`` raw ids in 0..65535.
    instance: optional int ``(P,)`` instance ids in 0..65535 (default 0).
  """
  semantic = np.asarray(semantic).astype(np.int64)
  instance = np.zeros_like(semantic) if instance is None else np.asarray(instance).astype(np.int64)
  if semantic.shape != instance.shape or semantic.ndim != 1:
    raise ValueError(f"semantic and instance must be (P,), got {semantic.shape}, {instance.shape}")
  for name, v in (("semantic", semantic), ("instance", instance)):
    if v.size and (v.min() < 0 or v.max() > 0xFFFF):
      raise ValueError(f"{name} ids must be in 0..65535")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  (semantic | (instance << 16)).astype("<u4").tofile(path)


def read_poses(path: str | os.PathLike) -> np.ndarray:
  """Reads a KITTI ``poses.txt`` (12 numbers a line, a row-major 3x4 matrix).

  Returns:
    float64 ``(S, 4, 4)`` poses, one per scan.
  """
  m = np.loadtxt(path, dtype=np.float64, ndmin=2).reshape(-1, 3, 4)
  out = np.tile(np.eye(4), (len(m), 1, 1))
  out[:, :3] = m
  return out


def write_poses(path: str | os.PathLike, poses) -> None:
  """Writes ``(S, 4, 4)`` or ``(S, 3, 4)`` poses as a KITTI ``poses.txt``."""
  poses = np.asarray(poses, np.float64)[:, :3, :4].reshape(len(poses), 12)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  np.savetxt(path, poses, fmt="%.17g")


def split_sequences(split: str) -> tuple[str, ...]:
  """The sequences of ``split`` (``train``, ``valid`` / ``val``, ``test``)."""
  key = "valid" if split == "val" else split
  if key not in SPLITS:
    raise ValueError(f"unknown split {split!r}: one of {sorted(SPLITS)}")
  return SPLITS[key]


class Scan(NamedTuple):
  """One scan of a SemanticKITTI layout."""
  sequence: str                    #: two-digit sequence, ``"08"``
  frame: str                       #: six-digit frame, ``"000000"``
  velodyne: pathlib.Path           #: the ``.bin`` file
  label: pathlib.Path | None       #: the ``.label`` file, ``None`` where there is none


def scans(root: str | os.PathLike, sequences: str | Iterable[str] = "train") -> list[Scan]:
  """The scans of some sequences, sorted by sequence then frame.

  Args:
    root: the folder holding ``sequences/``.
    sequences: a split name (``train``, ``valid``, ``test``) or sequence names
      (``["00", "08"]`` or ints); sequences absent from ``root`` are skipped (a data
      set may hold a subset).

  Returns:
    :class:`Scan` entries; ``label`` is ``None`` where the labels file is absent.
  """
  if isinstance(sequences, str):
    sequences = split_sequences(sequences)
  out = []
  for seq in sequences:
    seq = f"{int(seq):02d}"
    folder = pathlib.Path(root, "sequences", seq)
    for bin_path in sorted((folder / "velodyne").glob("*.bin")):
      label = folder / "labels" / (bin_path.stem + ".label")
      out.append(Scan(seq, bin_path.stem, bin_path, label if label.is_file() else None))
  return out


class SemanticKITTI:
  """Random access to the scans of a SemanticKITTI layout (a data source).

  ``ds[i]`` is a dict of NumPy arrays:

  * ``coord``: float32 ``(P, 3)`` positions, sensor frame;
  * ``strength``: float32 ``(P, 1)`` remission;
  * ``label``: int32 ``(P,)`` training ids 0..19 (:func:`learning_map`; all 0 for a scan
    without labels), ``raw_label``: int32 ``(P,)`` raw ids, ``instance``: int32 ``(P,)``;
  * ``name``: ``"08/000123"``.

  Args:
    root: the folder holding ``sequences/``.
    split: a split name or sequence names (see :func:`scans`).
  """

  def __init__(self, root: str | os.PathLike, split: str | Iterable[str] = "train"):
    self.root = pathlib.Path(root)
    self.split = split if isinstance(split, str) else tuple(f"{int(s):02d}" for s in split)
    self.scans = scans(root, self.split)

  def __len__(self) -> int:
    return len(self.scans)

  def __getitem__(self, i: int) -> dict:
    s = self.scans[i]
    pts = read_velodyne(s.velodyne)
    if s.label is not None:
      raw, inst = read_label(s.label)
      if len(raw) != len(pts):
        raise ValueError(f"{s.label}: {len(raw)} labels for {len(pts)} points")
    else:
      raw = inst = np.zeros(len(pts), np.int32)
    return dict(coord=pts[:, :3].copy(), strength=pts[:, 3:].copy(), label=learning_map(raw),
                raw_label=raw, instance=inst, name=f"{s.sequence}/{s.frame}")

  def __repr__(self):
    return f"SemanticKITTI({str(self.root)!r}, {self.split!r})"


__all__ = ["CLASS_NAMES", "IGNORE_INDEX", "LABEL_NAMES", "LEARNING_MAP", "LEARNING_MAP_INV",
           "SPLITS", "Scan", "SemanticKITTI", "learning_map", "learning_map_inv",
           "read_label", "read_poses", "read_velodyne", "scans", "split_sequences", "to_zero_based",
           "write_label", "write_poses", "write_velodyne"]
