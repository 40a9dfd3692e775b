"""MinkowskiEngine's MinkUNet and SPVNAS's MinkUNet, written again in torch + spconv 2.3.8.

Written for these reference cases (no zoo code copied): the module names, their nesting and
the layer arithmetic follow

* MinkowskiEngine v0.5.4 ``examples/minkunet.py`` (``MinkUNetBase`` and the 14/18/34/50/101
  variants, A-D planes), ``examples/resnet.py`` (``ResNetBase._make_layer``) and
  ``MinkowskiEngine/modules/resnet_block.py`` (``BasicBlock``, ``Bottleneck``);
* SPVNAS ``core/models/semantic_kitti/minkunet.py`` (``MinkUNet(num_classes, cr)``,
  ``BasicConvolutionBlock``, ``BasicDeconvolutionBlock``, ``ResidualBlock``).

so ``state_dict()`` has the originals' keys except the conv parameter name and shape: here
every sparse conv holds spconv's ``weight`` ``(Cout, k0, k1, k2, Cin)`` (kernel axis ``k_a``
acts on index column ``d_a``; the index columns are ``(b, x, y, z)``), where ME and
TorchSparse hold ``kernel`` ``(K^3, Cin, Cout)``. ``layouts.py`` converts.

How each op is realised with spconv (all equivalences checked against the live
MinkowskiEngine 0.5.4 CPU build, see README.md):

* stride-1 conv, odd K (ME ``MinkowskiConvolution(k, stride=1)``, TS ``Conv3d(k)``): output
  on the input coordinates, window ``o + (k - K//2)`` -> ``spconv.SubMConv3d``.
* k2 s2 conv: output coordinates ``floor(c / 2)`` (ME and TS 1.4 keep them multiplied back
  by the stride: ``floor(c / 2s) * 2s``), inputs ``2o + {0, 1}`` per axis ->
  ``spconv.SparseConv3d(k=2, s=2, p=0)``, exact for non-negative indices and a spatial shape
  divisible by 16 (spconv drops the last plane of an odd extent).
* k2 s2 transposed conv onto the finer cached coordinates: the same (fine, coarse, slot)
  pairs as the forward conv -> ``spconv.SparseInverseConv3d(indice_key=<that conv's key>)``.
* kernel-1 stride-1 conv (ME ``kernel (Cin, Cout)``, ``x @ kernel``): :class:`Linear1x1`, a
  plain ``x @ W.reshape(Cout, Cin).T``. spconv's own ``SubMConv3d(k=1)`` is NOT used: in
  spconv 2.x it computes ``x @ weight.view(Cin, Cout)`` (traveller59/spconv#450). So the
  ``weight (Cout, 1, 1, 1, Cin)`` of a k1 layer in our spconv-layout dict is textbook.

CPU quirks (see /work/shared/REFERENCE-spconv.md): call :func:`setup_spconv_cpu` first
(``torch.set_num_threads(1)``); use :func:`set_mode` to get eval (BatchNorm running stats;
the spconv convs stay in train mode, which changes nothing for them) or train mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import spconv.pytorch as spconv


def setup_spconv_cpu():
  torch.set_num_threads(1)  # the CPU wheel is wrong/nondeterministic with more threads
  import spconv.pytorch.ops as ops
  ops.get_current_stream = lambda: 0  # its CPU backward asks CUDA for a stream


def set_mode(net: nn.Module, train: bool):
  """train=False: BatchNorm uses running stats; spconv convs kept in train mode (no-op)."""
  net.train(True)
  if not train:
    for m in net.modules():
      if isinstance(m, nn.BatchNorm1d):
        m.eval()
  return net


def _feat(x, f):
  return x.replace_feature(f)


# --------------------------------------------------------------------------- basic modules
class Linear1x1(nn.Module):
  """A kernel-1 stride-1 sparse conv, textbook semantics, spconv-shaped weight."""

  def __init__(self, cin, cout, bias=False):
    super().__init__()
    self.in_channels, self.out_channels = cin, cout
    self.weight = nn.Parameter(torch.empty(cout, 1, 1, 1, cin))
    self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
    nn.init.kaiming_uniform_(self.weight.view(cout, cin), a=5 ** 0.5)

  def forward(self, x):
    y = x.features @ self.weight.reshape(self.out_channels, self.in_channels).t()
    if self.bias is not None:
      y = y + self.bias
    return _feat(x, y)


def sparse_conv(cin, cout, kernel_size, stride=1, dilation=1, bias=False, transposed=False,
                level=1):
  """The spconv op equal to an ME / TorchSparse conv at tensor stride ``level``.

  ``level`` is the input's tensor stride for a conv, the OUTPUT (finer) stride for a
  transposed conv; the k2 s2 pair shares the indice key ``down{fine stride}``.
  """
  if kernel_size == 1 and stride == 1:
    return Linear1x1(cin, cout, bias=bias)
  if stride == 1 and not transposed:
    assert kernel_size % 2 == 1, "even-K submanifold windows differ between ME/TS and spconv"
    return spconv.SubMConv3d(cin, cout, kernel_size, dilation=dilation, bias=bias,
                             indice_key=f"subm{level}_k{kernel_size}_d{dilation}")
  assert kernel_size == 2 and stride == 2 and dilation == 1, (kernel_size, stride, dilation)
  if transposed:
    return spconv.SparseInverseConv3d(cin, cout, 2, indice_key=f"down{level}", bias=bias)
  return spconv.SparseConv3d(cin, cout, 2, stride=2, padding=0, bias=bias,
                             indice_key=f"down{level}")


class MinkowskiBatchNorm(nn.Module):
  """ME's wrapper: the torch BatchNorm1d sits at ``.bn`` (keys ``*.bn.weight`` ...)."""

  def __init__(self, num_features, eps=1e-5, momentum=0.1):
    super().__init__()
    self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)

  def forward(self, x):
    return _feat(x, self.bn(x.features))


