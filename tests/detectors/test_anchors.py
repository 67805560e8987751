"""RetinaNet's and Faster R-CNN's anchors are torchvision's, tied to their levels' strides at every
image size, so a small image's objects have anchors of their size on a fine grid; RetinaNet's scale
per stride is an option (``anchor_scale``), kept by its checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import box_iou

from harmonic.detectors import build_detector


@pytest.mark.parametrize("image_size", [96, 320, 800])
def test_retinanet_anchors_are_torchvisions_at_every_size(image_size: int) -> None:
    model = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=image_size)
    assert model.anchor_generator.sizes == _default_anchorgen().sizes


def _best_p3_iou(model: torch.nn.Module, size: float) -> float:
    images = [torch.zeros(3, 96, 96)]
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    anchors = model.anchor_generator(image_list, features)[0]
    p3 = anchors[: features[0].shape[-2] * features[0].shape[-1] * 9]  # P3: 9 anchors per cell
    box = torch.tensor([[40.0, 40.0, 40.0 + size, 40.0 + size]])
    return float(box_iou(box, p3).max())


def test_a_small_images_object_has_a_positive_anchor_at_the_finest_level() -> None:
    model = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=96).eval()
    for size in (24.0, 30.0):  # objects of 0.25-0.31 of the image
        assert _best_p3_iou(model, size) >= 0.5  # RetinaNet's foreground IoU


def test_a_smaller_anchor_scale_gives_the_smallest_objects_a_positive_anchor() -> None:
    tv = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=96).eval()
    small = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=96, anchor_scale=3).eval()
    assert small.anchor_generator.sizes[0] == (24, 30, 38)
    assert small.anchor_generator.sizes[1] == (48, 60, 76)
    assert _best_p3_iou(tv, 20.0) < 0.5 <= _best_p3_iou(small, 20.0)  # 0.2 of a 96-px image


def test_anchor_scale_is_refused_where_it_means_nothing() -> None:
    with pytest.raises(ValueError, match="anchor_scale: only retinanet"):
        build_detector("faster_rcnn", 3, backbone="resnet18_fpn", image_size=96, anchor_scale=3)
    with pytest.raises(ValueError, match=r"anchor_scale: 20 must be a number in \[1, 16\]"):
        build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=96, anchor_scale=20)


def test_a_checkpoint_keeps_its_anchor_scale(tmp_path) -> None:
    from workers.predict import MODEL_FILE, MODEL_INFO_FILE, load_checkpoint

    model = build_detector("retinanet", 3, backbone="resnet18_fpn", image_size=96, anchor_scale=3)
    torch.save(model.state_dict(), tmp_path / MODEL_FILE)
    info = {"arch": "retinanet", "num_classes": 3, "backbone": "resnet18_fpn", "image_size": 96}
    (tmp_path / MODEL_INFO_FILE).write_text(json.dumps({**info, "anchor_scale": 3}))
    assert load_checkpoint(tmp_path).model.anchor_generator.sizes == model.anchor_generator.sizes
    (tmp_path / MODEL_INFO_FILE).write_text(json.dumps(info))  # written before the option existed
    assert load_checkpoint(tmp_path).model.anchor_generator.sizes == _default_anchorgen().sizes


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "mobilenet_v3"])
def test_faster_rcnn_anchors_are_torchvisions_at_every_size(backbone: str) -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn

    tv = fasterrcnn_resnet50_fpn if backbone == "resnet18_fpn" else fasterrcnn_mobilenet_v3_large_fpn
    expected = tv(weights=None, weights_backbone=None, num_classes=3).rpn.anchor_generator.sizes
    for image_size in (96, 800):
        model = build_detector("faster_rcnn", 3, backbone=backbone, image_size=image_size)
        assert model.rpn.anchor_generator.sizes == expected
