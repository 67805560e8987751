"""Losses described by their parts on the detector heads: every part trains on every head that takes
it, a part equal to the head's own is the preset, the parts path reproduces the presets, the presets'
values stay where they were, CARL reaches the classifier, and a part a head cannot take is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import NUM_CLASSES, SMALL, batch_for, make_batch
from torch import nn

from harmonic.config import LossConfigError
from harmonic.detectors import build_detector, install_loss, pop_diagnostics

#: kind, cls, box, box_extra: every part and kind on each head at least once (two box parts a row)
_SIGMOID = [
    ("standard", "quality_focal", "smooth_l1", "balanced_l1"),
    ("pisa", "ghm_c", "iou", "giou"),
    ("harmonic", "varifocal", "diou", "ciou"),
    ("harmonicdet", "quality_focal", "hiou", "l1"),
]
_SOFTMAX = [
    ("standard", "ce", "l1", "balanced_l1"),
    ("pisa", None, "iou", "giou"),
    ("harmonicdet", None, "diou", "ciou"),
    ("harmonic", None, "hiou", "smooth_l1"),
]
# DSSD and Mask R-CNN take the parts through SSD's and Faster R-CNN's adapters, trained here
TRAINED = (
    [("retinanet", row) for row in _SIGMOID]
    + [("fcos", row) for row in _SIGMOID]
    + [("ssdlite", row) for row in _SOFTMAX]
    + [("faster_rcnn", row) for row in _SOFTMAX]
)
# smaller than SMALL where the detector allows it: a few steps with finite losses is all that is asked
_TRAIN_SIZES = {"fcos": 64}


def _loss(row: tuple[str, str | None, str, str]) -> dict[str, Any]:
    kind, cls, box, extra = row
    loss: dict[str, Any] = {"kind": kind, "box": box, "box_extra": extra, "box_extra_weight": 0.5}
    if cls is not None:
        loss["cls"] = cls
    return loss


_MODELS: dict[tuple[str, int], tuple[nn.Module, dict[str, torch.Tensor]]] = {}


def _model(arch: str, loss: dict[str, Any], size: int | None = None) -> nn.Module:
    """The arch's small model from the same initial weights, with ``loss`` installed (built once)."""
    size = size or SMALL[arch]["image_size"]
    if (arch, size) not in _MODELS:
        torch.manual_seed(0)
        model = build_detector(arch, NUM_CLASSES, loss="standard", **{**SMALL[arch], "image_size": size})
        _MODELS[(arch, size)] = (model, {k: v.clone() for k, v in model.state_dict().items()})
    model, initial = _MODELS[(arch, size)]
    model.load_state_dict(initial)
    return install_loss(model, loss, arch=arch)


@pytest.mark.parametrize(
    ("arch", "row"), TRAINED, ids=[f"{a}-{'-'.join(str(p) for p in r if p)}" for a, r in TRAINED]
)
def test_every_part_trains_on_every_head_that_takes_it(arch: str, row) -> None:
    loss = _loss(row)
    size = _TRAIN_SIZES.get(arch, SMALL[arch]["image_size"])
    model = _model(arch, loss, size)
    images, targets = make_batch(2, size, masks=arch == "mask_rcnn")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rcnn = arch in ("faster_rcnn", "mask_rcnn")
    for _ in range(2):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        opt.zero_grad()
        total.backward()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        diag = pop_diagnostics(model)
        assert diag["score"].numel() > 0 and all(torch.isfinite(v).all() for v in diag.values())
    assert (("loss_carl" if rcnn else "carl") in losses) == (loss["kind"] == "pisa")
    assert (("loss_tc" if rcnn else "tc") in losses) == (loss["kind"] in ("harmonic", "harmonicdet"))


def _forward(arch: str, loss: dict, size: int | None = None) -> dict[str, torch.Tensor]:
    size = size or SMALL[arch]["image_size"]
    model = _model(arch, loss, size)
    images, targets = make_batch(2, size)
    torch.manual_seed(1)  # the samplers draw random numbers: the same draws for every loss
    with torch.no_grad():
        losses = model(images, targets)
    pop_diagnostics(model)
    return losses


