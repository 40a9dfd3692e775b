"""KITTI object, nuScenes, Pointcept ScanNet and PLY: byte layouts written by hand, and
the readers on the synthetic sets of ``datasets.synthetic``."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from jax_sparseconv import scenes
from jax_sparseconv.datasets import kitti, nuscenes, ply, scannet, synthetic


# ----------------------------------------------------------------------------- KITTI object


def test_kitti_object_layout(tmp_path):
  files = synthetic.write_kitti_object(tmp_path, 2, seed=1, az_steps=256)
  assert kitti.kitti_object_scans(tmp_path) == files
  assert [f.relative_to(tmp_path).as_posix() for f in files] == [
      "training/velodyne/000000.bin", "training/velodyne/000001.bin"]
  pts = kitti.read_kitti_object_velodyne(files[1])
  assert pts.dtype == np.float32 and pts.shape[1] == 4 and len(pts) > 3000
  assert files[1].stat().st_size == 16 * len(pts)
  np.testing.assert_array_equal(pts, synthetic.lidar_scan(0, 1, seed=1, az_steps=256)["points"])
  ds = kitti.KittiObject(tmp_path)
  assert len(ds) == 2 and ds[1]["name"] == "000001"
  np.testing.assert_array_equal(ds[1]["coord"], pts[:, :3])
  np.testing.assert_array_equal(ds[1]["strength"], pts[:, 3:])
  assert kitti.kitti_object_scans(tmp_path, "testing") == []
  with pytest.raises(ValueError):
    kitti.kitti_object_scans(tmp_path, "val")


# ----------------------------------------------------------------------------- nuScenes


def test_nuscenes_file_written_by_hand(tmp_path):
  rows = [(1.0, 2.0, -1.5, 37.0, 5.0), (-3.5, 0.25, 0.0, 255.0, 31.0)]
  path = tmp_path / "n008__LIDAR_TOP__1.pcd.bin"
  path.write_bytes(b"".join(struct.pack("<5f", *r) for r in rows))
  pts = nuscenes.read_nuscenes_lidar(path)
  assert pts.shape == (2, 5) and pts.dtype == np.float32
  np.testing.assert_array_equal(pts, np.asarray(rows, np.float32))
  nuscenes.write_nuscenes_lidar(tmp_path / "b.pcd.bin", pts[:, :3], pts[:, 3], pts[:, 4])
  assert (tmp_path / "b.pcd.bin").read_bytes() == path.read_bytes()
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(ValueError, match="multiple of 5"):
    nuscenes.read_nuscenes_lidar(path)


def test_nuscenes_lidarseg_bytes(tmp_path):
  nuscenes.write_nuscenes_lidarseg(tmp_path / "x_lidarseg.bin", [0, 17, 31, 255])
  assert (tmp_path / "x_lidarseg.bin").read_bytes() == bytes([0, 17, 31, 255])
  assert nuscenes.read_nuscenes_lidarseg(tmp_path / "x_lidarseg.bin").tolist() == [0, 17, 31, 255]
  with pytest.raises(ValueError):
    nuscenes.write_nuscenes_lidarseg(tmp_path / "y.bin", [256])


def test_nuscenes_synthetic_sweeps(tmp_path):
  files = synthetic.write_nuscenes_lidar_sweeps(tmp_path, 2, az_steps=256)
  assert all(f.parent == tmp_path / "samples" / "LIDAR_TOP" for f in files)
  assert all(f.name.endswith(".pcd.bin") and "__LIDAR_TOP__" in f.name for f in files)
  pts = nuscenes.read_nuscenes_lidar(files[0])
  scan = synthetic.lidar_scan(0, 0, az_steps=256)
  np.testing.assert_array_equal(pts[:, :3], scan["points"][:, :3])
  assert np.all(pts[:, 3] == np.round(pts[:, 3]))
  assert 0 <= pts[:, 3].min() and pts[:, 3].max() <= 255
  np.testing.assert_array_equal(pts[:, 4], scan["ring"])
  assert pts[:, 4].max() < len(scenes.LIDAR_ELEVATIONS)
  assert nuscenes.lidar_files(tmp_path) == files and nuscenes.lidar_files(tmp_path, "sweeps") == []
  seg = []
  for f in files:  # lidarseg files, one per scan
    n = len(nuscenes.read_nuscenes_lidar(f))
    seg.append(tmp_path / "lidarseg" / "v1.0-mini" / (f.name[:-8] + "_lidarseg.bin"))
    nuscenes.write_nuscenes_lidarseg(seg[-1], np.arange(n) % 32)
  ds = nuscenes.NuScenesLidar(tmp_path)
  ex = nuscenes.NuScenesLidar(files, lidarseg=seg)[0]
  assert len(ds) == 2 and ds[0]["name"] == files[0].name[:-8]
  np.testing.assert_array_equal(ex["coord"], pts[:, :3])
  np.testing.assert_array_equal(ex["ring"], scan["ring"])
  assert ex["strength"].shape == (len(pts), 1) and ex["strength"].max() <= 1
  np.testing.assert_array_equal(ex["label"], np.arange(len(pts)) % 32)
  with pytest.raises(ValueError):
    nuscenes.NuScenesLidar(files, lidarseg=seg[:1])


# ----------------------------------------------------------------------------- ScanNet


def test_scannet_folder_written_by_hand(tmp_path):
  folder = tmp_path / "train" / "scene0000_00"
  folder.mkdir(parents=True)
  n = 5
  np.save(folder / "coord.npy", np.arange(3 * n, dtype=np.float32).reshape(n, 3))
  np.save(folder / "color.npy", np.full((n, 3), 200, np.uint8))
  np.save(folder / "normal.npy", np.tile(np.float32([0, 0, 1]), (n, 1)))
  np.save(folder / "segment20.npy", np.array([0, 1, -1, 19, 4]))
  scene = scannet.read_scene(folder)
  assert scene["name"] == "scene0000_00" and set(scene) == {"coord", "color", "normal",
                                                            "segment20", "name"}
  assert scene["color"].dtype == np.uint8 and scene["coord"].dtype == np.float32
  ds = scannet.PointceptScanNet(tmp_path, "train")
  assert len(ds) == 1 and ds[0]["label"].tolist() == [0, 1, -1, 19, 4]
  assert np.all(scannet.PointceptScanNet(tmp_path, "train", classes=200)[0]["label"] == -1)
  np.save(folder / "segment20.npy", np.zeros(n - 1, np.int64))
  with pytest.raises(ValueError, match="segment20"):
    scannet.read_scene(folder)
  (folder / "normal.npy").unlink()
  with pytest.raises(FileNotFoundError):
    scannet.read_scene(folder)


def test_scannet_synthetic_rooms(tmp_path):
  folders = synthetic.write_pointcept_scannet(tmp_path, {"train": 2, "val": 1, "test": 1},
                                              density=120.0)
  assert [f.relative_to(tmp_path).as_posix() for f in folders] == [
      "train/scene0000_00", "train/scene0001_00", "val/scene0002_00", "test/scene0003_00"]
  for f in folders[:3]:
    assert sorted(p.name for p in f.iterdir()) == [
        "color.npy", "coord.npy", "instance.npy", "normal.npy", "segment20.npy",
        "segment200.npy"]
  assert sorted(p.name for p in folders[3].iterdir()) == ["color.npy", "coord.npy", "normal.npy"]
  ds = scannet.PointceptScanNet(tmp_path, "train")
  s = ds[1]
  n = len(s["coord"])
  assert s["coord"].dtype == np.float32 and s["color"].dtype == np.uint8
  assert s["segment20"].dtype == np.int64 and s["label"].dtype == np.int32
  assert s["normal"].shape == (n, 3)
  np.testing.assert_allclose(np.linalg.norm(s["normal"], axis=1), 1, atol=1e-5)
  # labels: floor and wall, furniture; balls and columns ignored
  present = set(np.unique(s["label"]))
  assert {0, 1} <= present and present <= {-1, 0, 1, 4, 6}
  floor = s["label"] == scannet.SCANNET20_CLASS_NAMES.index("floor")
  assert np.mean(np.abs(s["normal"][floor, 2])) > 0.95  # the floor's normals are vertical
  assert np.mean(s["normal"][floor, 2] > 0) > 0.95      # and face the room
  assert len(scannet.PointceptScanNet(tmp_path, ["train", "val"])) == 3
  assert np.all(scannet.PointceptScanNet(tmp_path, "test")[0]["label"] == -1)
  with pytest.raises(ValueError):
    scannet.scene_folders(tmp_path, "training")


def test_scannet_write_validates(tmp_path):
  z = np.zeros((2, 3))
  with pytest.raises(ValueError):
    scannet.write_scene(tmp_path / "s", z, z, z, segment20=[0, 20])
  with pytest.raises(ValueError):
    scannet.write_scene(tmp_path / "s", z, z, z, segment20=[0])


# ----------------------------------------------------------------------------- PLY

_HEADER = ("ply\nformat {fmt} 1.0\ncomment made by hand\nelement vertex 2\n"
           "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
           "property uchar green\nproperty uchar blue\nproperty int label\n"
           "element face 1\nproperty list uchar int vertex_indices\nend_header\n")
_ROWS = [(0.5, -1.25, 3.0, 255, 0, 7, -1), (1e-3, 2.0, -0.0625, 1, 2, 3, 19)]


def _check(cloud):
  np.testing.assert_array_equal(cloud["coord"], np.float32([r[:3] for r in _ROWS]))
  assert cloud["coord"].dtype == np.float32 and cloud["color"].dtype == np.uint8
  assert cloud["color"].tolist() == [[255, 0, 7], [1, 2, 3]]
  assert cloud["label"].tolist() == [-1, 19] and cloud["label"].dtype == np.int32


@pytest.mark.parametrize("fmt,order", [("binary_little_endian", "<"),
                                       ("binary_big_endian", ">")])
def test_ply_binary_written_by_hand(tmp_path, fmt, order):
  body = b"".join(struct.pack(order + "3f3Bi", *r) for r in _ROWS)
  body += struct.pack(order + "B3i", 3, 0, 1, 1)  # a face (list property) after the vertices
  path = tmp_path / "a.ply"
  path.write_bytes(_HEADER.format(fmt=fmt).encode() + body)
  _check(ply.read_ply_cloud(path))
  faces = ply.read_ply(path, "face")
  assert faces["vertex_indices"][0].tolist() == [0, 1, 1]


def test_ply_ascii_written_by_hand(tmp_path):
  body = "0.5 -1.25 3 255 0 7 -1\n0.001 2 -0.0625 1 2 3 19\n3 0 1 1\n"
  path = tmp_path / "a.ply"
  path.write_bytes(_HEADER.format(fmt="ascii").encode() + body.encode())
  _check(ply.read_ply_cloud(path))
  assert ply.read_ply(path, "face")["vertex_indices"][0].tolist() == [0, 1, 1]


def test_ply_header_only_vertex_after_faces(tmp_path):
  # an element before the vertices is skipped, list properties included
  head = ("ply\nformat binary_little_endian 1.0\nelement face 2\n"
          "property list uchar int vertex_indices\nelement vertex 1\nproperty double x\n"
          "property double y\nproperty double z\nend_header\n").encode()
  body = struct.pack("<B3iB4i", 3, 0, 0, 0, 4, 1, 2, 3, 4) + struct.pack("<3d", 1.0, 2.0, 3.0)
  (tmp_path / "f.ply").write_bytes(head + body)
  c = ply.read_ply_cloud(tmp_path / "f.ply")
  assert c["coord"].dtype == np.float64 and c["coord"].tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("fmt", ply.FORMATS)
def test_ply_round_trip_bit_exact(tmp_path, fmt):
  rng = np.random.default_rng(0)
  coord = (rng.standard_normal((50, 3)) * 100).astype(np.float32)
  coord[0] = [np.float32(1 / 3), -np.float32(1e-30), np.float32(3.4e38)]
  normal = rng.standard_normal((50, 3))
  color = rng.integers(0, 256, (50, 3)).astype(np.uint8)
  label = rng.integers(-1, 20, 50)
  path = tmp_path / f"r_{fmt}.ply"
  ply.write_ply_cloud(path, coord, color=color, normal=normal, intensity=coord[:, 0],
                      label=label, format=fmt, comments=("hello",))
  with open(path, "rb") as f:
    got_fmt, elements, comments = ply.read_ply_header(f)
  assert got_fmt == fmt and comments == ["hello"] and elements[0].count == 50
  c = ply.read_ply_cloud(path)
  np.testing.assert_array_equal(c["coord"], coord)
  np.testing.assert_array_equal(c["normal"], normal)  # float64 kept, 17 digits in ascii
  np.testing.assert_array_equal(c["color"], color)
  np.testing.assert_array_equal(c["intensity"], coord[:, 0])
  np.testing.assert_array_equal(c["label"], label)
  assert c["label"].dtype == np.int32 and c["normal"].dtype == np.float64


def test_ply_faces_round_trip(tmp_path):
  v = {"x": np.float32([0, 1, 0]), "y": np.float32([0, 0, 1]), "z": np.float32([0, 0, 0])}
  for fmt in ply.FORMATS:
    ply.write_ply(tmp_path / "t.ply", v, format=fmt, faces=[[0, 1, 2]])
    assert ply.read_ply(tmp_path / "t.ply", "face")["vertex_indices"][0].tolist() == [0, 1, 2]
    assert ply.read_ply(tmp_path / "t.ply")["x"].tolist() == [0, 1, 0]


def test_ply_errors(tmp_path):
  (tmp_path / "a.ply").write_bytes(b"plx\n")
  with pytest.raises(ValueError, match="not a PLY"):
    ply.read_ply(tmp_path / "a.ply")
  (tmp_path / "b.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 2\n"
                                   b"property float x\nend_header\n\0\0\0\0")
  with pytest.raises(ValueError, match="ends inside"):
    ply.read_ply(tmp_path / "b.ply")
  with pytest.raises(ValueError, match="no element"):
    ply.read_ply(tmp_path / "b.ply", "face")
  with pytest.raises(ValueError, match="PLY scalar"):
    ply.write_ply(tmp_path / "c.ply", {"x": np.zeros(2, np.int64)})


def test_ply_synthetic_room(tmp_path):
  path = synthetic.write_room_ply(tmp_path / "room.ply", 3, density=100.0, format="ascii")
  c = ply.read_ply_cloud(path)
  ref = synthetic.room_scene(3, density=100.0)
  np.testing.assert_array_equal(c["coord"], ref["coord"])
  np.testing.assert_array_equal(c["color"], ref["color"])
  np.testing.assert_array_equal(c["label"], ref["segment20"])
