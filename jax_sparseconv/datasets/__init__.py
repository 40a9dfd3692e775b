"""Point-cloud data sets on disk: readers, writers of small synthetic sets, an input pipeline.

NumPy only, no download: the readers, the per-cloud transforms and the pipeline use
no jax themselves (importing them runs ``jax_sparseconv/__init__.py``, which imports
jax, but nothing here calls it); they run on the host, in loader threads or
processes, and hand the device fixed-shape NumPy batches.

Formats (each a module; readers return dicts of NumPy arrays, *clouds*):

* :mod:`.semantic_kitti`: ``sequences/XX/velodyne/NNNNNN.bin`` (float32 x, y, z,
  remission) and ``labels/NNNNNN.label`` (uint32 ``semantic | instance << 16``); the
  19-class :data:`~.semantic_kitti.LEARNING_MAP` and its inverse, the standard
  :data:`~.semantic_kitti.SPLITS` (train 00-07, 09, 10; valid 08; test 11-21);
  :class:`~.semantic_kitti.SemanticKITTI`, a random-access source.
* :mod:`.kitti`: KITTI object benchmark ``{training,testing}/velodyne/*.bin``;
  :class:`~.kitti.KittiObject`.
* :mod:`.nuscenes`: nuScenes ``LIDAR_TOP`` ``.pcd.bin`` (5 float32: x, y, z, intensity,
  ring) and lidarseg ``.bin`` (uint8); :class:`~.nuscenes.NuScenesLidar`.
* :mod:`.scannet`: ScanNet v2 as Pointcept preprocesses it (``coord.npy``,
  ``color.npy``, ``normal.npy``, ``segment20.npy``, ...);
  :class:`~.scannet.PointceptScanNet`.
* :mod:`.ply`: PLY in ascii, binary little and big endian (any element, list
  properties); :func:`~.ply.read_ply_cloud` / :func:`~.ply.write_ply_cloud`.

:mod:`.synthetic` writes small data sets in exactly these formats from the scene
generators of :mod:`jax_sparseconv.scenes` (a SemanticKITTI-style sequence of the
simulated LiDAR with its labels, KITTI / nuScenes scans, Pointcept ScanNet rooms, PLY
rooms): what the tests and the examples read.

:mod:`.transforms` are plain functions of a cloud and an explicit random generator
(crop to a range, random rotation / flip / scale / jitter, voxelise to a capacity,
a label per voxel, pad or pack a batch); :mod:`.pipeline` batches a source through
them, deterministically and resumably: batch ``step`` is a pure function of
``(seed, step)`` (its state is ``(epoch, position)``, ``step = epoch *
steps_per_epoch + position``), so restarting at a step gives the same batches.

Capacity rule (nothing is dropped silently). :func:`~.transforms.voxelize` keeps the
first ``capacity`` voxels in the library's Morton order (the rule of
:func:`jax_sparseconv.voxelize`) and reports the rest in ``overflow``; the dropped
voxels' points get ``inverse == -1``. :func:`~.transforms.pad_batch` /
:func:`~.transforms.pack_batch` raise when a cloud does not fit (``on_overflow=
"raise"``, the default) or, with ``"truncate"``, cut it and count the rows cut per
cloud in ``dropped``. Every batch carries ``count`` (valid rows) and ``valid`` (the
same as a bool mask): pass either as ``valid=`` to the library.

Why the pipeline does not need ``grain``: a JAX input pipeline has to be
deterministic and resumable, and here that is a property of the indexing (batch
``step`` is computed from ``(seed, step)``, nothing else) rather than of a loader's
checkpointed iterator state. A random-access :class:`~.pipeline.Pipeline` (``len``,
``[step]``) works on a plain Python loop, in tests, and under any loader.
`grain <https://github.com/google/grain>`_ is what JAX users reach for to prefetch
in threads or processes, so :func:`~.pipeline.grain_dataset` hands the same batches
to it (a ``MapDataset`` over the steps, its iterator checkpointable with
``get_state`` / ``set_state``), as an optional extra: grain pulls in array_record,
cloudpickle, portpicker, protobuf and, when imported, jax, which a reader of ``.bin``
files does not need, and its process workers need absl flags parsed. The batches are
the same bit for bit with or without it (tested, with grain 0.2.18).

Usage (training on a SemanticKITTI-format folder; :mod:`.synthetic` writes one)::

  import functools
  from jax_sparseconv import datasets as D

  D.synthetic.write_semantic_kitti("/tmp/skitti", {"00": 4, "08": 2})   # or real data
  train = D.SemanticKITTI("/tmp/skitti", "train")      # ds[i]: coord, strength, label, ...
  make = functools.partial(
      D.voxel_example, voxel_size=0.1, feat_keys=("strength",),
      label_key="label", ignore_index=D.semantic_kitti.IGNORE_INDEX,   # 0: unlabelled
      point_cloud_range=(-51.2, -51.2, -4.0, 51.2, 51.2, 2.4),
      augmentation=dict(rotation=3.1416, scale=(0.95, 1.05)), capacity=40_000)
  pipe = D.Pipeline(train, make, batch_size=2, capacity=40_000, seed=0,
                    collate="pad", num_epochs=10)
  for batch in pipe.batches(start_step=restored_step):   # resume: the same batches
    # batch["positions"] (B, 40000, 3) NaN-padded, batch["feats"] (B, 40000, 1),
    # batch["labels"] (B, 40000) int32 0..19 (0 ignored; padding 0), batch["count"] (B,),
    # batch["valid"] (B, 40000) bool, batch["overflow"] (B,) voxels dropped (0 here)
    # batch["step"], batch["epoch"], batch["position"]: the state to checkpoint
    ...

  # evaluation: no augmentation, no shuffle
  val = D.Pipeline(D.SemanticKITTI("/tmp/skitti", "valid"),
                   functools.partial(make, augmentation=None),
                   batch_size=1, capacity=40_000, shuffle=False)

The 19 classes are :data:`~.semantic_kitti.CLASS_NAMES`; labels are training ids 1..19
with 0 unlabelled; :func:`~.semantic_kitti.to_zero_based` gives 0..18 with -1 ignored.
"""