class BatchNorm(nn.BatchNorm1d):
  """TorchSparse ``spnn.BatchNorm``: a BatchNorm1d subclass (keys ``*.weight`` ...)."""

  def forward(self, x):
    return _feat(x, super().forward(x.features))


class ReLU(nn.Module):
  def __init__(self, inplace=True):
    super().__init__()

  def forward(self, x):
    return _feat(x, F.relu(x.features))


def cat(*xs):
  """ME.cat / torchsparse.cat: channels concatenated in argument order, same rows."""
  return _feat(xs[0], torch.cat([x.features for x in xs], dim=1))


def add(a, b):
  return _feat(a, a.features + b.features)


# --------------------------------------------------------------------------- ME MinkUNet
class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None,
               bn_momentum=0.1, dimension=3, level=1):
    super().__init__()
    assert stride == 1
    self.conv1 = sparse_conv(inplanes, planes, 3, dilation=dilation, level=level)
    self.norm1 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
    self.conv2 = sparse_conv(planes, planes, 3, dilation=dilation, level=level)
    self.norm2 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
    self.relu = ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.norm1(self.conv1(x)))
    out = self.norm2(self.conv2(out))
    residual = self.downsample(x) if self.downsample is not None else x
    return self.relu(add(out, residual))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None,
               bn_momentum=0.1, dimension=3, level=1):
    super().__init__()
    assert stride == 1
    self.conv1 = sparse_conv(inplanes, planes, 1, level=level)
    self.norm1 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
    self.conv2 = sparse_conv(planes, planes, 3, dilation=dilation, level=level)
    self.norm2 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
    self.conv3 = sparse_conv(planes, planes * self.expansion, 1, level=level)
    self.norm3 = MinkowskiBatchNorm(planes * self.expansion, momentum=bn_momentum)
    self.relu = ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.norm1(self.conv1(x)))
    out = self.relu(self.norm2(self.conv2(out)))
    out = self.norm3(self.conv3(out))
    residual = self.downsample(x) if self.downsample is not None else x
    return self.relu(add(out, residual))


