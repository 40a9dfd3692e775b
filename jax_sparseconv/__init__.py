"""jax_sparseconv: sparse 3D convolution for JAX, matching Open3D-ML's SparseConv.

Flax Linen layers live in :mod:`jax_sparseconv.linen`, so importing this package
does not import Flax.
"""

from jax_sparseconv._src.backend import get_kernel_backend as get_kernel_backend
from jax_sparseconv._src.backend import kernel_backend as kernel_backend
from jax_sparseconv._src.backend import kernel_builds as kernel_builds
from jax_sparseconv._src.backend import set_kernel_backend as set_kernel_backend
from jax_sparseconv._src.conv import sparse_conv as sparse_conv
from jax_sparseconv._src.conv import sparse_conv_transpose as sparse_conv_transpose
from jax_sparseconv._src.errors import ErrorCode as ErrorCode
from jax_sparseconv._src.errors import InvalidInputError as InvalidInputError
from jax_sparseconv._src.errors import error_mode as error_mode
from jax_sparseconv._src.errors import get_error_mode as get_error_mode
from jax_sparseconv._src.errors import set_error_mode as set_error_mode
from jax_sparseconv._src.export import export_disabled_checks as export_disabled_checks
from jax_sparseconv._src.export import export_mode as export_mode
from jax_sparseconv._src.gather_matmul import CHUNK_BYTES as CHUNK_BYTES
from jax_sparseconv._src.kernel_map import KernelMap as KernelMap
from jax_sparseconv._src.kernel_map import build_kernel_map as build_kernel_map
from jax_sparseconv._src.memory import ResourceLimitError as ResourceLimitError
from jax_sparseconv._src.memory import compile_checked as compile_checked
from jax_sparseconv._src.morton import morton_decode as morton_decode
from jax_sparseconv._src.morton import morton_encode as morton_encode
from jax_sparseconv._src.tensor import SparseTensor as SparseTensor
from jax_sparseconv._src.voxelize import Coarse as Coarse
from jax_sparseconv._src.voxelize import PackedCoarse as PackedCoarse
from jax_sparseconv._src.voxelize import PackedVoxels as PackedVoxels
from jax_sparseconv._src.voxelize import Voxels as Voxels
from jax_sparseconv._src.voxelize import downsample as downsample
from jax_sparseconv._src.voxelize import unique_voxels as unique_voxels
from jax_sparseconv._src.voxelize import voxelize as voxelize

__version__ = "0.1.0"
