"""KITTI velodyne scans: ``.bin`` files of float32 ``(x, y, z, remission)`` per point.

The layout of both the KITTI object benchmark (``training/velodyne/000000.bin``,
``testing/velodyne/...``) and SemanticKITTI (``sequences/00/velodyne/000000.bin``, see
:mod:`.semantic_kitti`): ``P * 4`` little-endian float32 values, no header, points in
the sensor frame (metres; x forward, y left, z up), remission in [0, 1].
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

#: Values per point of a KITTI velodyne scan: x, y, z, remission.
KITTI_POINT_DIM = 4


def read_velodyne(path: str | os.PathLike) -> np.ndarray:
  """Reads a KITTI / SemanticKITTI velodyne scan.

  Returns:
    float32 ``(P, 4)``: x, y, z (metres, sensor frame) and remission.

  Raises:
    ValueError: the file size is not a multiple of 16 bytes.
  """
  raw = np.fromfile(path, dtype="<f4")
  if raw.size % KITTI_POINT_DIM:
    raise ValueError(f"{path}: {raw.size} floats, not a multiple of {KITTI_POINT_DIM}")
  return raw.reshape(-1, KITTI_POINT_DIM).astype(np.float32)


def write_velodyne(path: str | os.PathLike, points, remission=None) -> None:
  """Writes a velodyne scan (the exact layout :func:`read_velodyne` reads).

  Args:
    path: the ``.bin`` file (folders are created).
    points: ``(P, 4)`` x, y, z, remission, or ``(P, 3)`` with ``remission`` given.
    remission: optional ``(P,)`` remission, when ``points`` is ``(P, 3)``.
  """
  points = np.asarray(points)
  if remission is not None:
    points = np.concatenate([points[:, :3], np.asarray(remission).reshape(-1, 1)], 1)
  if points.ndim != 2 or points.shape[1] != KITTI_POINT_DIM:
    raise ValueError(f"points must be (P, 4) (or (P, 3) with remission), got {points.shape}")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  np.ascontiguousarray(points, dtype="<f4").tofile(path)


def read_kitti_object_velodyne(path: str | os.PathLike) -> np.ndarray:
  """A KITTI object-detection benchmark scan (``{training,testing}/velodyne/NNNNNN.bin``):
  the same layout as SemanticKITTI's, read by :func:`read_velodyne`.

  Returns:
    float32 ``(P, 4)``: x, y, z, remission.
  """
  return read_velodyne(path)


def kitti_object_scans(root: str | os.PathLike, split: str = "training") -> list[pathlib.Path]:
  """The velodyne files of a KITTI object split (``training`` or ``testing``), sorted.

  Returns:
    paths ``root/split/velodyne/NNNNNN.bin`` in frame order.
  """
  if split not in ("training", "testing"):
    raise ValueError(f"split must be 'training' or 'testing', got {split!r}")
  return sorted(pathlib.Path(root, split, "velodyne").glob("*.bin"))


class KittiObject:
  """Random access to the velodyne scans of a KITTI object split (a data source).

  ``ds[i]`` is ``dict(coord=float32 (P, 3), strength=float32 (P, 1) remission,
  name="000123")``: no labels (the benchmark's are 3D boxes, not per point).

  Args:
    root: the folder holding ``training/`` and ``testing/``.
    split: ``training`` or ``testing``.
  """

  def __init__(self, root: str | os.PathLike, split: str = "training"):
    self.root, self.split = pathlib.Path(root), split
    self.files = kitti_object_scans(root, split)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    pts = read_velodyne(self.files[i])
    return dict(coord=pts[:, :3].copy(), strength=pts[:, 3:].copy(), name=self.files[i].stem)

  def __repr__(self):
    return f"KittiObject({str(self.root)!r}, {self.split!r})"