class MinkUNetBase(nn.Module):
  """ME's MinkUNetBase. ``planes`` / ``init_dim`` / ``layers`` override the class attributes
  (reduced widths for the CI cases); ``D`` must be 3."""

  BLOCK = None
  DILATIONS = (1, 1, 1, 1, 1, 1, 1, 1)
  LAYERS = (2, 2, 2, 2, 2, 2, 2, 2)
  PLANES = (32, 64, 128, 256, 256, 128, 96, 96)
  INIT_DIM = 32
  OUT_TENSOR_STRIDE = 1

  def __init__(self, in_channels, out_channels, D=3, planes=None, init_dim=None, layers=None):
    super().__init__()
    assert D == 3
    if planes is not None:
      self.PLANES = tuple(planes)
    if init_dim is not None:
      self.INIT_DIM = int(init_dim)
    if layers is not None:
      self.LAYERS = tuple(layers)
    self.D = D
    self.network_initialization(in_channels, out_channels, D)

  def _make_layer(self, block, planes, blocks, stride=1, dilation=1, bn_momentum=0.1,
                  level=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          sparse_conv(self.inplanes, planes * block.expansion, 1, level=level),
          MinkowskiBatchNorm(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride=stride, dilation=dilation,
                    downsample=downsample, dimension=self.D, level=level)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes, stride=1, dilation=dilation,
                          dimension=self.D, level=level))
    return nn.Sequential(*layers)

  def network_initialization(self, in_channels, out_channels, D):
    P, L, B = self.PLANES, self.LAYERS, self.BLOCK
    self.inplanes = self.INIT_DIM
    self.conv0p1s1 = sparse_conv(in_channels, self.inplanes, 5, level=1)
    self.bn0 = MinkowskiBatchNorm(self.inplanes)

    self.conv1p1s2 = sparse_conv(self.inplanes, self.inplanes, 2, stride=2, level=1)
    self.bn1 = MinkowskiBatchNorm(self.inplanes)
    self.block1 = self._make_layer(B, P[0], L[0], level=2)

    self.conv2p2s2 = sparse_conv(self.inplanes, self.inplanes, 2, stride=2, level=2)
    self.bn2 = MinkowskiBatchNorm(self.inplanes)
    self.block2 = self._make_layer(B, P[1], L[1], level=4)

    self.conv3p4s2 = sparse_conv(self.inplanes, self.inplanes, 2, stride=2, level=4)
    self.bn3 = MinkowskiBatchNorm(self.inplanes)
    self.block3 = self._make_layer(B, P[2], L[2], level=8)

    self.conv4p8s2 = sparse_conv(self.inplanes, self.inplanes, 2, stride=2, level=8)
    self.bn4 = MinkowskiBatchNorm(self.inplanes)
    self.block4 = self._make_layer(B, P[3], L[3], level=16)

    self.convtr4p16s2 = sparse_conv(self.inplanes, P[4], 2, stride=2, transposed=True, level=8)
    self.bntr4 = MinkowskiBatchNorm(P[4])
    self.inplanes = P[4] + P[2] * B.expansion
    self.block5 = self._make_layer(B, P[4], L[4], level=8)

    self.convtr5p8s2 = sparse_conv(self.inplanes, P[5], 2, stride=2, transposed=True, level=4)
    self.bntr5 = MinkowskiBatchNorm(P[5])
    self.inplanes = P[5] + P[1] * B.expansion
    self.block6 = self._make_layer(B, P[5], L[5], level=4)

    self.convtr6p4s2 = sparse_conv(self.inplanes, P[6], 2, stride=2, transposed=True, level=2)
    self.bntr6 = MinkowskiBatchNorm(P[6])
    self.inplanes = P[6] + P[0] * B.expansion
    self.block7 = self._make_layer(B, P[6], L[6], level=2)

    self.convtr7p2s2 = sparse_conv(self.inplanes, P[7], 2, stride=2, transposed=True, level=1)
    self.bntr7 = MinkowskiBatchNorm(P[7])
    self.inplanes = P[7] + self.INIT_DIM
    self.block8 = self._make_layer(B, P[7], L[7], level=1)

    self.final = sparse_conv(P[7] * B.expansion, out_channels, 1, bias=True, level=1)
    self.relu = ReLU(inplace=True)

  def forward(self, x):
    out = self.relu(self.bn0(self.conv0p1s1(x)))
    out_p1 = out
    out = self.relu(self.bn1(self.conv1p1s2(out_p1)))
    out_b1p2 = self.block1(out)
    out = self.relu(self.bn2(self.conv2p2s2(out_b1p2)))
    out_b2p4 = self.block2(out)
    out = self.relu(self.bn3(self.conv3p4s2(out_b2p4)))
    out_b3p8 = self.block3(out)
    out = self.relu(self.bn4(self.conv4p8s2(out_b3p8)))
    out = self.block4(out)

    out = self.relu(self.bntr4(self.convtr4p16s2(out)))
    out = self.block5(cat(out, out_b3p8))
    out = self.relu(self.bntr5(self.convtr5p8s2(out)))
    out = self.block6(cat(out, out_b2p4))
    out = self.relu(self.bntr6(self.convtr6p4s2(out)))
    out = self.block7(cat(out, out_b1p2))
    out = self.relu(self.bntr7(self.convtr7p2s2(out)))
    out = self.block8(cat(out, out_p1))
    return self.final(out)


