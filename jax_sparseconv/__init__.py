"""jax_sparseconv: sparse 3D convolution for JAX, matching Open3D-ML's SparseConv.

Flax Linen layers live in :mod:`jax_sparseconv.linen`, so importing this package
does not import Flax.
"""

from jax_sparseconv._src.gather_matmul import CHUNK_BYTES as CHUNK_BYTES
from jax_sparseconv._src.conv import sparse_conv as sparse_conv
from jax_sparseconv._src.conv import sparse_conv_transpose as sparse_conv_transpose
from jax_sparseconv._src.kernel_map import KernelMap as KernelMap
from jax_sparseconv._src.kernels import get_kernel_backend as get_kernel_backend
from jax_sparseconv._src.kernels import kernel_builds as kernel_builds
from jax_sparseconv._src.kernels import set_kernel_backend as set_kernel_backend
from jax_sparseconv._src.kernel_map import build_kernel_map as build_kernel_map
from jax_sparseconv._src.morton import morton_decode as morton_decode
from jax_sparseconv._src.morton import morton_encode as morton_encode
from jax_sparseconv._src.voxelize import downsample as downsample
from jax_sparseconv._src.voxelize import unique_voxels as unique_voxels
from jax_sparseconv._src.voxelize import voxelize as voxelize

__version__ = "0.1.0"
