"""SemanticKITTI: the ``.bin`` / ``.label`` byte layouts, the learning map and splits, and
the reader on a synthetic sequence written by ``datasets.synthetic``."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from jax_sparseconv import scenes
from jax_sparseconv.datasets import kitti, semantic_kitti as sk, synthetic


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("skitti")
  synthetic.write_semantic_kitti(root, {"00": 3, "08": 1, "11": 1}, seed=0, az_steps=256)
  return root


def test_label_file_written_by_hand(tmp_path):
  # semantic in the low 16 bits, instance in the high 16, little-endian uint32
  values = [10 | (7 << 16), 40, 252 | (65535 << 16), 0, 0xFFFF]
  path = tmp_path / "000000.label"
  path.write_bytes(struct.pack("<5I", *values))
  sem, inst = sk.read_label(path)
  assert sem.tolist() == [10, 40, 252, 0, 65535]
  assert inst.tolist() == [7, 0, 65535, 0, 0]
  assert sk.learning_map(sem).tolist() == [1, 9, 1, 0, 0]  # 65535: not in the map -> 0
  assert sk.learning_map(np.asarray(values, np.uint32)).tolist() == [1, 9, 1, 0, 0]


def test_write_label_bytes(tmp_path):
  path = tmp_path / "a.label"
  sk.write_label(path, [10, 50, 72], [3, 0, 1000])
  assert path.read_bytes() == struct.pack("<3I", 10 | 3 << 16, 50, 72 | 1000 << 16)
  with pytest.raises(ValueError):
    sk.write_label(path, [70000])
  with pytest.raises(ValueError):
    sk.write_label(path, [10], [-1])


def test_velodyne_file_written_by_hand(tmp_path):
  rows = [(1.5, -2.25, 0.125, 0.5), (-80.0, 3.0, -1.73, 0.0)]
  path = tmp_path / "000000.bin"
  path.write_bytes(b"".join(struct.pack("<4f", *r) for r in rows))
  pts = kitti.read_velodyne(path)
  assert pts.dtype == np.float32 and pts.shape == (2, 4)
  np.testing.assert_array_equal(pts, np.asarray(rows, np.float32))
  kitti.write_velodyne(tmp_path / "b.bin", pts[:, :3], pts[:, 3])
  assert (tmp_path / "b.bin").read_bytes() == path.read_bytes()
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(ValueError, match="multiple of 4"):
    kitti.read_velodyne(path)


def test_learning_map_is_semantic_kitti_yaml():
  assert len(sk.CLASS_NAMES) == 19 and sk.IGNORE_INDEX == 0
  # learning_map_inv then learning_map is the identity on 0..19 ...
  ids = np.arange(20)
  np.testing.assert_array_equal(sk.learning_map(sk.learning_map_inv(ids)), ids)
  # ... and every class's raw id has the class's name
  for i, name in enumerate(sk.CLASS_NAMES, start=1):
    assert sk.LABEL_NAMES[sk.LEARNING_MAP_INV[i]] == name
  # moving classes go to their static class; unmapped structure to 0
  for moving, static in ((252, 10), (253, 31), (254, 30), (255, 32), (258, 18)):
    assert sk.LEARNING_MAP[moving] == sk.LEARNING_MAP[static]
  for raw in (0, 1, 52, 99):
    assert sk.LEARNING_MAP[raw] == 0
  assert sk.LEARNING_MAP[60] == sk.LEARNING_MAP[40]  # lane marking is road
  assert set(sk.LEARNING_MAP) == set(sk.LABEL_NAMES)
  assert sk.learning_map_inv([-1, 20, 19]).tolist() == [0, 0, 81]
  assert sk.to_zero_based([0, 1, 19, 20]).tolist() == [-1, 0, 18, -1]


def test_splits():
  assert sk.split_sequences("train") == ("00", "01", "02", "03", "04", "05", "06", "07",
                                         "09", "10")
  assert sk.split_sequences("valid") == sk.split_sequences("val") == ("08",)
  assert sk.split_sequences("test") == tuple(f"{i:02d}" for i in range(11, 22))
  with pytest.raises(ValueError):
    sk.split_sequences("training")


def test_layout_on_disk(root):
  seq = root / "sequences" / "00"
  assert sorted(p.name for p in (seq / "velodyne").iterdir()) == [
      "000000.bin", "000001.bin", "000002.bin"]
  assert sorted(p.name for p in (seq / "labels").iterdir()) == [
      "000000.label", "000001.label", "000002.label"]
  for f in ("poses.txt", "times.txt", "calib.txt"):
    assert (seq / f).is_file()
  assert not (root / "sequences" / "11" / "labels").exists()  # test split: no labels
  # the two files of a scan agree in length, in bytes
  n = (seq / "velodyne" / "000001.bin").stat().st_size // 16
  assert (seq / "labels" / "000001.label").stat().st_size == 4 * n


def test_reader_on_synthetic_sequence(root):
  train = sk.SemanticKITTI(root, "train")
  assert len(train) == 3 and [s.frame for s in train.scans] == ["000000", "000001", "000002"]
  ex = train[1]
  assert ex["name"] == "00/000001"
  assert ex["coord"].dtype == np.float32 and ex["coord"].shape[1] == 3
  n = len(ex["coord"])
  assert 3000 < n < 20000 and ex["strength"].shape == (n, 1)
  assert ex["label"].shape == ex["raw_label"].shape == ex["instance"].shape == (n,)
  assert 0 <= ex["strength"].min() and ex["strength"].max() < 1
  # the scan is in the sensor frame: ranges within the sensor's, road 1.73 m below
  r = np.linalg.norm(ex["coord"], axis=1)
  assert r.min() > scenes.LIDAR_RANGE[0] - 0.1 and r.max() < scenes.LIDAR_RANGE[1] + 0.1
  road = ex["raw_label"] == 40
  assert abs(np.median(ex["coord"][road, 2]) + scenes.LIDAR_HEIGHT) < 0.05
  # raw ids are those of the mapping; training ids of present classes
  assert set(np.unique(ex["raw_label"])) <= set(synthetic.LIDAR_TO_SEMANTIC_KITTI.values()) | {
      synthetic.MOVING_CAR}
  want = {sk.CLASS_NAMES.index(c) + 1 for c in ("road", "sidewalk", "building", "car")}
  assert want <= set(np.unique(ex["label"]))
  np.testing.assert_array_equal(ex["label"], sk.learning_map(ex["raw_label"]))
  # car instances: only on cars, several of them
  car = np.isin(ex["raw_label"], [10, 252])
  assert np.all(ex["instance"][~car] == 0) and len(np.unique(ex["instance"][car])) >= 3


def test_reader_matches_the_generator(root):
  scan = synthetic.lidar_scan("00", 2, seed=0, az_steps=256)
  ex = sk.SemanticKITTI(root, ["00"])[2]
  np.testing.assert_array_equal(ex["coord"], scan["points"][:, :3])
  np.testing.assert_array_equal(ex["strength"][:, 0], scan["points"][:, 3])
  np.testing.assert_array_equal(ex["raw_label"], scan["semantic"])
  np.testing.assert_array_equal(ex["instance"], scan["instance"])


def test_poses_follow_the_street(root):
  poses = sk.read_poses(root / "sequences" / "00" / "poses.txt")
  assert poses.shape == (3, 4, 4)
  np.testing.assert_array_equal(poses[:, :3, :3], np.tile(np.eye(3), (3, 1, 1)))
  np.testing.assert_allclose(poses[:, 0, 3], [0.0, scenes.SWEEP_SPACING, 2 * scenes.SWEEP_SPACING])
  # static scene points line up across scans once the poses are applied
  a, b = (sk.SemanticKITTI(root, ["00"])[i] for i in (0, 1))
  pa = a["coord"][a["raw_label"] == 50] + poses[0, :3, 3]
  pb = b["coord"][b["raw_label"] == 50] + poses[1, :3, 3]
  va = set(map(tuple, np.floor(pa / 0.5).astype(int).tolist()))
  vb = set(map(tuple, np.floor(pb / 0.5).astype(int).tolist()))
  assert len(va & vb) > 0.3 * min(len(va), len(vb))


def test_splits_and_missing_labels(root):
  assert len(sk.SemanticKITTI(root, "valid")) == 1
  test = sk.SemanticKITTI(root, "test")
  assert len(test) == 1 and test.scans[0].label is None
  assert np.all(test[0]["label"] == 0)
  assert len(sk.SemanticKITTI(root, [0, 8])) == 4
  assert sk.scans(root, ["05"]) == []


def test_label_count_mismatch_is_an_error(tmp_path):
  kitti.write_velodyne(tmp_path / "sequences/00/velodyne/000000.bin", np.zeros((3, 4)))
  sk.write_label(tmp_path / "sequences/00/labels/000000.label", [40, 40])
  with pytest.raises(ValueError, match="2 labels for 3 points"):
    sk.SemanticKITTI(tmp_path, ["00"])[0]


def test_synthetic_is_deterministic(tmp_path, root):
  synthetic.write_semantic_kitti(tmp_path, {"00": 1}, seed=0, az_steps=256)
  for sub in ("velodyne/000000.bin", "labels/000000.label"):
    assert (tmp_path / "sequences/00" / sub).read_bytes() == \
        (root / "sequences/00" / sub).read_bytes()
  first = (root / "sequences/00/poses.txt").read_text().splitlines()[0]
  assert (tmp_path / "sequences/00/poses.txt").read_text() == first + "\n"