_OWN = {
    "retinanet": {"cls": "focal", "box": "l1"},
    "fcos": {"cls": "focal", "box": "giou"},
    "ssdlite": {"cls": "ce", "box": "smooth_l1"},
    "faster_rcnn": {"cls": "ce", "box": "smooth_l1"},
}


@pytest.mark.parametrize("arch", list(_OWN))
@pytest.mark.parametrize("kind", ["standard", "harmonicdet"])
def test_the_heads_own_parts_are_the_preset_and_the_parts_path_agrees(arch: str, kind: str) -> None:
    """Naming a head's own parts is the preset, bit for bit; a second box part of weight 0 takes the
    parts path, which must then give the preset's values."""
    size = _TRAIN_SIZES.get(arch)
    preset = _forward(arch, {"kind": kind}, size)
    own = _forward(arch, {"kind": kind, **_OWN[arch]}, size)
    parts = _forward(arch, {"kind": kind, "box_extra": "giou", "box_extra_weight": 0.0}, size)
    assert preset.keys() == own.keys() == parts.keys()
    for key in preset:
        assert torch.equal(preset[key], own[key]), key
        assert torch.allclose(preset[key], parts[key], rtol=1e-5, atol=1e-7), (key, preset[key], parts[key])


def test_fcos_box_smooth_l1_is_fcos_loc_smooth_l1() -> None:
    old = _forward("fcos", {"kind": "harmonicdet", "fcos_loc": "smooth_l1"}, 64)
    new = _forward("fcos", {"kind": "harmonicdet", "box": "smooth_l1"}, 64)
    for key in old:
        assert torch.allclose(old[key], new[key], rtol=1e-5), key


#: the presets' losses on the batch of ``batch_for(arch)`` (model seeded 0, samplers 1), torch 2.14 CPU
PRESET_VALUES = {
    ("fcos", "harmonicdet"): {"classification": 1.098568320274353, "bbox_regression": 2.529148817062378},
    ("ssdlite", "harmonicdet"): {
        "classification": 9.851675033569336,
        "bbox_regression": 5.505435943603516,
        "tc": 0.026643458753824234,
    },
}


@pytest.mark.parametrize(("arch", "kind"), list(PRESET_VALUES))
def test_the_presets_keep_their_values(arch: str, kind: str) -> None:
    losses = _forward(arch, {"kind": kind})
    for key, value in PRESET_VALUES[(arch, kind)].items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5), key


def test_carl_trains_the_classifier_through_the_scores() -> None:
    """PISA's CARL carries gradient to the classification branch; the plain box loss does not."""
    model = _model("retinanet", {"kind": "pisa"})
    losses = model(*batch_for("retinanet"))
    cls_params = list(model.head.classification_head.parameters())
    carl_grads = torch.autograd.grad(losses["carl"], cls_params, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in carl_grads)
    box_grads = torch.autograd.grad(losses["bbox_regression"], cls_params, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in box_grads)
    pop_diagnostics(model)


@pytest.mark.parametrize(
    ("arch", "loss", "field", "needle"),
    [
        ("ssdlite", {"cls": "quality_focal"}, "loss.cls", "sigmoid classification head"),
        ("faster_rcnn", {"cls": "varifocal"}, "loss.cls", "softmax"),
        ("ssd", {"cls": "ghm_c", "kind": "standard"}, "loss.cls", "sigmoid"),
        ("retinanet", {"cls": "ce"}, "loss.cls", "sigmoid classifier per class"),
        ("refinedet", {"box": "giou"}, "loss.box", "presets only"),
        ("refinedet", {"kind": "pisa"}, "loss.kind", "presets only"),
        ("fcos", {"box": "giou", "fcos_loc": "smooth_l1"}, "loss.fcos_loc", "give it as box"),
    ],
)
def test_a_part_the_head_cannot_take_is_refused_naming_the_field(arch, loss, field, needle) -> None:
    with pytest.raises(LossConfigError, match=rf"{field}: .*{needle}"):
        build_detector(arch, NUM_CLASSES, loss=loss, **SMALL[arch])
