"""Backbones of the detectors, built from torchvision parts; ImageNet weights only from a local file.

Normalisation:

* with ``pretrained_backbone`` (a local ImageNet ``state_dict`` file of the classification network:
  ``resnet50``, ``mobilenet_v3_large``, ``vgg16`` ...): ``FrozenBatchNorm2d`` as torchvision does,
  and torchvision's default number of trainable stages;
* without: trained from scratch, every layer trainable, and ``GroupNorm`` in place of BatchNorm
  (BatchNorm statistics of a detector's 2-8 images per GPU are too noisy). VGG16 has no
  normalisation in torchvision; from scratch it gets a GroupNorm after every convolution, since
  a plain 13-convolution VGG does not train from scratch at detection batch sizes.

Nothing is ever downloaded: the torchvision builders are called with ``weights=None``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

__all__ = [
    "BACKBONES",
    "RESNETS",
    "group_norm",
    "load_pretrained",
    "mobilenet_v3_body",
    "mobilenet_fpn",
    "resnet_fpn",
    "vgg16_features",
]

RESNETS: dict[str, str] = {
    "resnet18_fpn": "resnet18",
    "resnet34_fpn": "resnet34",
    "resnet50_fpn": "resnet50",
    "resnet101_fpn": "resnet101",
    "resnext101_32x8d_fpn": "resnext101_32x8d",
}
BACKBONES: tuple[str, ...] = (*RESNETS, "mobilenet_v3", "vgg16")

# VGG16 ("configuration D"): channels, "M" = max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (MobileNet's 16-channel layers get 4)."""
    groups = math.gcd(num_channels, 32)
    while groups > 1 and num_channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, num_channels)


def load_pretrained(
    module: nn.Module, path: str | os.PathLike[str], *, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load a local ImageNet ``state_dict`` file into ``module``.

    Keys starting with one of ``ignore_prefixes`` (the classifier) may be missing or extra; any other
    missing or unexpected key is an error that names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_backbone: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-torch file
        raise ValueError(f"pretrained_backbone: cannot read {path!r} as a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise ValueError(
            f"pretrained_backbone: {path!r} does not hold a state_dict (got {type(state).__name__})"
        )
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"pretrained_backbone: {path!r} does not fit the backbone: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(ignore_prefixes)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"pretrained_backbone: {path!r} does not fit the backbone: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )


def _keys_of(path: str | os.PathLike[str]) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_backbone: no such file {os.fspath(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return []  # load_pretrained reports it
    return list(state) if isinstance(state, dict) else []


def resnet_fpn(
    name: str,
    pretrained: str | os.PathLike[str] | None,
    *,
    returned_layers: list[int] | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    trainable_layers: int | None = None,
) -> nn.Module:
    """A ResNet/ResNeXt body with an FPN (torchvision's ``_resnet_fpn_extractor``)."""
    norm: Callable[..., nn.Module] = FrozenBatchNorm2d if pretrained else group_norm
    body = getattr(resnet, RESNETS[name])(weights=None, norm_layer=norm)
    if pretrained:
        load_pretrained(body, pretrained, ignore_prefixes=("fc.",))
    layers = (3 if pretrained else 5) if trainable_layers is None else trainable_layers
    return _resnet_fpn_extractor(body, layers, returned_layers=returned_layers, extra_blocks=extra_blocks)


def mobilenet_v3_body(pretrained: str | os.PathLike[str] | None, **kwargs: Any) -> nn.Module:
    """torchvision's ``mobilenet_v3_large`` with the normalisation described in the module docstring."""
    norm: Callable[..., nn.Module] = FrozenBatchNorm2d if pretrained else group_norm
    body = mobilenet_v3_large(weights=None, norm_layer=norm, **kwargs)
    if pretrained:
        load_pretrained(body, pretrained, ignore_prefixes=("classifier.",))
    return body


def mobilenet_fpn(
    pretrained: str | os.PathLike[str] | None,
    *,
    extra_blocks: ExtraFPNBlock | None = None,
    trainable_layers: int | None = None,
) -> nn.Module:
    """MobileNetV3-Large with an FPN on its last two stages (torchvision's ``_mobilenet_extractor``)."""
    body = mobilenet_v3_body(pretrained)
    layers = (3 if pretrained else 6) if trainable_layers is None else trainable_layers
    return _mobilenet_extractor(body, True, layers, extra_blocks=extra_blocks)


def vgg16_features(pretrained: str | os.PathLike[str] | None) -> nn.Sequential:
    """VGG16's convolutional part (``vgg16().features``), with GroupNorm when trained from scratch.

    A pretrained file may hold the whole ``vgg16`` state dict (``features.*`` is used, the classifier
    ignored) or the ``features`` module's own.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        conv = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        layers.append(conv)
        if not pretrained:
            layers.append(group_norm(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    features = nn.Sequential(*layers)
    if pretrained:
        state_keys = _keys_of(pretrained)
        if any(k.startswith("features.") for k in state_keys):
            holder = nn.Module()
            holder.features = features
            load_pretrained(holder, pretrained, ignore_prefixes=("classifier.",))
        else:
            load_pretrained(features, pretrained, ignore_prefixes=("classifier.",))
    return features
