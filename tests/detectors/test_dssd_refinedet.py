"""DSSD and RefineDet: the papers' maps and anchors, the multibox loss as torchvision's SSD computes it,
RefineDet's negative anchor filtering and binary ARM loss, the evaluation protocol, NMS-off inference,
checkpoints through ``hdet predict``, pretrained bodies, bad input. (Build, train step, standard =
plain model, diagnostics and over-fitting run for them in test_detectors.py, over ``ARCHS``.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import NUM_CLASSES, SMALL, batch_for
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import FrozenBatchNorm2d

from harmonic.detectors import (
    build_detector,
    build_torchvision_detector,
    pop_diagnostics,
    pre_nms_predictions,
    set_eval_protocol,
)
from harmonic.detectors.multibox import IGNORED, hard_negatives, match, multibox_loss, multibox_targets

NEW = ("dssd", "refinedet")


def _build(arch: str, loss, **extra) -> nn.Module:
    torch.manual_seed(0)
    return build_detector(arch, NUM_CLASSES, loss=loss, **{**SMALL[arch], **extra})


def _map_sizes(arch: str, backbone: str, size: int) -> list[int]:
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = build_torchvision_detector(arch, 21, backbone=backbone, image_size=size)
        return [f.shape[-1] for f in model.backbone(torch.empty(1, 3, size, size)).values()]


@pytest.mark.parametrize("backbone", ["resnet101", "resnet18"])
def test_dssd_predicts_from_the_papers_maps(backbone: str) -> None:
    # DSSD321: 6 maps down to 1x1; DSSD513: 7 (conv3_x at stride 8, conv5_x kept at stride 16)
    assert _map_sizes("dssd", backbone, 320) == [40, 20, 10, 5, 3, 1]
    assert _map_sizes("dssd", backbone, 512) == [64, 32, 16, 8, 4, 2, 1]
    with torch.device("meta"):
        model = build_torchvision_detector("dssd", 21, backbone=backbone, image_size=320)
    assert isinstance(model, SSD)  # SSD's loss, inference and Harmonic adapter apply as they are
    # aspect ratios 1.6, 2, 3 and their inverses + SSD's two squares, on every map
    assert model.anchor_generator.num_anchors_per_location() == [8] * 6


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_refinedet_predicts_from_strides_8_to_64(backbone: str) -> None:
    assert _map_sizes("refinedet", backbone, 320) == [40, 20, 10, 5]
    assert _map_sizes("refinedet", backbone, 512) == [64, 32, 16, 8]


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand(2, 50, 2, generator=g) * 40
    anchors = torch.cat([anchors, anchors + 4 + torch.rand(2, 50, 2, generator=g) * 20], dim=-1)
    targets = []
    for _ in range(2):
        xy = torch.rand(3, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 5 + torch.rand(3, 2, generator=g) * 15], dim=-1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (3,), generator=g)})
    logits = torch.randn(2, 50, NUM_CLASSES, generator=g)
    regression = torch.randn(2, 50, 4, generator=g)
    return list(anchors), targets, logits, regression


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multibox_loss_is_what_torchvision_ssd_computes(seed: int) -> None:
    anchors, targets, logits, regression = _random_case(seed)
    coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    matcher = det_utils.SSDMatcher(0.5)
    matched = [match(matcher, t["boxes"], a) for t, a in zip(targets, anchors)]
    ours = multibox_loss(coder, logits, regression, multibox_targets(targets, anchors, matched))
    ssd = SimpleNamespace(box_coder=coder, neg_to_pos_ratio=3.0)  # what SSD.compute_loss reads of self
    theirs = SSD.compute_loss(
        ssd, targets, {"cls_logits": logits, "bbox_regression": regression}, anchors, matched
    )
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_hard_negatives_take_three_per_positive_and_never_an_ignored_box() -> None:
    # one image, 8 boxes: box 0 positive, boxes 1-2 ignored (negative anchor filtering) but with the
    # highest loss of all, boxes 3-7 candidates with losses 5, 4, 3, 2, 1
    matched = [torch.tensor([0, IGNORED, IGNORED, -1, -1, -1, -1, -1])]
    t = multibox_targets(
        [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([2])}],
        [torch.zeros(8, 4)],
        matched,
    )
    loss = torch.tensor([[0.1, 9.0, 8.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    picked = hard_negatives(loss, t, 3.0)
    assert picked.tolist() == [[False, False, False, True, True, True, False, False]]
    assert t.labels.tolist() == [[2, 0, 0, 0, 0, 0, 0, 0]]


def test_a_filtered_anchor_is_ignored_even_as_a_ground_truths_best() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 9.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    matcher = det_utils.SSDMatcher(0.5)
    assert match(matcher, gt, anchors).tolist() == [0, 0, -1]
    assert match(matcher, gt, anchors, torch.tensor([False, True, True])).tolist() == [IGNORED, 0, -1]


@torch.no_grad()
def _arm_says_background(model: nn.Module) -> None:
    """Every anchor's ARM background probability about 1 - 2e-9 (> 0.99: all filtered)."""
    for conv in model.arm_head.classification_head.module_list:
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([10.0, -10.0]).repeat(conv.bias.numel() // 2))


@pytest.mark.parametrize("kind", ["standard", "harmonicdet"])
def test_refinedet_negative_anchor_filtering(kind: str) -> None:
    images, targets = batch_for("refinedet")
    model = _build("refinedet", kind)
    losses = model(images, targets)
    assert pop_diagnostics(model)["score"].numel() > 0  # fresh ARM (p = 0.5): nothing is filtered
    assert float(losses["classification"].detach()) > 0

    _arm_says_background(model)
    with torch.no_grad():
        losses = model(images, targets)
    # the ODM has neither positives nor negatives left; the ARM still learns
    assert float(losses["classification"]) == 0.0 and float(losses["bbox_regression"]) == 0.0
    assert float(losses["arm_classification"]) > 0 and float(losses["arm_bbox_regression"]) > 0
    assert pop_diagnostics(model)["score"].numel() == 0
    model.eval()
    set_eval_protocol(model, {"score_thresh": 0.0})
    with torch.no_grad():
        assert all(len(d["scores"]) == 0 for d in model(images))  # filtered anchors score 0


def test_refinedet_arm_keeps_its_binary_loss_under_harmonicdet() -> None:
    images, targets = batch_for("refinedet")
    standard = _build("refinedet", "standard")(images, targets)
    harmonic = _build("refinedet", "harmonicdet")(images, targets)
    for key in ("arm_classification", "arm_bbox_regression"):
        assert torch.equal(standard[key], harmonic[key]), key
    assert not torch.equal(standard["bbox_regression"], harmonic["bbox_regression"])
    assert "tc" in harmonic and "tc" not in standard


def test_refinedet_on_vgg16_trains_and_detects() -> None:
    images, targets = batch_for("refinedet")
    model = _build("refinedet", "harmonicdet", backbone="vgg16")
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.modules())  # from scratch
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.norm4.weight.grad is not None  # conv4_3's L2Norm scale learns
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert [set(o) for o in out] == [{"boxes", "scores", "labels"}] * 2