class MinkUNet14(MinkUNetBase):
  BLOCK = BasicBlock
  LAYERS = (1, 1, 1, 1, 1, 1, 1, 1)


class MinkUNet18(MinkUNetBase):
  BLOCK = BasicBlock
  LAYERS = (2, 2, 2, 2, 2, 2, 2, 2)


class MinkUNet34(MinkUNetBase):
  BLOCK = BasicBlock
  LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


class MinkUNet50(MinkUNetBase):
  BLOCK = Bottleneck
  LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


class MinkUNet101(MinkUNetBase):
  BLOCK = Bottleneck
  LAYERS = (2, 3, 4, 23, 2, 2, 2, 2)


class MinkUNet14A(MinkUNet14):
  PLANES = (32, 64, 128, 256, 128, 128, 96, 96)


class MinkUNet14B(MinkUNet14):
  PLANES = (32, 64, 128, 256, 128, 128, 128, 128)


class MinkUNet14C(MinkUNet14):
  PLANES = (32, 64, 128, 256, 192, 192, 128, 128)


class MinkUNet14D(MinkUNet14):
  PLANES = (32, 64, 128, 256, 384, 384, 384, 384)


class MinkUNet18A(MinkUNet18):
  PLANES = (32, 64, 128, 256, 128, 128, 96, 96)


class MinkUNet18B(MinkUNet18):
  PLANES = (32, 64, 128, 256, 128, 128, 128, 128)


class MinkUNet18D(MinkUNet18):
  PLANES = (32, 64, 128, 256, 384, 384, 384, 384)


class MinkUNet34A(MinkUNet34):
  PLANES = (32, 64, 128, 256, 256, 128, 64, 64)


class MinkUNet34B(MinkUNet34):
  PLANES = (32, 64, 128, 256, 256, 128, 64, 32)


class MinkUNet34C(MinkUNet34):
  PLANES = (32, 64, 128, 256, 256, 128, 96, 96)


ME_MODELS = {c.__name__: c for c in (
    MinkUNet14, MinkUNet18, MinkUNet34, MinkUNet50, MinkUNet101, MinkUNet14A, MinkUNet14B,
    MinkUNet14C, MinkUNet14D, MinkUNet18A, MinkUNet18B, MinkUNet18D, MinkUNet34A,
    MinkUNet34B, MinkUNet34C)}


# --------------------------------------------------------------------------- SPVNAS MinkUNet
class BasicConvolutionBlock(nn.Module):
  def __init__(self, inc, outc, ks=3, stride=1, dilation=1, level=1):
    super().__init__()
    self.net = nn.Sequential(
        sparse_conv(inc, outc, ks, stride=stride, dilation=dilation, level=level),
        BatchNorm(outc), ReLU(True))

  def forward(self, x):
    return self.net(x)


class BasicDeconvolutionBlock(nn.Module):
  def __init__(self, inc, outc, ks=3, stride=1, level=1):
    super().__init__()
    self.net = nn.Sequential(
        sparse_conv(inc, outc, ks, stride=stride, transposed=True, level=level),
        BatchNorm(outc), ReLU(True))

  def forward(self, x):
    return self.net(x)


class ResidualBlock(nn.Module):
  def __init__(self, inc, outc, ks=3, stride=1, dilation=1, level=1):
    super().__init__()
    self.net = nn.Sequential(
        sparse_conv(inc, outc, ks, stride=stride, dilation=dilation, level=level),
        BatchNorm(outc), ReLU(True),
        sparse_conv(outc, outc, ks, stride=1, dilation=dilation, level=level),
        BatchNorm(outc))
    if inc == outc and stride == 1:
      self.downsample = nn.Sequential()
    else:
      self.downsample = nn.Sequential(
          sparse_conv(inc, outc, 1, stride=stride, level=level), BatchNorm(outc))
    self.relu = ReLU(True)

  def forward(self, x):
    return self.relu(add(self.net(x), self.downsample(x)))


