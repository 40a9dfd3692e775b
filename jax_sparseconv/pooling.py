"""Sparse pooling next to the convs: max/avg/sum pooling over voxel windows (spconv's
``SparseMaxPool3d`` / ``SparseAvgPool3d``, MinkowskiEngine's sum pooling, Open3D's
``VoxelPooling``) on positions or on levels, unpooling, trilinear devoxelisation (voxels
-> points, TorchSparse's ``spdevoxelize``), and global max/avg pooling per cloud for
packed batches and padded sets.

>>> import jax.numpy as jnp
>>> from jax_sparseconv.pooling import sparse_max_pool, global_avg_pool
>>> pos = jnp.array([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5]])
>>> feats, coarse, count = sparse_max_pool(jnp.array([[1.0], [3.0], [2.0]]), pos, 1.0, 2)
>>> int(count), feats[:2, 0].tolist(), global_avg_pool(feats, valid=count).tolist()
(2, [3.0, 2.0], [2.5])
"""

from jax_sparseconv._src.pooling import devoxelize as devoxelize
from jax_sparseconv._src.pooling import global_avg_pool as global_avg_pool
from jax_sparseconv._src.pooling import global_max_pool as global_max_pool
from jax_sparseconv._src.pooling import level_pool as level_pool
from jax_sparseconv._src.pooling import sparse_avg_pool as sparse_avg_pool
from jax_sparseconv._src.pooling import sparse_max_pool as sparse_max_pool
from jax_sparseconv._src.pooling import sparse_sum_pool as sparse_sum_pool
from jax_sparseconv._src.pooling import unpool as unpool

__all__ = ["sparse_max_pool", "sparse_avg_pool", "sparse_sum_pool", "level_pool", "unpool",
           "devoxelize", "global_max_pool", "global_avg_pool"]
