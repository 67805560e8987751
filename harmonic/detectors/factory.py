"""Build torchvision detectors, plain or trained with the Harmonic / HarmonicDet loss.

:func:`build_torchvision_detector` builds the plain torchvision model; :func:`build_detector`
builds the same model and installs the loss adapter on the part that computes the loss (the
RoI heads of Faster/Mask R-CNN, the RetinaNet and FCOS heads, the SSD model itself) by turning that
instance into the adapter subclass. Nothing else changes: the state dict is torchvision's (a
checkpoint loads strictly into the plain model), inference is torchvision's, and no torchvision
module-level function is ever patched, so several models with different losses can share a process.

Defaults (torchvision's recipe where it has one):

* backbones: ``resnet50_fpn`` for Faster/Mask R-CNN, RetinaNet and FCOS (the paper's ResNet-50-FPN),
  ``vgg16`` for ``ssd`` (SSD300 VGG16, the only one it takes), ``mobilenet_v3`` for ``ssdlite``
  (the only one it takes), ``resnet101`` for ``dssd`` and ``refinedet`` (plain ResNets, no FPN;
  RefineDet also takes ``vgg16``). DSSD (:mod:`.dssd`) is a torchvision ``SSD`` with DSSD's trunk and
  head; RefineDet (:mod:`.refinedet`) is a model of this project in torchvision's contract;
* input size: ``image_size`` is the transform's ``min_size = max_size`` (``size`` for SSD), for
  training and inference alike;
* anchors: torchvision's, tied to the levels' strides at every image size (the R-CNNs' 8x and
  RetinaNet's 4x each level's stride, or ``anchor_scale`` x as mmdetection's ``octave_base_scale``;
  FCOS's "anchors" are its strides; RefineDet's are 4x each map's stride); SSD's and DSSD's
  default boxes are relative to the image. Shrunk by
  ``image_size / 800`` at 96 px they left small objects with no anchor of their size on a fine
  grid, and both detectors learned far less (docs/results.md, "Anchors"). The R-CNNs' proposal and
  RoI sample counts are scaled by the area ratio ``(image_size / 800)^2``, with floors of 100-200
  proposals and 64 RoIs per image. ``anchor_generator``/``rpn_anchor_generator`` in
  ``detector_kwargs`` override them;
* ``detector_kwargs`` go to the torchvision model class (e.g. ``rpn_post_nms_top_n_train``,
  ``box_batch_size_per_image``, ``topk_candidates``), except ``trainable_backbone_layers`` (only
  with a pretrained backbone; torchvision's default otherwise);
* evaluation: one protocol for every arch (:class:`~harmonic.config.EvalProtocol`: score threshold
  0.05, 100 detections per image, NMS at 0.5 by default) is set on every model built here
  (:func:`set_eval_protocol`), in place of each torchvision model's own inference settings.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDFeatureExtractorVGG, SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor, _normal_init

from harmonic.catalog import (
    ARCHS,
    BACKBONES,
    check_anchor_scale,
    check_detector,
    default_backbone,
    valid_backbones,
)
from harmonic.config import EvalProtocol, LossConfig
from harmonic.loss_parts import check_loss_fits

from .backbones import (
    P6P7,
    freeze_vgg_stages,
    group_norm,
    is_group_norm_file,
    mobilenet_fpn,
    mobilenet_v3_body,
    resnet_fpn,
    vgg16_features,
)
from .common import HarmonicPart
from .dssd import build_dssd
from .fcos import HarmonicFCOSHead
from .rcnn import HarmonicRoIHeads
from .refinedet import RefineDet, build_refinedet
from .refinedet_harmonic import HarmonicRefineDet
from .retinanet import HarmonicRetinaNetHead
from .ssd import HarmonicSSD

__all__ = [
    "ARCHS",
    "BACKBONES",
    "build_detector",
    "build_torchvision_detector",
    "default_backbone",
    "set_eval_protocol",
    "valid_backbones",
]


def _check(arch: str, num_classes: int, backbone: str | None, image_size: int) -> str:
    name = check_detector(arch, backbone, image_size)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes: {num_classes!r} must be an int >= 2 (it includes the background, as in torchvision)"
        )
    return name


#: RetinaNet's anchor side at each level, in units of the level's stride (torchvision's 32 px at P3).
RETINANET_ANCHOR_SCALE = 4.0


def _retinanet_anchors(strides: tuple[int, ...], scale: float) -> AnchorGenerator:
    # 3 sizes per octave from scale x each level's stride (torchvision's 32 ... 512 at P3-P7 at 4)
    sizes = tuple(tuple(int(scale * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))


def _rcnn_sample_sizes(image_size: int) -> dict[str, int]:
    """torchvision's proposal and RoI sample counts (meant for 800-pixel images), scaled by the image
    area: at 96 px its 2000 proposals per image through the RoI head cost about 1 s per image on a
    CPU core while a few dozen objects fit in the image. Floors keep small images well sampled."""
    area = min(1.0, (image_size / 800) ** 2)
    return {
        "rpn_pre_nms_top_n_train": max(200, round(2000 * area)),
        "rpn_pre_nms_top_n_test": max(200, round(1000 * area)),
        "rpn_post_nms_top_n_train": max(100, round(2000 * area)),
        "rpn_post_nms_top_n_test": max(100, round(1000 * area)),
        "box_batch_size_per_image": max(64, round(512 * area)),
    }


def _build_rcnn(
    arch: str, num_classes: int, backbone: str, image_size: int, pretrained: Any, kwargs: dict[str, Any]
) -> nn.Module:
    layers = kwargs.pop("trainable_backbone_layers", None)
    if backbone == "mobilenet_v3":
        body = mobilenet_fpn(pretrained, trainable_layers=layers)
        # torchvision's fasterrcnn_mobilenet_v3_large_fpn: every size at each of its 3 levels
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    else:
        body = resnet_fpn(backbone, pretrained, trainable_layers=layers)
        # torchvision's: 8x each level's stride (P2-P6), whatever the image size
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    kwargs.setdefault("rpn_anchor_generator", anchors)
    for key, value in _rcnn_sample_sizes(image_size).items():
        kwargs.setdefault(key, value)
    cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    return cls(body, num_classes, min_size=image_size, max_size=image_size, **kwargs)


def _build_one_stage(
    arch: str,
    num_classes: int,
    backbone: str,
    image_size: int,
    pretrained: Any,
    kwargs: dict[str, Any],
    anchor_scale: float | None,
) -> nn.Module:
    layers = kwargs.pop("trainable_backbone_layers", None)
    extra = P6P7(256, 256)
    if backbone == "mobilenet_v3":
        body = mobilenet_fpn(pretrained, extra_blocks=extra, trainable_layers=layers)
        strides: tuple[int, ...] = (16, 32, 64, 128)
    else:
        body = resnet_fpn(
            backbone, pretrained, returned_layers=[2, 3, 4], extra_blocks=extra, trainable_layers=layers
        )
        strides = (8, 16, 32, 64, 128)
    if arch == "retinanet":
        scale = RETINANET_ANCHOR_SCALE if anchor_scale is None else anchor_scale
        kwargs.setdefault("anchor_generator", _retinanet_anchors(strides, scale))
        return RetinaNet(body, num_classes, min_size=image_size, max_size=image_size, **kwargs)
    # FCOS: one "anchor" per location whose size is the level's stride (its matching relies on it)
    kwargs.setdefault(
        "anchor_generator", AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    )
    return FCOS(body, num_classes, min_size=image_size, max_size=image_size, **kwargs)


def _build_ssd(num_classes: int, image_size: int, pretrained: Any, kwargs: dict[str, Any]) -> nn.Module:
    layers = kwargs.pop("trainable_backbone_layers", None)
    features = vgg16_features(pretrained)
    if pretrained:
        freeze_vgg_stages(features, layers)
    body = SSDFeatureExtractorVGG(features, highres=False)
    anchors = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        # torchvision's steps are those of a 300-pixel input; other sizes use the feature-map grid
        steps=[8, 16, 32, 64, 100, 300] if image_size == 300 else None,
    )
    kwargs.setdefault(
        "head", SSDHead([512, 1024, 512, 256, 256, 256], anchors.num_anchors_per_location(), num_classes)
    )
    # torchvision's VGG16 weights expect 0-255 inputs minus the mean
    kwargs.setdefault("image_mean", [0.48235, 0.45882, 0.40784])
    kwargs.setdefault("image_std", [1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0])
    return SSD(body, anchors, (image_size, image_size), num_classes, **kwargs)


def _build_ssdlite(num_classes: int, image_size: int, pretrained: Any, kwargs: dict[str, Any]) -> nn.Module:
    layers = kwargs.pop("trainable_backbone_layers", None)
    # a pretraining of this project holds the body as it is built from scratch (GroupNorm, reduced tail)
    imagenet = bool(pretrained) and not is_group_norm_file(
        pretrained,
        lambda: mobilenet_v3_large(weights=None, norm_layer=group_norm, reduced_tail=True),
        ignore_prefixes=("classifier.",),
    )
    norm = (lambda c: nn.BatchNorm2d(c, eps=0.001, momentum=0.03)) if imagenet else group_norm
    # torchvision's ssdlite320_mobilenet_v3_large: reduced tail without ImageNet weights (MobileNetV3 Table 6)
    body_cls = mobilenet_v3_body(pretrained, reduced_tail=not imagenet)
    if not pretrained:
        _normal_init(body_cls)
    body = _mobilenet_extractor(body_cls, 6 if layers is None else layers, norm)
    size = (image_size, image_size)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = det_utils.retrieve_out_channels(body, size)
    if "head" not in kwargs:
        kwargs["head"] = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_classes, norm)
    defaults = {
        "score_thresh": 0.001,
        "nms_thresh": 0.55,
        "detections_per_img": 300,
        "topk_candidates": 300,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return SSD(body, anchors, size, num_classes, **{**defaults, **kwargs})


def set_eval_protocol(model: nn.Module, protocol: EvalProtocol | dict[str, Any] | None = None) -> nn.Module:
    """Set the evaluation protocol (score threshold, detections per image, NMS IoU) on a detector.

    R-CNNs keep these settings in their RoI heads, the one-stage detectors (RetinaNet, FCOS, SSD) in
    the model itself. Returns the model (changed in place).
    """
    p = EvalProtocol.from_any(protocol)
    holder = model.roi_heads if isinstance(model, FasterRCNN) else model
    if not all(hasattr(holder, a) for a in ("score_thresh", "nms_thresh", "detections_per_img")):
        raise TypeError(f"{type(model).__name__} has no score_thresh/nms_thresh/detections_per_img to set")
    setattr(holder, "score_thresh", float(p.score_thresh))  # noqa: B010 (nn.Module attributes)
    setattr(holder, "nms_thresh", float(p.nms_thresh))  # noqa: B010
    setattr(holder, "detections_per_img", int(p.max_detections))  # noqa: B010
    return model


def build_torchvision_detector(
    arch: str,
    num_classes: int,
    *,
    backbone: str | None = None,
    image_size: int = 256,
    pretrained_backbone: str | os.PathLike[str] | None = None,
    eval_protocol: EvalProtocol | dict[str, Any] | None = None,
    anchor_scale: float | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """The plain torchvision detector (no loss adapter), built as :func:`build_detector` builds it.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: number of classes *including* the background (torchvision's convention).
        backbone: one of :func:`valid_backbones` for ``arch``; None picks the default (module docstring).
        image_size: input size (``min_size = max_size``; SSD's square ``size``).
        pretrained_backbone: local ImageNet ``state_dict`` file of the backbone body (never downloaded).
        eval_protocol: the evaluation protocol (:class:`~harmonic.config.EvalProtocol` or a dict of
            its options); None: its defaults (score >= 0.05, 100 detections, NMS 0.5).
        anchor_scale: RetinaNet only: the anchors' side at each level in units of its stride (3 sizes
            per octave from there); None: torchvision's 4 (:data:`RETINANET_ANCHOR_SCALE`).
        **detector_kwargs: passed to the torchvision model class.

    Returns:
        A ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``, ``SSD`` (also DSSD), ``FCOS`` or
        :class:`~.refinedet.RefineDet` in training mode.
    """
    name = _check(arch, num_classes, backbone, image_size)
    check_anchor_scale(arch, anchor_scale)
    protocol = EvalProtocol.from_any(eval_protocol)  # validate before spending time on the model
    kwargs = dict(detector_kwargs)
    model: nn.Module
    if arch in ("faster_rcnn", "mask_rcnn"):
        model = _build_rcnn(arch, num_classes, name, image_size, pretrained_backbone, kwargs)
    elif arch in ("retinanet", "fcos"):
        model = _build_one_stage(
            arch, num_classes, name, image_size, pretrained_backbone, kwargs, anchor_scale
        )
    elif arch == "ssd":
        model = _build_ssd(num_classes, image_size, pretrained_backbone, kwargs)
    elif arch == "dssd":
        model = build_dssd(num_classes, name, image_size, pretrained_backbone, kwargs)
    elif arch == "refinedet":
        model = build_refinedet(num_classes, name, image_size, pretrained_backbone, kwargs)
    else:
        model = _build_ssdlite(num_classes, image_size, pretrained_backbone, kwargs)
    return set_eval_protocol(model, protocol)


def install_loss(
    model: nn.Module, loss: LossConfig | dict[str, Any] | str | None, *, arch: str | None = None
) -> nn.Module:
    """Turn the loss-computing part of a torchvision detector into its Harmonic adapter, in place.

    The part keeps its parameters, buffers and settings; only its class becomes the adapter subclass
    (which adds no parameters), so the state dict and inference are unchanged. ``arch`` names the
    detector in the refusal of a loss part its head cannot take (None: the adapter's arch, e.g. ``ssd``
    for SSDlite).

    Raises:
        LossConfigError: a loss part the head cannot take (:func:`harmonic.loss_parts.loss_problems`).
    """
    cfg = LossConfig.from_any(loss)
    part: nn.Module
    adapter: type[HarmonicPart]
    if isinstance(model, RefineDet):
        part, adapter = model, HarmonicRefineDet
    elif isinstance(model, FasterRCNN):  # MaskRCNN is a FasterRCNN
        part, adapter = model.roi_heads, HarmonicRoIHeads
    elif isinstance(model, RetinaNet):
        part, adapter = model.head, HarmonicRetinaNetHead
    elif isinstance(model, FCOS):
        part, adapter = model.head, HarmonicFCOSHead
    elif isinstance(model, SSD):
        part, adapter = model, HarmonicSSD
    else:
        raise TypeError(f"no Harmonic loss adapter for {type(model).__name__}")
    check_loss_fits(cfg, arch or adapter._arch)
    if not isinstance(part, adapter):
        if type(part) not in adapter.__mro__:
            raise TypeError(
                f"{type(part).__name__} is a custom subclass; cannot install {adapter.__name__} on it"
            )
        part.__class__ = adapter
    part._init_harmonic(cfg)  # type: ignore[operator]
    return model


def build_detector(
    arch: str,
    num_classes: int,
    *,
    loss: LossConfig | dict[str, Any] | str | None = None,
    backbone: str | None = None,
    image_size: int = 256,
    pretrained_backbone: str | os.PathLike[str] | None = None,
    eval_protocol: EvalProtocol | dict[str, Any] | None = None,
    anchor_scale: float | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector trained with the configured loss.

    Args:
        arch: one of :data:`ARCHS` (``faster_rcnn``, ``mask_rcnn``, ``retinanet``, ``ssd``,
            ``ssdlite``, ``fcos``, ``dssd``, ``refinedet``).
        num_classes: number of classes *including* the background (K foreground classes -> K + 1).
        loss: a :class:`~harmonic.config.LossConfig`, a dict of its options, a kind name
            (``standard`` | ``harmonic`` | ``harmonicdet``) or None (the HarmonicDet defaults).
        backbone: ``resnet18_fpn`` ... ``resnext101_32x8d_fpn``, ``mobilenet_v3``, ``vgg16`` (SSD,
            RefineDet), ``resnet18`` ... ``resnet101`` (DSSD, RefineDet);
            None picks the arch's default (see the module docstring).
        image_size: input size for training and inference.
        pretrained_backbone: local ImageNet ``state_dict`` file of the backbone body; None trains
            from scratch (GroupNorm, every layer trainable).
        eval_protocol: the evaluation protocol applied in eval mode (score threshold, detections
            per image, NMS IoU); None: :class:`~harmonic.config.EvalProtocol`'s defaults.
        anchor_scale: RetinaNet's anchor side per level in strides (None: torchvision's 4).
        **detector_kwargs: passed to the torchvision model class.

    Returns:
        The torchvision model, whose training forward returns the loss dict of the configured loss
        and records the diagnostics read by :func:`~harmonic.detectors.pop_diagnostics`.

    Raises:
        ValueError: unknown arch/backbone, bad sizes, a bad loss option or a loss part the arch's
            head cannot take (:class:`~harmonic.config.LossConfigError` names the option).
    """
    cfg = LossConfig.from_any(loss)  # validate before spending time on the model
    check_loss_fits(cfg, arch)
    model = build_torchvision_detector(
        arch,
        num_classes,
        backbone=backbone,
        image_size=image_size,
        pretrained_backbone=pretrained_backbone,
        eval_protocol=eval_protocol,
        anchor_scale=anchor_scale,
        **detector_kwargs,
    )
    return install_loss(model, cfg, arch=arch)
