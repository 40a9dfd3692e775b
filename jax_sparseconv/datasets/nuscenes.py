"""nuScenes lidar sweeps: ``.pcd.bin`` files of float32 ``(x, y, z, intensity, ring)``.

``samples/LIDAR_TOP/<log>__LIDAR_TOP__<timestamp>.pcd.bin`` (and ``sweeps/LIDAR_TOP``):
``P * 5`` little-endian float32 values, no header (despite the name, not a PCD file):
x, y, z in metres (sensor frame), intensity (0..255), ring index (the laser, 0..31
on the HDL-32E), stored as a float. lidarseg labels
(``lidarseg/<version>/<token>_lidarseg.bin``) are one uint8 class per point.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

#: Values per point of a nuScenes lidar file: x, y, z, intensity, ring index.
NUSCENES_POINT_DIM = 5


def read_nuscenes_lidar(path: str | os.PathLike) -> np.ndarray:
  """Reads a nuScenes ``.pcd.bin`` lidar file.

  Returns:
    float32 ``(P, 5)``: x, y, z, intensity, ring index.

  Raises:
    ValueError: the file size is not a multiple of 20 bytes.
  """
  raw = np.fromfile(path, dtype="<f4")
  if raw.size % NUSCENES_POINT_DIM:
    raise ValueError(f"{path}: {raw.size} floats, not a multiple of {NUSCENES_POINT_DIM}")
  return raw.reshape(-1, NUSCENES_POINT_DIM).astype(np.float32)


def write_nuscenes_lidar(path: str | os.PathLike, points, intensity=None, ring=None) -> None:
  """Writes a nuScenes lidar file (the layout :func:`read_nuscenes_lidar` reads).

  Args:
    path: the ``.pcd.bin`` file (folders are created).
    points: ``(P, 5)``, or ``(P, 3)`` with ``intensity`` and ``ring`` given.
    intensity: optional ``(P,)``.
    ring: optional ``(P,)`` ring (laser) index.
  """
  points = np.asarray(points)
  if intensity is not None or ring is not None:
    if intensity is None or ring is None:
      raise ValueError("give both intensity and ring, or a (P, 5) array")
    points = np.concatenate([points[:, :3], np.asarray(intensity).reshape(-1, 1),
                             np.asarray(ring).reshape(-1, 1)], 1)
  if points.ndim != 2 or points.shape[1] != NUSCENES_POINT_DIM:
    raise ValueError(f"points must be (P, 5), got {points.shape}")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  np.ascontiguousarray(points, dtype="<f4").tofile(path)


def read_nuscenes_lidarseg(path: str | os.PathLike) -> np.ndarray:
  """Reads a nuScenes lidarseg label file: uint8 ``(P,)`` class per point."""
  return np.fromfile(path, dtype=np.uint8)


def write_nuscenes_lidarseg(path: str | os.PathLike, labels) -> None:
  """Writes uint8 ``(P,)`` lidarseg labels (values must be in 0..255)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError("lidarseg labels must be in 0..255")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  labels.astype(np.uint8).tofile(path)


def lidar_files(root: str | os.PathLike, folder: str = "samples") -> list[pathlib.Path]:
  """The ``LIDAR_TOP`` files of ``root/folder`` (``samples`` or ``sweeps``), sorted by name
  (for one log: by timestamp)."""
  if folder not in ("samples", "sweeps"):
    raise ValueError(f"folder must be 'samples' or 'sweeps', got {folder!r}")
  return sorted(pathlib.Path(root, folder, "LIDAR_TOP").glob("*.pcd.bin"))


class NuScenesLidar:
  """Random access to nuScenes ``LIDAR_TOP`` files (a data source).

  ``ds[i]`` is ``dict(coord=float32 (P, 3), strength=float32 (P, 1) intensity / 255,
  ring=int32 (P,), name=the file's name without .pcd.bin)``; with ``lidarseg``, also
  ``label``: int32 ``(P,)`` from the lidarseg file of the same index.

  Args:
    files: the ``.pcd.bin`` files (e.g. :func:`lidar_files`), or ``root`` to take
      :func:`lidar_files` of ``samples``.
    lidarseg: optional lidarseg label files, one per file (nuScenes pairs them through
      its JSON tables, which this reader does not parse).
  """

  def __init__(self, files, lidarseg=None):
    if isinstance(files, (str, os.PathLike)):
      files = lidar_files(files)
    self.files = [pathlib.Path(f) for f in files]
    self.lidarseg = None if lidarseg is None else [pathlib.Path(f) for f in lidarseg]
    if self.lidarseg is not None and len(self.lidarseg) != len(self.files):
      raise ValueError(f"{len(self.lidarseg)} lidarseg files for {len(self.files)} scans")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    pts = read_nuscenes_lidar(self.files[i])
    out = dict(coord=pts[:, :3].copy(), strength=pts[:, 3:4] / np.float32(255),
               ring=pts[:, 4].astype(np.int32), name=self.files[i].name[:-len(".pcd.bin")])
    if self.lidarseg is not None:
      label = read_nuscenes_lidarseg(self.lidarseg[i]).astype(np.int32)
      if len(label) != len(pts):
        raise ValueError(f"{self.lidarseg[i]}: {len(label)} labels for {len(pts)} points")
      out["label"] = label
    return out

  def __repr__(self):
    return f"NuScenesLidar({len(self.files)} files)"
