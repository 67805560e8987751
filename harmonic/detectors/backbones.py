"""Backbones of the detectors, built from torchvision parts; ImageNet weights only from a local file.

Normalisation:

* with ``pretrained_backbone`` (a local ImageNet ``state_dict`` file of the classification network:
  ``resnet50``, ``mobilenet_v3_large``, ``vgg16`` ...): ``FrozenBatchNorm2d`` as torchvision does,
  and torchvision's default number of trainable stages;
* without: trained from scratch, every layer trainable, and ``GroupNorm`` in place of BatchNorm
  (BatchNorm statistics of a detector's 2-8 images per GPU are too noisy). VGG16 has no
  normalisation in torchvision; from scratch it gets a GroupNorm after every convolution, since
  a plain 13-convolution VGG does not train from scratch at detection batch sizes;
* with a file pretrained by this project (:mod:`harmonic.pretrain`, ``hdet pretrain``): the body is
  built as from scratch (GroupNorm, every layer trainable: GroupNorm has no batch statistics to
  protect, and the small generated pretraining set is no reason to freeze the stem) and the file
  loaded into it. Such a file is recognised by what it holds (:func:`is_group_norm_file`): the
  GroupNorm body's keys and shapes exactly, and no BatchNorm statistics.

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
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from harmonic.catalog import BACKBONES, RESNETS

__all__ = [
    "BACKBONES",
    "RESNETS",
    "P6P7",
    "freeze_resnet_stages",
    "freeze_vgg_stages",
    "group_norm",
    "is_group_norm_file",
    "read_state_dict",
    "load_pretrained",
    "mobilenet_v3_body",
    "mobilenet_fpn",
    "resnet_fpn",
    "resnet_network",
    "vgg16_features",
]


class P6P7(LastLevelP6P7):
    """torchvision's P6/P7 block (RetinaNet, FCOS; same parameters and state-dict keys), computed in
    float32 under CPU autocast: with bf16 on CPUs with AMX, P7's weight gradient came out NaN in 7 of
    12 seeds when its input was 1x1 (images of 64 px), measured; the two convs cost little in fp32."""

    def forward(self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]) -> Any:
        x = p[-1] if self.use_P5 else c[-1]
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(p, c, names)
        with torch.autocast("cpu", enabled=False):
            p6 = self.p6(x.float())
            p7 = self.p7(torch.relu(p6))
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


# VGG16 ("configuration D"): channels, "M" = max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (MobileNet's 16-channel layers get 4)."""
    groups = math.gcd(num_channels, 32)
    while groups > 1 and num_channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, num_channels)


def read_state_dict(path: str | os.PathLike[str], what: str = "pretrained_backbone") -> dict[str, Any]:
    """The ``state_dict`` held by a local file (also one wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``); errors name ``what`` (the spec field) and the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-torch file
        raise ValueError(f"{what}: cannot read {path!r} as a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        got = type(state).__name__ if not isinstance(state, dict) else "a dict that is not str -> tensor"
        raise ValueError(f"{what}: {path!r} does not hold a state_dict (got {got})")
    return state


def is_group_norm_file(
    path: str | os.PathLike[str],
    build_group_norm_body: Callable[[], nn.Module],
    *,
    ignore_prefixes: tuple[str, ...] = (),
    strip_prefix: str = "",
) -> bool:
    """True when the file holds the body that ``build_group_norm_body`` builds (with GroupNorm), key
    for key and shape for shape, outside ``ignore_prefixes``: a pretraining of this project. An
    ImageNet file (BatchNorm statistics) is not; an unreadable file is not either (loading it then
    reports why). The body is built on the meta device: no memory, no time."""
    try:
        state = read_state_dict(path)
    except (OSError, ValueError):
        return False
    if strip_prefix and any(k.startswith(strip_prefix) for k in state):
        state = {k[len(strip_prefix) :]: v for k, v in state.items() if k.startswith(strip_prefix)}
    with torch.device("meta"):
        reference = build_group_norm_body()
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith(ignore_prefixes)}
    have = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(ignore_prefixes)}
    return want == have


def _has_group_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.GroupNorm) for m in module.modules())


def load_pretrained(
    module: nn.Module, path: str | os.PathLike[str], *, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load a local ``state_dict`` file (ImageNet, or a pretraining of this project) into ``module``.

    Keys starting with one of ``ignore_prefixes`` (the classifier) may be missing or extra; any other
    missing or unexpected key is an error that names the file.
    """
    path = os.fspath(path)
    state = read_state_dict(path)
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
        return list(read_state_dict(path))
    except ValueError:
        return []  # load_pretrained reports it


