"""The multi-scale trunks of DSSD and RefineDet: which backbone maps they predict from, at which
strides, and the layers they add to the body (extra residual blocks, L2Norm, VGG's fc6/fc7/conv6).

The bodies come from :mod:`.backbones` (ImageNet file -> FrozenBatchNorm2d and torchvision's trainable
stages; from scratch or a pretraining of this project -> GroupNorm, everything trainable), so a
pretrained file fits them as it fits the other detectors. Layers the detectors add use GroupNorm
where the original papers use BatchNorm (their 2-8 images per step make batch statistics noisy).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from .backbones import freeze_resnet_stages, freeze_vgg_stages, group_norm, resnet_network, vgg16_features

__all__ = ["ExtraBlock", "L2Norm", "RefineDetVGG", "refinedet_trunk", "resnet_stages", "xavier_init"]

#: ImageNet input normalisation of torchvision's ResNets (images in 0-1).
RESNET_MEAN = [0.485, 0.456, 0.406]
RESNET_STD = [0.229, 0.224, 0.225]
#: The normalisation of the project's VGG16 (SSD300's: 0-255 inputs minus the mean).
VGG_MEAN = [0.48235, 0.45882, 0.40784]
VGG_STD = [1.0 / 255.0] * 3

_BOTTLENECK = ("resnet50", "resnet101")


def xavier_init(module: nn.Module) -> None:
    """torchvision's SSD initialisation of added layers: Xavier-uniform weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ExtraBlock(nn.Module):
    """A residual bottleneck that shrinks the map (DSSD's extra layers, RefineDet's res6):
    1x1 -> kxk (stride) -> 1x1 with a kxk projection shortcut, GroupNorm, ReLU after the sum."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 2, padding: int = 1
    ):
        super().__init__()
        mid = out_channels // 4
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False),
            group_norm(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, padding, bias=False),
            group_norm(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False),
            group_norm(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
            group_norm(out_channels),
        )
        xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet_stages(
    name: str,
    pretrained: str | os.PathLike[str] | None,
    *,
    conv5_stride16: bool,
    trainable_layers: int | None = None,
) -> tuple[nn.Module, list[int]]:
    """ResNet ``name`` returning conv3_x, conv4_x and conv5_x (keys ``"0"``, ``"1"``, ``"2"``), and their
    channels.

    ``conv5_stride16``: conv5_x keeps stride 16 (DSSD, as R-FCN): dilated in the Bottleneck ResNets
    (torchvision's ``replace_stride_with_dilation``), without its stride in resnet18/34, whose
    BasicBlock cannot dilate. The state dict is the same either way.
    """
    dilate = conv5_stride16 and name in _BOTTLENECK
    network, imagenet = resnet_network(name, pretrained, replace_stride_with_dilation=[False, False, dilate])
    if conv5_stride16 and not dilate:
        block: Any = network.layer4[0]  # type: ignore[index]
        block.conv1.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    freeze_resnet_stages(network, (3 if imagenet else 5) if trainable_layers is None else trainable_layers)
    wide = 4 if name in _BOTTLENECK else 1
    body = IntermediateLayerGetter(network, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
    return body, [128 * wide, 256 * wide, 512 * wide]


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels times a learnt per-channel scale (SSD, ParseNet)."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


class RefineDetVGG(nn.Module):
    """RefineDet's VGG16 trunk: conv4_3 (L2Norm 10, stride 8), conv5_3 (L2Norm 8, stride 16), fc7
    (pool5 2x2 stride 2, fc6 as a 3x3 convolution of dilation 3, stride 32) and conv6_2 (stride 64)."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        self.conv4 = features[: pools[3]]
        self.conv5 = features[pools[3] : pools[4]]
        self.fc7 = nn.Sequential(
            features[pools[4]],
            nn.Conv2d(512, 1024, 3, padding=3, dilation=3),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, 1),
            nn.ReLU(inplace=True),
        )
        self.conv6 = nn.Sequential(
            nn.Conv2d(1024, 256, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 512, 3, 2, 1),
            nn.ReLU(inplace=True),
        )
        xavier_init(self.fc7)
        xavier_init(self.conv6)
        self.norm4 = L2Norm(512, 10.0)
        self.norm5 = L2Norm(512, 8.0)
        self.out_channels = [512, 512, 1024, 512]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        c4 = self.conv4(x)
        c5 = self.conv5(c4)
        fc7 = self.fc7(c5)
        c6 = self.conv6(fc7)
        return OrderedDict((str(i), f) for i, f in enumerate((self.norm4(c4), self.norm5(c5), fc7, c6)))


class _ResNetTrunk(nn.Module):
    """RefineDet's ResNet trunk: conv3_x, conv4_x, conv5_x (strides 8, 16, 32) and res6 (stride 64)."""

    def __init__(self, body: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.body = body
        self.res6 = ExtraBlock(channels[-1], 512)
        self.out_channels = [*channels, 512]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = list(self.body(x).values())
        maps.append(self.res6(maps[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(maps))


def refinedet_trunk(
    backbone: str, pretrained: str | os.PathLike[str] | None, trainable_layers: int | None = None
) -> nn.Module:
    """RefineDet's four maps (strides 8-64) from ``vgg16`` or a plain ResNet; ``out_channels`` lists them."""
    if backbone == "vgg16":
        features = vgg16_features(pretrained)
        if pretrained:
            freeze_vgg_stages(features, trainable_layers)
        return RefineDetVGG(features)
    body, channels = resnet_stages(
        backbone, pretrained, conv5_stride16=False, trainable_layers=trainable_layers
    )
    return _ResNetTrunk(body, channels)
