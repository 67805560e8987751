"""DSSD (Fu et al. 2017, "DSSD: Deconvolutional Single Shot Detector"): its encoder-decoder trunk,
deconvolution module and prediction module, assembled by :func:`build_dssd` into a torchvision ``SSD``.

Being an ``SSD`` (a backbone returning the decoder's maps, a head, default boxes), DSSD keeps
everything torchvision's SSD does: the transform (a fixed square input), the matching (IoU >= 0.5
plus each ground truth's best box), SSD's multibox loss in ``SSD.compute_loss`` (softmax CE with 3:1
hard negative mining + smooth L1 of the (10, 10, 5, 5)-encoded offsets, divided by the number of
positives: the original loss, so ``kind: standard``), inference, and with it the
:class:`~.ssd.HarmonicSSD` adapter for the Harmonic losses and the evaluation protocol.

The network, for an input of S pixels (DSSD321 / DSSD513 for S = 320 / 512):

* encoder: ResNet conv3_x (stride 8) and conv5_x kept at stride 16 (see
  :func:`~.trunks.resnet_stages`), then extra residual blocks (:class:`~.trunks.ExtraBlock`, 512
  channels) that halve the map (3x3, stride 2) while it is larger than 3 and finish with one
  unpadded convolution as large as the map, down to 1x1: 40-20-10-5-3-1 at 320 (6 maps, as DSSD321)
  and 64-32-16-8-4-2-1 at 512 (7 maps, as DSSD513). DSSD321 halves with 2x2 stride-2 convolutions
  and goes 5 -> 3 -> 1 unpadded; here every halving is a 3x3 stride-2 convolution (same sizes at 320
  and 512);
* decoder: from the 1x1 map down, a deconvolution module (Fig. 3) fuses each encoder map with the
  decoder map above it: the deep side is a 2x2 stride-2 deconvolution (cropped to the shallow map
  when that is odd; a kxk stride-1 deconvolution over an unpadded kxk convolution), a 3x3 conv and a
  norm; the shallow side conv 3x3 - norm - ReLU - conv 3x3 - norm; element-wise product, ReLU
  (512 channels; GroupNorm in place of the paper's BatchNorm, see :mod:`.trunks`);
* head: on every decoder map (and the 1x1 top), the prediction module of Fig. 2(c) (1x1 256,
  1x1 256, 1x1 1024 with a 1x1 1024 projection, summed) and 3x3 class/box convolutions
  (torchvision's ``SSDHead``);
* default boxes: aspect ratios 1.6, 2 and 3 (and their inverses, plus SSD's two square boxes) on every
  map, as DSSD; scales from 0.07 to 0.87 as torchvision's SSD300 (0.07, then 0.15 ... 0.87 evenly).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from .backbones import group_norm
from .trunks import RESNET_MEAN, RESNET_STD, ExtraBlock, resnet_stages, xavier_init

__all__ = ["DSSDHead", "DSSDTrunk", "DeconvolutionModule", "PredictionModule", "build_dssd", "dssd_scales"]

#: DSSD's aspect ratios on every map (chosen in its paper from a K-means clustering of the training boxes).
DSSD_ASPECT_RATIOS = [1.6, 2.0, 3.0]


def _halve(size: int) -> int:
    """The side of a map after a 3x3 stride-2 convolution with padding 1 (or a ResNet stride)."""
    return (size + 1) // 2


class DeconvolutionModule(nn.Module):
    """Fig. 3 of the DSSD paper: the decoder map above, upsampled, times the encoder map, ReLU."""

    def __init__(
        self, shallow_channels: int, deep_channels: int, channels: int = 512, kernel: int = 2
    ) -> None:
        super().__init__()
        # kernel 2: the deep map is a stride-2 halving of the shallow one; else an unpadded kxk conv
        self.deconv = nn.ConvTranspose2d(deep_channels, channels, kernel, stride=2 if kernel == 2 else 1)
        self.deep = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), group_norm(channels))
        self.shallow = nn.Sequential(
            nn.Conv2d(shallow_channels, channels, 3, padding=1),
            group_norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
        )
        xavier_init(self)

    def forward(self, shallow: Tensor, deep: Tensor) -> Tensor:
        h, w = shallow.shape[-2:]
        up = self.deconv(deep)[..., :h, :w]  # a stride-2 conv of an odd map: 2x is one too many
        return F.relu(self.shallow(shallow) * self.deep(up))


class PredictionModule(nn.Module):
    """Fig. 2(c) of the DSSD paper: a residual block in front of the class and box convolutions."""

    def __init__(self, in_channels: int, channels: int = 1024) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, 256, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, channels, 1),
        )
        self.shortcut = nn.Conv2d(in_channels, channels, 1)
        xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class DSSDTrunk(nn.Module):
    """The encoder and decoder of the module docstring; returns the decoder's maps, finest first."""

    def __init__(
        self, body: nn.Module, body_channels: list[int], image_size: int, channels: int = 512
    ) -> None:
        super().__init__()
        self.body = body  # returns conv3_x ("0"), conv4_x ("1"), conv5_x ("2")
        size = _halve(_halve(_halve(_halve(image_size))))  # conv5_x at stride 16
        extras: list[nn.Module] = []
        kernels: list[int] = []  # of the deconvolution under each extra block
        in_channels = body_channels[2]
        while size > 1:
            if size > 3:
                extras.append(ExtraBlock(in_channels, channels, 3, 2, 1))
                kernels.append(2)
                size = _halve(size)
            else:  # one unpadded convolution over the whole map
                extras.append(ExtraBlock(in_channels, channels, size, 1, 0))
                kernels.append(size)
                size = 1
            in_channels = channels
        self.extras = nn.ModuleList(extras)
        encoder_channels = [body_channels[0], body_channels[2]] + [channels] * len(extras)
        # decoder[i] fuses encoder map i with the decoder map i + 1; conv5_x is a stride-2 halving of conv3_x
        self.decoder = nn.ModuleList(
            DeconvolutionModule(c, channels, channels, k)
            for c, k in zip(encoder_channels[:-1], [2, *kernels])
        )
        self.out_channels = [channels] * len(encoder_channels)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(x)
        encoder = [maps["0"], maps["2"]]
        for block in self.extras:
            encoder.append(block(encoder[-1]))
        decoder = [encoder[-1]]
        for i in range(len(encoder) - 2, -1, -1):
            decoder.append(self.decoder[i](encoder[i], decoder[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(reversed(decoder)))


class DSSDHead(nn.Module):
    """A prediction module per map, then torchvision's ``SSDHead`` (3x3 class and box convolutions)."""

    def __init__(
        self, in_channels: list[int], num_anchors: list[int], num_classes: int, channels: int = 1024
    ):
        super().__init__()
        self.prediction_modules = nn.ModuleList(PredictionModule(c, channels) for c in in_channels)
        self.predictor = SSDHead([channels] * len(in_channels), num_anchors, num_classes)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return self.predictor([module(f) for module, f in zip(self.prediction_modules, x)])  # type: ignore[no-any-return]


def dssd_scales(num_maps: int) -> list[float]:
    """Default-box scales of ``num_maps`` maps (+ the last one's upper neighbour): torchvision's
    SSD300 ones (0.07, 0.15 ... 0.87 evenly, 1.05), which they are at 6 maps."""
    step = (0.87 - 0.15) / max(1, num_maps - 2)
    return [0.07] + [round(0.15 + step * k, 4) for k in range(num_maps - 1)] + [1.05]


def build_dssd(
    num_classes: int,
    backbone: str,
    image_size: int,
    pretrained: str | os.PathLike[str] | None,
    kwargs: dict[str, Any],
) -> SSD:
    """DSSD on a plain ResNet (``resnet18`` ... ``resnet101``) as a torchvision ``SSD``; ``kwargs`` go
    to ``SSD`` (``trainable_backbone_layers`` to the body)."""
    layers = kwargs.pop("trainable_backbone_layers", None)
    body, channels = resnet_stages(backbone, pretrained, conv5_stride16=True, trainable_layers=layers)
    trunk = DSSDTrunk(body, channels, image_size)
    num_maps = len(trunk.out_channels)
    anchors = DefaultBoxGenerator([DSSD_ASPECT_RATIOS] * num_maps, scales=dssd_scales(num_maps))
    if "head" not in kwargs:
        kwargs["head"] = DSSDHead(trunk.out_channels, anchors.num_anchors_per_location(), num_classes)
    kwargs.setdefault("image_mean", RESNET_MEAN)
    kwargs.setdefault("image_std", RESNET_STD)
    return SSD(trunk, anchors, (image_size, image_size), num_classes, **kwargs)