@torch.no_grad()
def _flat_scores(model: nn.Module) -> None:
    """Every class of every box scores 0.1 (softmax of background 0.7 and 3 x 0.1)."""
    head = model.head.predictor if hasattr(model.head, "predictor") else model.head  # DSSD / RefineDet's ODM
    logits = torch.log(torch.tensor([0.7] + [0.1] * (NUM_CLASSES - 1)))
    for conv in head.classification_head.module_list:
        conv.weight.zero_()
        conv.bias.copy_(logits.repeat(conv.bias.numel() // NUM_CLASSES))


@pytest.mark.parametrize("arch", NEW)
def test_eval_output_follows_the_protocol(arch: str) -> None:
    model = _build(arch, "harmonicdet")
    _flat_scores(model)
    model.eval()
    images, _ = batch_for(arch)
    images = [images[0], images[1][:, :48, :]]  # any size in; boxes come back in its pixels
    with torch.no_grad():
        out = model(images)
    for o, img in zip(out, images):
        assert set(o) == {"boxes", "scores", "labels"} and 0 < len(o["scores"]) <= 100
        assert o["boxes"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        assert (
            float(o["boxes"][:, 3].max()) <= img.shape[-2] and float(o["boxes"][:, 2].max()) <= img.shape[-1]
        )
        assert ((o["scores"] > 0.05) & (o["scores"] < 0.2)).all()
    set_eval_protocol(model, {"score_thresh": 0.3, "max_detections": 5})
    with torch.no_grad():
        assert sum(len(o["scores"]) for o in model(images)) == 0
    set_eval_protocol(model, {"score_thresh": 0.05, "max_detections": 5})
    with torch.no_grad():
        assert all(len(o["scores"]) == 5 for o in model(images))


@pytest.mark.parametrize("arch", NEW)
def test_pre_nms_predictions_keep_at_least_the_nms_survivors(arch: str) -> None:
    model = _build(arch, "harmonicdet", eval_protocol={"score_thresh": 0.0})
    images, _ = batch_for(arch)
    model.eval()
    with torch.no_grad():
        normal = model(images)
    raw = pre_nms_predictions(model, images)
    assert (model.nms_thresh, model.detections_per_img) == (0.5, 100)
    for n, r in zip(normal, raw):
        assert r["boxes"].shape[0] >= n["boxes"].shape[0]
    assert sum(r["boxes"].shape[0] for r in raw) > sum(n["boxes"].shape[0] for n in normal)


@pytest.mark.parametrize("arch", NEW)
def test_checkpoint_loads_back_through_hdet_predict(arch: str, tmp_path) -> None:
    from workers.predict import MODEL_FILE, MODEL_INFO_FILE, load_checkpoint

    model = _build(arch, "harmonicdet")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    plain = build_torchvision_detector(arch, NUM_CLASSES, **SMALL[arch])
    assert plain.state_dict().keys() == model.state_dict().keys()  # the adapter adds nothing
    torch.save(model.state_dict(), tmp_path / MODEL_FILE)
    info = {"arch": arch, "num_classes": NUM_CLASSES, **SMALL[arch]}
    (tmp_path / MODEL_INFO_FILE).write_text(json.dumps(info))
    loaded = load_checkpoint(tmp_path).model
    model.eval()
    images, _ = batch_for(arch)
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_pretrained_bodies_load_like_the_other_detectors(tmp_path) -> None:
    from torchvision.models import resnet18

    from harmonic.pretrain import body_name, build_classifier

    assert body_name("dssd", "resnet18") == "resnet18" and body_name("refinedet", None) == "resnet101"
    assert body_name("refinedet", "vgg16") == "vgg16"
    # a pretraining of this project (GroupNorm body): loaded, everything trains
    ours = {k: v for k, v in build_classifier("resnet18", 3).state_dict().items() if not k.startswith("fc.")}
    torch.save(ours, tmp_path / "ours.pth")
    model = build_detector(
        "dssd", NUM_CLASSES, backbone="resnet18", image_size=64, pretrained_backbone=tmp_path / "ours.pth"
    )
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, ours["layer3.0.conv1.weight"])
    assert all(p.requires_grad for p in model.parameters())
    # an ImageNet file (BatchNorm statistics): FrozenBatchNorm2d, torchvision's 3 trainable stages
    imagenet = resnet18(weights=None)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    model = build_detector(
        "refinedet",
        NUM_CLASSES,
        backbone="resnet18",
        image_size=64,
        pretrained_backbone=tmp_path / "imagenet.pth",
    )
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not body.conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    # VGG16 pretrained by this project ("features." keys) fits RefineDet's VGG trunk
    vgg = {k: v for k, v in build_classifier("vgg16", 3).state_dict().items() if k.startswith("features.")}
    torch.save(vgg, tmp_path / "vgg.pth")
    model = build_detector(
        "refinedet", NUM_CLASSES, backbone="vgg16", image_size=64, pretrained_backbone=tmp_path / "vgg.pth"
    )
    assert torch.equal(model.backbone.conv4[0].weight, vgg["features.0.weight"])


@pytest.mark.parametrize(
    ("arch", "kwargs", "needle"),
    [
        ("dssd", {"backbone": "vgg16"}, "backbone: 'vgg16' cannot be used with dssd"),
        ("dssd", {"backbone": "resnet50_fpn"}, "valid: resnet18, resnet34, resnet50, resnet101"),
        ("refinedet", {"backbone": "mobilenet_v3"}, "backbone"),
        ("refinedet", {"image_size": 48}, "image_size: refinedet needs image_size >= 64"),
    ],
)
def test_bad_input_is_refused_naming_it(arch: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_detector(arch, NUM_CLASSES, **{"image_size": 64, **kwargs})


def test_specs_know_them() -> None:
    from workers.spec.sections import DetectorSpec

    assert DetectorSpec(arch="refinedet", backbone="vgg16", image_size=320).arch == "refinedet"
    with pytest.raises(ValueError, match="image_size"):
        DetectorSpec(arch="dssd", image_size=32)
