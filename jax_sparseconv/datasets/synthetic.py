"""Small synthetic data sets in the real formats, from :mod:`jax_sparseconv.scenes`.

No downloads; deterministic in a seed; a few seconds at most. What they hold:

* :func:`write_semantic_kitti`: SemanticKITTI sequences scanned by the simulated LiDAR
  (:func:`~jax_sparseconv.scenes.lidar_sweep`): sequence ``s`` is the street of seed
  ``100 * seed + int(s)``, scan ``i`` the revolution of sweep ``i`` along it (10 m
  apart), in the sensor frame, with :data:`LIDAR_TO_SEMANTIC_KITTI` raw labels, car
  instance ids, a synthetic remission (:func:`synthetic_remission`) and ``poses.txt``,
  ``times.txt``, ``calib.txt``. Test sequences (11-21) get no labels, as in the real
  set.
* :func:`write_kitti_object` / :func:`write_nuscenes_lidar_sweeps`: the same scans as
  KITTI object ``velodyne/*.bin`` / nuScenes ``samples/LIDAR_TOP/*.pcd.bin`` (intensity
  0..255 and the ring index).
* :func:`write_pointcept_scannet`: rooms of :func:`~jax_sparseconv.scenes.room_points`
  as Pointcept ScanNet scene folders, labels mapped by :data:`ROOM_TO_SCANNET20` /
  :data:`ROOM_TO_SCANNET200`, normals estimated from the points
  (:func:`estimate_normals`), one instance per object.
* :func:`write_room_ply`: a room as a PLY file (colours, normals, labels).
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np

from .. import scenes
from . import kitti, nuscenes, ply, scannet, semantic_kitti

#: :data:`scenes.LIDAR_LABELS` -> SemanticKITTI raw ids. Cars in the oncoming lane
#: (:data:`ONCOMING_LANE`) are moving: 252 "moving-car" instead of 10; hedges and fences
#: in front of buildings are labelled vegetation by the scene, so 70.
LIDAR_TO_SEMANTIC_KITTI = {"road": 40, "sidewalk": 48, "building": 50, "car": 10, "pole": 80,
                           "trunk": 71, "vegetation": 70}
MOVING_CAR = 252
_ORIGIN0 = np.array([0.0, -1.75, 0.0])  # the sensor of sweep 0
#: y range (street frame, metres) of the oncoming lane's cars; parked cars are beyond 3.4.
ONCOMING_LANE = (0.5, 3.0)
#: Mean remission of each class of :data:`scenes.LIDAR_LABELS` (asphalt dark, foliage
#: bright in the near infrared).
REMISSION = {"road": 0.18, "sidewalk": 0.27, "building": 0.33, "car": 0.42, "pole": 0.5,
             "trunk": 0.24, "vegetation": 0.45}

#: :data:`scenes.ROOM_LABELS` -> ScanNet-20 index (Pointcept's order): balls (NYU40
#: "otherprop") and columns ("otherstructure") are not among the 20: ignored (-1).
ROOM_TO_SCANNET20 = {"floor": 1, "wall": 0, "table": 6, "chair": 4, "ball": -1, "column": -1}
#: :data:`scenes.ROOM_LABELS` -> ScanNet-200 index (Pointcept's ``CLASS_LABELS_200``).
ROOM_TO_SCANNET200 = {"floor": 2, "wall": 0, "table": 3, "chair": 1, "ball": 122, "column": 97}


def _lut(mapping, names):
  return np.array([mapping[n] for n in names], np.int32)


def synthetic_remission(labels, ranges, rng) -> np.ndarray:
  """A plausible remission per point: the class's :data:`REMISSION`, fading by 30% out to
  80 m, with multiplicative noise, quantised to 0.01 as KITTI's values are.

  Args:
    labels: int ``(P,)`` indices into :data:`scenes.LIDAR_LABELS`.
    ranges: float ``(P,)`` distances to the sensor, metres.
    rng: the ``numpy.random.Generator`` of the scan.

  Returns:
    float32 ``(P,)`` in [0, 0.99].
  """
  base = _lut(REMISSION, scenes.LIDAR_LABELS).astype(np.float64)[labels]
  fade = 1.0 - 0.3 * np.minimum(np.asarray(ranges, np.float64) / scenes.LIDAR_RANGE[1], 1.0)
  r = base * fade * np.exp(0.25 * rng.standard_normal(len(base)))
  return (np.round(np.clip(r, 0.0, 0.99) * 100) / 100).astype(np.float32)


def street_seed(seed: int, sequence: str | int) -> int:
  """The scene seed of sequence ``sequence`` of a synthetic SemanticKITTI set."""
  return 100 * int(seed) + int(sequence)


def lidar_scan(sequence: str | int, frame: int, *, seed: int = 0, az_steps: int = 512) -> dict:
  """Scan ``frame`` of a synthetic sequence, as SemanticKITTI stores it.

  Returns:
    ``dict(points, semantic, instance, ring, pose)``: float32 ``(P, 4)`` x, y, z
    (sensor frame) and remission; int32 ``(P,)`` raw SemanticKITTI ids; int32 ``(P,)``
    instance ids; int32 ``(P,)`` beam index; float64 ``(4, 4)`` sensor pose in the
    frame of scan 0.
  """
  s = scenes.lidar_sweep(frame, street_seed(seed, sequence), az_steps=az_steps)
  rel = s.points.astype(np.float64) - s.origin
  rng = np.random.default_rng([seed, 31, int(sequence), frame])
  remission = synthetic_remission(s.labels, np.linalg.norm(rel, axis=1), rng)
  semantic = _lut(LIDAR_TO_SEMANTIC_KITTI, scenes.LIDAR_LABELS)[s.labels]
  y = s.points[:, 1]
  oncoming = (s.labels == scenes.LIDAR_LABELS.index("car")) & (y > ONCOMING_LANE[0]) & \
      (y < ONCOMING_LANE[1])
  semantic = np.where(oncoming, MOVING_CAR, semantic).astype(np.int32)
  pose = np.eye(4)
  pose[:3, 3] = s.origin - _ORIGIN0  # the sensor frame of scan 0
  points = np.concatenate([rel.astype(np.float32), remission[:, None]], 1)
  return dict(points=points, semantic=semantic, instance=s.instances, ring=s.rings, pose=pose)


def write_semantic_kitti(root: str | os.PathLike, sequences: Mapping[str, int] | None = None,
                         *, seed: int = 0, az_steps: int = 512) -> list[pathlib.Path]:
  """Writes a synthetic SemanticKITTI data set (see the module docstring).

  Args:
    root: the folder to hold ``sequences/``.
    sequences: scans per sequence, ``{"00": 2, "08": 1}`` by default; sequences of the
      test split (11-21) are written without labels.
    seed: the data set (each sequence has its own street, each scan its own noise).
    az_steps: azimuth steps per revolution (512: ~25k points a scan, ~0.1 s; 2048 is
      the HDL-64E's ~100k).

  Returns:
    the velodyne files written, in order.
  """
  sequences = {"00": 2, "08": 1} if sequences is None else sequences
  out = []
  for seq, n in sequences.items():
    seq = f"{int(seq):02d}"
    folder = pathlib.Path(root, "sequences", seq)
    labelled = seq not in semantic_kitti.SPLITS["test"]
    poses = []
    for frame in range(n):
      scan = lidar_scan(seq, frame, seed=seed, az_steps=az_steps)
      path = folder / "velodyne" / f"{frame:06d}.bin"
      kitti.write_velodyne(path, scan["points"])
      if labelled:
        semantic_kitti.write_label(folder / "labels" / f"{frame:06d}.label", scan["semantic"],
                                   scan["instance"])
      poses.append(scan["pose"])
      out.append(path)
    folder.mkdir(parents=True, exist_ok=True)
    semantic_kitti.write_poses(folder / "poses.txt", np.asarray(poses).reshape(-1, 4, 4))
    np.savetxt(folder / "times.txt", np.arange(n) * 1.0, fmt="%e")  # 10 m a second
    eye = " ".join(["1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1", "0"])
    (folder / "calib.txt").write_text("".join(f"{k}: {eye}\n" for k in
                                              ("P0", "P1", "P2", "P3", "Tr")))
  return out


def write_kitti_object(root: str | os.PathLike, num_scans: int = 2, *, split: str = "training",
                       seed: int = 0, az_steps: int = 512) -> list[pathlib.Path]:
  """Writes ``root/split/velodyne/NNNNNN.bin`` KITTI object scans (frames of sequence 0).

  Returns:
    the files written.
  """
  out = []
  for frame in range(num_scans):
    path = pathlib.Path(root, split, "velodyne", f"{frame:06d}.bin")
    kitti.write_velodyne(path, lidar_scan(0, frame, seed=seed, az_steps=az_steps)["points"])
    out.append(path)
  return out


def write_nuscenes_lidar_sweeps(root: str | os.PathLike, num_scans: int = 2, *, seed: int = 0,
                                az_steps: int = 512) -> list[pathlib.Path]:
  """Writes ``root/samples/LIDAR_TOP/*.pcd.bin`` files (frames of sequence 0; intensity
  = 255 * remission, rounded; ring = beam index; timestamps one second apart).

  Returns:
    the files written.
  """
  out = []
  for frame in range(num_scans):
    scan = lidar_scan(0, frame, seed=seed, az_steps=az_steps)
    p = scan["points"]
    stamp = 1_500_000_000_000_000 + frame * 1_000_000
    path = pathlib.Path(root, "samples", "LIDAR_TOP",
                        f"n000-synthetic-{seed}__LIDAR_TOP__{stamp}.pcd.bin")
    nuscenes.write_nuscenes_lidar(path, p[:, :3], np.round(p[:, 3] * 255), scan["ring"])
    out.append(path)
  return out


def estimate_normals(points, viewpoint, cell: float = 0.1) -> np.ndarray:
  """Unit normals from the points' local covariance, oriented towards ``viewpoint``.

  Moments are summed per ``cell``-sized voxel and over its 27 neighbours; the normal of
  a point is the eigenvector of the smallest eigenvalue of its voxel's neighbourhood
  covariance (a plane fit ~0.3 m across), flipped to face ``viewpoint``.

  Args:
    points: float ``(N, 3)``.
    viewpoint: ``(3,)``, e.g. the room's centre.
    cell: voxel edge, metres.

  Returns:
    float32 ``(N, 3)``.
  """
  p = np.asarray(points, np.float64)
  idx = np.floor(p / cell).astype(np.int64)
  idx -= idx.min(0) - 1
  key = (idx[:, 0] << 42) | (idx[:, 1] << 21) | idx[:, 2]
  ukey, inv = np.unique(key, return_inverse=True)
  m = np.zeros((len(ukey), 13))
  np.add.at(m, inv, np.concatenate([np.ones((len(p), 1)), p,
                                    (p[:, :, None] * p[:, None, :]).reshape(-1, 9)], 1))
  uidx = np.stack([ukey >> 42, (ukey >> 21) & ((1 << 21) - 1), ukey & ((1 << 21) - 1)], 1)
  tot = np.zeros_like(m)
  for d in np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3):
    q = uidx + d
    qk = (q[:, 0] << 42) | (q[:, 1] << 21) | q[:, 2]
    j = np.minimum(np.searchsorted(ukey, qk), len(ukey) - 1)
    tot += np.where((ukey[j] == qk)[:, None], m[j], 0.0)
  n = tot[:, :1]
  mean = tot[:, 1:4] / n
  cov = tot[:, 4:].reshape(-1, 3, 3) / n[:, :, None] - mean[:, :, None] * mean[:, None, :]
  normals = np.linalg.eigh(cov)[1][:, :, 0][inv]
  flip = np.sum(normals * (np.asarray(viewpoint, np.float64) - p), 1) < 0
  normals[flip] *= -1
  return normals.astype(np.float32)


def room_scene(seed: int, *, density: float = 250.0) -> dict:
  """A room of :func:`scenes.room_points` as a Pointcept ScanNet scene's arrays.

  Returns:
    ``dict(coord, color, normal, segment20, segment200, instance)``: float32 ``(N, 3)``,
    uint8 ``(N, 3)``, float32 ``(N, 3)``, int64 ``(N,)`` x 3 (see :data:`ROOM_TO_SCANNET20`).
  """
  pts, rgb, lab, inst = scenes.room_points(seed, density, instances=True)
  lo, hi = pts.min(0), pts.max(0)
  view = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 1.2])
  return dict(coord=pts, color=np.round(rgb * 255).astype(np.uint8),
              normal=estimate_normals(pts, view),
              segment20=_lut(ROOM_TO_SCANNET20, scenes.ROOM_LABELS)[lab].astype(np.int64),
              segment200=_lut(ROOM_TO_SCANNET200, scenes.ROOM_LABELS)[lab].astype(np.int64),
              instance=inst.astype(np.int64))


def write_pointcept_scannet(root: str | os.PathLike, splits: Mapping[str, int] | None = None,
                            *, seed: int = 0, density: float = 250.0) -> list[pathlib.Path]:
  """Writes rooms as a Pointcept ScanNet data set (``root/{train,val,test}/sceneNNNN_00``).

  Scene ``k`` (numbered across splits, in order) is room ``100_003 * seed + k``; test
  scenes get no segment / instance files, as in the real set.

  Args:
    root: Pointcept's ``data/scannet``.
    splits: scenes per split, ``{"train": 2, "val": 1}`` by default.
    seed: the data set.
    density: points per square metre (250: ~15k points a room).

  Returns:
    the scene folders written.
  """
  splits = {"train": 2, "val": 1} if splits is None else splits
  out, k = [], 0
  for split, n in splits.items():
    if split not in scannet.SPLITS:
      raise ValueError(f"unknown split {split!r}: one of {scannet.SPLITS}")
    for _ in range(n):
      a = room_scene(100_003 * seed + k, density=density)
      labels = {} if split == "test" else dict(segment20=a["segment20"],
                                               segment200=a["segment200"],
                                               instance=a["instance"])
      out.append(scannet.write_scene(pathlib.Path(root, split, f"scene{k:04d}_00"), a["coord"],
                                     a["color"], a["normal"], **labels))
      k += 1
  return out


def write_room_ply(path: str | os.PathLike, seed: int = 0, *, density: float = 250.0,
                   format: str = "binary_little_endian") -> pathlib.Path:
  """Writes room ``seed`` as a PLY point cloud: x, y, z, red, green, blue, nx, ny, nz and
  ``label`` (the ScanNet-20 index of :data:`ROOM_TO_SCANNET20`, -1 ignored)."""
  a = room_scene(seed, density=density)
  ply.write_ply_cloud(path, a["coord"], color=a["color"], normal=a["normal"],
                      label=a["segment20"].astype(np.int32), format=format,
                      comments=(f"jax_sparseconv synthetic room {seed}",))
  return pathlib.Path(path)
