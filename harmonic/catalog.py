"""Which detectors and backbones exist and which input sizes they accept: plain data, no torch,
so a spec is checked completely (``hdet spec check``, the REST API) without building a model.
"""

from __future__ import annotations

__all__ = [
    "ARCHS",
    "BACKBONES",
    "PLAIN_RESNETS",
    "RESNETS",
    "check_anchor_scale",
    "check_detector",
    "default_backbone",
    "valid_backbones",
]

ARCHS: tuple[str, ...] = (
    "faster_rcnn",
    "mask_rcnn",
    "retinanet",
    "ssd",
    "ssdlite",
    "fcos",
    "dssd",
    "refinedet",
)

#: FPN backbone name -> torchvision ResNet/ResNeXt constructor.
RESNETS: dict[str, str] = {
    "resnet18_fpn": "resnet18",
    "resnet34_fpn": "resnet34",
    "resnet50_fpn": "resnet50",
    "resnet101_fpn": "resnet101",
    "resnext101_32x8d_fpn": "resnext101_32x8d",
}
#: ResNets without an FPN (DSSD, RefineDet): the name is the torchvision constructor's.
PLAIN_RESNETS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES: tuple[str, ...] = (*RESNETS, *PLAIN_RESNETS, "mobilenet_v3", "vgg16")

_DEFAULT_BACKBONE = {
    "faster_rcnn": "resnet50_fpn",
    "mask_rcnn": "resnet50_fpn",
    "retinanet": "resnet50_fpn",
    "fcos": "resnet50_fpn",
    "ssd": "vgg16",
    "ssdlite": "mobilenet_v3",
    # the original papers' ResNet (DSSD321/513; RefineDet on COCO); the HarmonicDet paper's VOC
    # rows (Table 1) use resnet50, which its configs name
    "dssd": "resnet101",
    "refinedet": "resnet101",
}
_FPN_BACKBONES = (*RESNETS, "mobilenet_v3")
#: SSD300's last two extra layers are 3x3 convolutions without padding.
SSD_MIN_IMAGE_SIZE = 268
#: DSSD and RefineDet: their deepest map (stride 64) must hold at least one cell.
DSSD_REFINEDET_MIN_IMAGE_SIZE = 64


def default_backbone(arch: str) -> str:
    """The backbone ``arch`` is built with when none is named."""
    if arch not in _DEFAULT_BACKBONE:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
    return _DEFAULT_BACKBONE[arch]


def valid_backbones(arch: str) -> tuple[str, ...]:
    """The backbones ``arch`` can be built with."""
    if arch == "ssd":
        return ("vgg16",)
    if arch == "ssdlite":
        return ("mobilenet_v3",)
    if arch == "dssd":
        return PLAIN_RESNETS
    if arch == "refinedet":
        return (*PLAIN_RESNETS, "vgg16")  # VGG16 is the original RefineDet320/512's
    return _FPN_BACKBONES


def check_detector(arch: str, backbone: str | None, image_size: int) -> str:
    """The backbone name ``arch`` will use; ``ValueError`` naming the field (``arch``, ``backbone``,
    ``image_size``) when the combination cannot be built."""
    if arch not in ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size: {image_size!r} must be an int >= 32")
    name = _DEFAULT_BACKBONE[arch] if backbone is None else backbone
    valid = valid_backbones(arch)
    if name not in valid:
        known = "" if name in BACKBONES else f" (known backbones: {', '.join(BACKBONES)})"
        raise ValueError(f"backbone: {name!r} cannot be used with {arch}; valid: {', '.join(valid)}{known}")
    if arch == "ssd" and image_size < SSD_MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size: SSD300 VGG16 needs image_size >= {SSD_MIN_IMAGE_SIZE} (its last two extra layers "
            f"are 3x3 convolutions without padding), got {image_size}"
        )
    if arch in ("dssd", "refinedet") and image_size < DSSD_REFINEDET_MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size: {arch} needs image_size >= {DSSD_REFINEDET_MIN_IMAGE_SIZE} (its deepest map has "
            f"stride 64), got {image_size}"
        )
    return name


def check_anchor_scale(arch: str, anchor_scale: float | None) -> None:
    """``ValueError`` naming ``anchor_scale`` when ``arch`` has no such setting or it is out of range
    (RetinaNet's anchor side per level, in units of the level's stride)."""
    if anchor_scale is None:
        return
    if arch != "retinanet":
        raise ValueError(f"anchor_scale: only retinanet takes it (anchors per stride), not {arch}")
    if isinstance(anchor_scale, bool) or not 1.0 <= float(anchor_scale) <= 16.0:
        raise ValueError(f"anchor_scale: {anchor_scale!r} must be a number in [1, 16] (strides per side)")
