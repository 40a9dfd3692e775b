"""Synthetic scenes (no downloads, NumPy only, deterministic in a seed).

Four kinds of voxel cloud, each as unique float32 voxel centres ``(i + 0.5) * vs``
(``*_voxels``, in lexicographic index order) and, where it makes sense, as raw points
(``*_points``). Neighbours are occupied voxels of the 27 at ``K=3``, the voxel itself
included; extents are in voxels per axis, for ``voxel_size=0.05`` and seed 0.

* :func:`surface_voxels` ("compact", :mod:`.surfaces`): a floor, two spheres and a box
  shell, scaled to the size asked for: ~15.5 neighbours, 164 x 164 x 82 at 100k voxels.
* :func:`lidar_voxels` ("outdoor", :mod:`.lidar`): a street scanned by a simulated
  spinning 64-beam LiDAR: thin surfaces, density falling with range, ~5 neighbours,
  ~3400 x 2700 x 120 at 100k voxels (merged sweeps at 1M: ~8 neighbours,
  ~6200 x 2700 x 120). :func:`lidar_points` gives the points with a label per point
  (:data:`LIDAR_LABELS`), :func:`lidar_sweep` one whole scan (a revolution) anywhere
  along the street, with car instance ids.
* :func:`spread_voxels` ("spread", :mod:`.surfaces`): small shapes spread out in a
  fixed 400 x 400 x 360 volume: ~12 neighbours at any size.
* :func:`room_voxels` ("indoor", :mod:`.rooms`): an office floor of furnished rooms
  (floor, walls, tables, chairs, balls, columns): ~15 neighbours, 2.4 m high.
  :func:`room_points` gives one labelled, coloured room (:data:`ROOM_LABELS`).

:data:`CLOUDS` maps the bench's names to the ``*_voxels`` generators and
:func:`cloud_stats` measures a cloud (size, extent, neighbours). The voxel helpers the
generators share are in ``_voxels.py``.

No module of this subpackage imports jax, nor anything of ``jax_sparseconv`` outside
it (imports inside it are relative), so it can be loaded by file path from an
environment without jax (``bench/open3d_bench.py`` does, in Open3D's environment),
without running ``jax_sparseconv/__init__.py``::

  import importlib.util, sys
  path = ".../jax_sparseconv/scenes"  # this folder
  spec = importlib.util.spec_from_file_location(
      "scenes", path + "/__init__.py", submodule_search_locations=[path])
  scenes = importlib.util.module_from_spec(spec)
  sys.modules["scenes"] = scenes  # before exec: the relative imports look the package up
  spec.loader.exec_module(scenes)
  scenes.lidar_voxels(10_000)

Any module name unused in ``sys.modules`` works in place of ``"scenes"`` (the
submodules become ``scenes.lidar`` etc.).
"""

from __future__ import annotations

from ._voxels import cloud_stats
from .lidar import (CAR_IDS_PER_BLOCK, CROSSING_P, CROSSING_W, HEDGE_P, LIDAR_ELEVATIONS,
                    LIDAR_HEIGHT, LIDAR_LABELS, LIDAR_RANGE, LIDAR_WEDGES, RANGE_NOISE,
                    SWEEP_SPACING, Sweep, lidar_points, lidar_sweep, lidar_voxels)
from .rooms import ROOM_LABELS, ROOM_PITCH, ROOMS_PER_ROW, room_points, room_voxels
from .surfaces import (SPREAD_THICKNESS, SPREAD_VOLUME, spread_voxels, surface_points,
                       surface_voxels)

#: The voxel-cloud generators by the name ``bench/run.py`` gives them (``--clouds``).
CLOUDS = {"compact": surface_voxels, "spread": spread_voxels, "outdoor": lidar_voxels,
          "indoor": room_voxels}

__all__ = [
    "CAR_IDS_PER_BLOCK", "CLOUDS", "CROSSING_P", "CROSSING_W", "HEDGE_P",
    "LIDAR_ELEVATIONS", "LIDAR_HEIGHT", "LIDAR_LABELS", "LIDAR_RANGE", "LIDAR_WEDGES",
    "RANGE_NOISE", "ROOMS_PER_ROW", "ROOM_LABELS", "ROOM_PITCH", "SPREAD_THICKNESS",
    "SPREAD_VOLUME", "SWEEP_SPACING", "Sweep", "cloud_stats", "lidar_points", "lidar_sweep",
    "lidar_voxels", "room_points", "room_voxels", "spread_voxels", "surface_points",
    "surface_voxels",
]