class MinkUNet(nn.Module):
  """SPVNAS SemanticKITTI MinkUNet (4 input channels: x, y, z, intensity).

  ``cs = [int(cr * c) for c in (32, 32, 64, 128, 256, 256, 128, 96, 96)]``.
  ``point_transforms`` and ``dropout`` exist (and are in the state dict) but the voxel
  MinkUNet's forward never uses them. ``in_channels`` is an addition (SPVNAS fixes 4).
  """

  def __init__(self, **kwargs):
    super().__init__()
    cr = kwargs.get('cr', 1.0)
    cs = [int(cr * x) for x in [32, 32, 64, 128, 256, 256, 128, 96, 96]]
    self.cs = cs
    self.run_up = kwargs.get('run_up', True)
    inc = kwargs.get('in_channels', 4)

    self.stem = nn.Sequential(
        sparse_conv(inc, cs[0], 3, level=1), BatchNorm(cs[0]), ReLU(True),
        sparse_conv(cs[0], cs[0], 3, level=1), BatchNorm(cs[0]), ReLU(True))

    def stage(cin, cout, level):  # level: the stage's input tensor stride
      return nn.Sequential(
          BasicConvolutionBlock(cin, cin, ks=2, stride=2, dilation=1, level=level),
          ResidualBlock(cin, cout, ks=3, stride=1, dilation=1, level=2 * level),
          ResidualBlock(cout, cout, ks=3, stride=1, dilation=1, level=2 * level))

    self.stage1 = stage(cs[0], cs[1], 1)
    self.stage2 = stage(cs[1], cs[2], 2)
    self.stage3 = stage(cs[2], cs[3], 4)
    self.stage4 = stage(cs[3], cs[4], 8)

    def up(cin, cout, skip, level):  # level: the output (finer) tensor stride
      return nn.ModuleList([
          BasicDeconvolutionBlock(cin, cout, ks=2, stride=2, level=level),
          nn.Sequential(
              ResidualBlock(cout + skip, cout, ks=3, stride=1, dilation=1, level=level),
              ResidualBlock(cout, cout, ks=3, stride=1, dilation=1, level=level))])

    self.up1 = up(cs[4], cs[5], cs[3], 8)
    self.up2 = up(cs[5], cs[6], cs[2], 4)
    self.up3 = up(cs[6], cs[7], cs[1], 2)
    self.up4 = up(cs[7], cs[8], cs[0], 1)

    self.classifier = nn.Sequential(nn.Linear(cs[8], kwargs['num_classes']))
    self.point_transforms = nn.ModuleList([
        nn.Sequential(nn.Linear(cs[0], cs[4]), nn.BatchNorm1d(cs[4]), nn.ReLU(True)),
        nn.Sequential(nn.Linear(cs[4], cs[6]), nn.BatchNorm1d(cs[6]), nn.ReLU(True)),
        nn.Sequential(nn.Linear(cs[6], cs[8]), nn.BatchNorm1d(cs[8]), nn.ReLU(True)),
    ])
    self.dropout = nn.Dropout(0.3, True)

  def forward(self, x):
    x0 = self.stem(x)
    x1 = self.stage1(x0)
    x2 = self.stage2(x1)
    x3 = self.stage3(x2)
    x4 = self.stage4(x3)
    y1 = self.up1[1](cat(self.up1[0](x4), x3))
    y2 = self.up2[1](cat(self.up2[0](y1), x2))
    y3 = self.up3[1](cat(self.up3[0](y2), x1))
    y4 = self.up4[1](cat(self.up4[0](y3), x0))
    return self.classifier(y4.features)


# --------------------------------------------------------------------------- input helper
def sparse_input(features, indices, batch_size, levels=16, margin=0, dtype=torch.float32):
  """SparseConvTensor from (b, x, y, z) indices >= 0; the spatial shape is the extent rounded
  up to a multiple of ``levels`` (16: four k2 s2 convs keep every plane)."""
  indices = torch.as_tensor(indices, dtype=torch.int32)
  assert int(indices[:, 1:].min()) >= 0
  ext = indices[:, 1:].max(0).values + 1 + margin
  shape = [int(-(-int(e) // levels) * levels) for e in ext]
  return spconv.SparseConvTensor(torch.as_tensor(features, dtype=dtype), indices,
                                 shape, batch_size)