def resnet_network(
    name: str, pretrained: str | os.PathLike[str] | None, **kwargs: Any
) -> tuple[nn.Module, bool]:
    """torchvision's ResNet ``name`` (``resnet18`` ... ``resnext101_32x8d``) with the normalisation of
    the module docstring, the file loaded; and whether it holds ImageNet weights (FrozenBatchNorm2d).
    ``kwargs`` go to the constructor (``replace_stride_with_dilation``)."""

    def build(norm: Callable[..., nn.Module]) -> nn.Module:
        return getattr(resnet, name)(weights=None, norm_layer=norm, **kwargs)  # type: ignore[no-any-return]

    imagenet = pretrained is not None and not is_group_norm_file(
        pretrained, lambda: build(group_norm), ignore_prefixes=("fc.",)
    )
    body = build(FrozenBatchNorm2d if imagenet else group_norm)
    if pretrained:
        load_pretrained(body, pretrained, ignore_prefixes=("fc.",))
    return body, imagenet


def freeze_resnet_stages(body: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule (``_resnet_fpn_extractor``): only the last ``trainable_layers`` of conv1,
    layer1 ... layer4 train (5: all, with bn1)."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers: must be in [0, 5], got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in body.named_parameters():
        if not name.startswith(tuple(train)):
            p.requires_grad_(False)


def freeze_vgg_stages(features: nn.Sequential, trainable_layers: int | None) -> None:
    """Freeze the first VGG stages of pretrained ``features``: torchvision's ssd300_vgg16 trains the
    last 4 of the 5 stages of ImageNet weights; a GroupNorm pretraining of this project trains all
    (module docstring). ``trainable_layers`` overrides the count."""
    stages = [0] + [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)][:-1]
    keep = (len(stages) if _has_group_norm(features) else 4) if trainable_layers is None else trainable_layers
    for module in features[: stages[len(stages) - keep]] if keep < len(stages) else []:
        for p in module.parameters():
            p.requires_grad_(False)


def resnet_fpn(
    name: str,
    pretrained: str | os.PathLike[str] | None,
    *,
    returned_layers: list[int] | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    trainable_layers: int | None = None,
) -> nn.Module:
    """A ResNet/ResNeXt body with an FPN (torchvision's ``_resnet_fpn_extractor``)."""
    body, imagenet = resnet_network(RESNETS[name], pretrained)
    layers = (3 if imagenet else 5) if trainable_layers is None else trainable_layers
    return _resnet_fpn_extractor(body, layers, returned_layers=returned_layers, extra_blocks=extra_blocks)


def mobilenet_v3_body(pretrained: str | os.PathLike[str] | None, **kwargs: Any) -> nn.Module:
    """torchvision's ``mobilenet_v3_large`` with the normalisation described in the module docstring."""
    imagenet = pretrained is not None and not is_group_norm_file(
        pretrained,
        lambda: mobilenet_v3_large(weights=None, norm_layer=group_norm, **kwargs),
        ignore_prefixes=("classifier.",),
    )
    norm: Callable[..., nn.Module] = FrozenBatchNorm2d if imagenet else group_norm
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
    layers = (6 if _has_group_norm(body) else 3) if trainable_layers is None else trainable_layers
    return _mobilenet_extractor(body, True, layers, extra_blocks=extra_blocks)


def vgg16_features(pretrained: str | os.PathLike[str] | None) -> nn.Sequential:
    """VGG16's convolutional part (``vgg16().features``), with GroupNorm when trained from scratch
    or from a pretraining of this project.

    A pretrained file may hold the whole ``vgg16`` state dict (``features.*`` is used, the classifier
    ignored) or the ``features`` module's own.
    """
    group = not pretrained or is_group_norm_file(
        pretrained, lambda: _vgg16(True), ignore_prefixes=("classifier.",), strip_prefix="features."
    )
    features = _vgg16(group)
    if pretrained:
        state_keys = _keys_of(pretrained)
        if any(k.startswith("features.") for k in state_keys):
            holder = nn.Module()
            holder.features = features
            load_pretrained(holder, pretrained, ignore_prefixes=("classifier.",))
        else:
            load_pretrained(features, pretrained, ignore_prefixes=("classifier.",))
    return features


def _vgg16(group: bool) -> nn.Sequential:
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
        if group:
            layers.append(group_norm(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)