from __future__ import annotations

from . import kitti, nuscenes, pipeline, ply, scannet, semantic_kitti, synthetic, transforms
from .kitti import (KittiObject, kitti_object_scans, read_kitti_object_velodyne, read_velodyne,
                    write_velodyne)
from .nuscenes import (NuScenesLidar, lidar_files, read_nuscenes_lidar, read_nuscenes_lidarseg,
                       write_nuscenes_lidar, write_nuscenes_lidarseg)
from .pipeline import Pipeline, PipelineState, epoch_order, grain_dataset
from .ply import read_ply, read_ply_cloud, read_ply_header, write_ply, write_ply_cloud
from .scannet import PointceptScanNet, read_scene, scene_folders, write_scene
from .semantic_kitti import (SemanticKITTI, learning_map, learning_map_inv, read_label,
                             write_label)
from .transforms import (HostVoxels, as_generator, augment, crop, crop_mask, example_rng,
                         pack_batch, pad_batch, point_example, voxel_example, voxel_labels,
                         voxelize)

__all__ = [
    "HostVoxels", "KittiObject", "NuScenesLidar", "Pipeline", "PipelineState",
    "PointceptScanNet", "SemanticKITTI", "as_generator", "augment", "crop", "crop_mask",
    "epoch_order", "example_rng", "grain_dataset", "kitti", "kitti_object_scans",
    "learning_map", "learning_map_inv", "lidar_files", "nuscenes", "pack_batch", "pad_batch",
    "pipeline", "ply", "point_example", "read_kitti_object_velodyne", "read_label",
    "read_nuscenes_lidar", "read_nuscenes_lidarseg", "read_ply", "read_ply_cloud",
    "read_ply_header", "read_scene", "read_velodyne", "scannet", "scene_folders",
    "semantic_kitti", "synthetic", "transforms", "voxel_example", "voxel_labels", "voxelize",
    "write_label", "write_nuscenes_lidar", "write_nuscenes_lidarseg", "write_ply",
    "write_ply_cloud", "write_scene", "write_velodyne",
]
