"""RetinaNet's and Faster R-CNN's anchors are torchvision's, tied to their levels' strides at every
image size, so a small image's objects have anchors of their size on a fine grid."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import box_iou

from harmonic.detectors import build_detector


@pytest.mark.parametrize("image_size", [96, 320, 800])
def test_retinanet_anchors_are_torchvisions_at_every_size(image_size: int) -> None:
    model = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=image_size)
    assert model.anchor_generator.sizes == _default_anchorgen().sizes


def test_a_small_images_object_has_a_positive_anchor_at_the_finest_level() -> None:
    model = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=96).eval()
    images = [torch.zeros(3, 96, 96)]
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    anchors = model.anchor_generator(image_list, features)[0]
    p3 = anchors[: features[0].shape[-2] * features[0].shape[-1] * 9]  # P3: 9 anchors per cell
    for size in (24.0, 30.0):  # objects of 0.25-0.31 of the image
        box = torch.tensor([[40.0, 40.0, 40.0 + size, 40.0 + size]])
        assert box_iou(box, p3).max() >= 0.5  # RetinaNet's foreground IoU


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "mobilenet_v3"])
def test_faster_rcnn_anchors_are_torchvisions_at_every_size(backbone: str) -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn

    tv = fasterrcnn_resnet50_fpn if backbone == "resnet18_fpn" else fasterrcnn_mobilenet_v3_large_fpn
    expected = tv(weights=None, weights_backbone=None, num_classes=3).rpn.anchor_generator.sizes
    for image_size in (96, 800):
        model = build_detector("faster_rcnn", 3, backbone=backbone, image_size=image_size)
        assert model.rpn.anchor_generator.sizes == expected
