"""Networks built on jax_sparseconv: Open3D-ML's ``SparseConvUnet`` in Flax Linen.

>>> from jax_sparseconv.models import SparseConvUnet, open3d_ml_variables
>>> from jax_sparseconv.models import load_open3d_ml_checkpoint, open3d_ml_preprocess

``SparseConvUnet`` has Open3D-ML's names, defaults and weights; its building blocks
(:mod:`jax_sparseconv.models.layers`) are public too. Importing this package imports Flax.
"""

from jax_sparseconv.models.checkpoint import load_open3d_ml_checkpoint as load_open3d_ml_checkpoint
from jax_sparseconv.models.checkpoint import open3d_ml_variables as open3d_ml_variables
from jax_sparseconv.models.checkpoint import read_torch_file as read_torch_file
from jax_sparseconv.models.checkpoint import to_open3d_ml_state_dict as to_open3d_ml_state_dict
from jax_sparseconv.models.layers import Convolution as Convolution
from jax_sparseconv.models.layers import DeConvolution as DeConvolution
from jax_sparseconv.models.layers import LevelMaps as LevelMaps
from jax_sparseconv.models.layers import NetworkInNetwork as NetworkInNetwork
from jax_sparseconv.models.layers import ResidualBlock as ResidualBlock
from jax_sparseconv.models.layers import SparseBatchNorm as SparseBatchNorm
from jax_sparseconv.models.layers import SubmanifoldSparseConv as SubmanifoldSparseConv
from jax_sparseconv.models.layers import LevelVoxels as LevelVoxels
from jax_sparseconv.models.layers import calculate_grid as calculate_grid
from jax_sparseconv.models.layers import input_layer as input_layer
from jax_sparseconv.models.layers import level_kernel_maps as level_kernel_maps
from jax_sparseconv.models.layers import output_layer as output_layer
from jax_sparseconv.models.sparseconvunet import NUM_LEVELS as NUM_LEVELS
from jax_sparseconv.models.sparseconvunet import SparseConvUnet as SparseConvUnet
from jax_sparseconv.models.sparseconvunet import UNet as UNet
from jax_sparseconv.models.sparseconvunet import open3d_ml_preprocess as open3d_ml_preprocess
from jax_sparseconv.models.sparseconvunet import unet_layout as unet_layout
from jax_sparseconv.models.sparseconvunet import unet_level_sizes as unet_level_sizes
