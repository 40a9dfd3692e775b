"""Networks built on jax_sparseconv, in Flax Linen, with their zoos' names, defaults and
weights.

* Open3D-ML's ``SparseConvUnet`` (:mod:`~jax_sparseconv.models.sparseconvunet`).
* OpenPCDet's ``VoxelBackBone8x`` (SECOND) and ``VoxelResBackBone8x`` (CenterPoint) with
  ``HeightCompression`` and ``MeanVFE`` (:mod:`~jax_sparseconv.models.openpcdet`).
* Pointcept's ``SpUNet-v1m1`` (:mod:`~jax_sparseconv.models.pointcept`).
* MinkowskiEngine's / SPVNAS's ``MinkUNet`` (:mod:`~jax_sparseconv.models.minkunet`).

>>> from jax_sparseconv.models import SparseConvUnet, open3d_ml_variables
>>> from jax_sparseconv.models import (VoxelBackBone8x, VoxelResBackBone8x, SpUNet, mean_vfe,
...                                    load_torch_checkpoint, openpcdet_variables,
...                                    pointcept_variables)

Importing this package imports Flax.
"""

from jax_sparseconv.models.checkpoint import load_open3d_ml_checkpoint as load_open3d_ml_checkpoint
from jax_sparseconv.models.checkpoint import open3d_ml_variables as open3d_ml_variables
from jax_sparseconv.models.checkpoint import to_open3d_ml_state_dict as to_open3d_ml_state_dict
from jax_sparseconv.models.layers import Convolution as Convolution
from jax_sparseconv.models.layers import DeConvolution as DeConvolution
from jax_sparseconv.models.layers import NetworkInNetwork as NetworkInNetwork
from jax_sparseconv.models.layers import Open3DMaps as Open3DMaps
from jax_sparseconv.models.layers import Open3DVoxels as Open3DVoxels
from jax_sparseconv.models.layers import ResidualBlock as ResidualBlock
from jax_sparseconv.models.layers import SparseBatchNorm as SparseBatchNorm
from jax_sparseconv.models.layers import SubmanifoldSparseConv as SubmanifoldSparseConv
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
from jax_sparseconv.models.torch_file import load_torch_checkpoint as load_torch_checkpoint
from jax_sparseconv.models.torch_file import read_torch_file as read_torch_file
from jax_sparseconv.models.torch_file import strip_prefixes as strip_prefixes
from jax_sparseconv.models.openpcdet import VoxelBackBone8x as VoxelBackBone8x
from jax_sparseconv.models.openpcdet import VoxelResBackBone8x as VoxelResBackBone8x
from jax_sparseconv.models.openpcdet import height_compression as height_compression
from jax_sparseconv.models.openpcdet import mean_vfe as mean_vfe
from jax_sparseconv.models.pointcept import SpUNet as SpUNet
from jax_sparseconv.models.pointcept import offset_to_batch as offset_to_batch
from jax_sparseconv.models.spconv_weights import openpcdet_variables as openpcdet_variables
from jax_sparseconv.models.spconv_weights import pointcept_variables as pointcept_variables
from jax_sparseconv.models.spconv_weights import spconv_kernel as spconv_kernel
from jax_sparseconv.models.spconv_weights import spconv_variables as spconv_variables
from jax_sparseconv.models.spconv_weights import to_spconv_state_dict as to_spconv_state_dict
from jax_sparseconv.models.minkunet import ME_MODELS as ME_MODELS
from jax_sparseconv.models.minkunet import MinkUNet as MinkUNet
from jax_sparseconv.models.minkunet import MinkUNet14 as MinkUNet14
from jax_sparseconv.models.minkunet import MinkUNet14A as MinkUNet14A
from jax_sparseconv.models.minkunet import MinkUNet14B as MinkUNet14B
from jax_sparseconv.models.minkunet import MinkUNet14C as MinkUNet14C
from jax_sparseconv.models.minkunet import MinkUNet14D as MinkUNet14D
from jax_sparseconv.models.minkunet import MinkUNet18 as MinkUNet18
from jax_sparseconv.models.minkunet import MinkUNet18A as MinkUNet18A
from jax_sparseconv.models.minkunet import MinkUNet18B as MinkUNet18B
from jax_sparseconv.models.minkunet import MinkUNet18D as MinkUNet18D
from jax_sparseconv.models.minkunet import MinkUNet34 as MinkUNet34
from jax_sparseconv.models.minkunet import MinkUNet34A as MinkUNet34A
from jax_sparseconv.models.minkunet import MinkUNet34B as MinkUNet34B
from jax_sparseconv.models.minkunet import MinkUNet34C as MinkUNet34C
from jax_sparseconv.models.minkunet import MinkUNet50 as MinkUNet50
from jax_sparseconv.models.minkunet import MinkUNet101 as MinkUNet101
from jax_sparseconv.models.minkunet import SPVNASMinkUNet as SPVNASMinkUNet
from jax_sparseconv.models.minkunet import slice_points as slice_points
from jax_sparseconv.models.minkunet import spvnas_quantize as spvnas_quantize
from jax_sparseconv.models.minkunet import tensor_field_quantize as tensor_field_quantize
from jax_sparseconv.models.minkowski_weights import minkowski_config as minkowski_config
from jax_sparseconv.models.minkowski_weights import minkowski_variables as minkowski_variables
from jax_sparseconv.models.minkowski_weights import spvnas_config as spvnas_config
from jax_sparseconv.models.minkowski_weights import to_minkowski_state_dict as to_minkowski_state_dict
from jax_sparseconv.models.minkowski_weights import to_torchsparse_state_dict as to_torchsparse_state_dict
from jax_sparseconv.models.minkowski_weights import torchsparse_variables as torchsparse_variables
