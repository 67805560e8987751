"""One evaluation protocol for every detector, and beta_c = p (Eq. 5) on sigmoid heads too."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, SMALL, batch_for
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from harmonic.config import EvalProtocol, EvalProtocolError, LossConfigError
from harmonic.detectors import build_detector, pop_diagnostics, set_eval_protocol
from harmonic.losses import harmonic_det_terms, harmonic_score_gradient

PROTOCOL_ARCHS = ("fcos", "retinanet", "faster_rcnn", "ssdlite")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@torch.no_grad()
def _flat_scores(model: nn.Module, arch: str) -> None:
    """Make every class of every candidate score about 0.1 (so between 0.05 and 0.2 at inference)."""
    background_and_classes = torch.log(torch.tensor([0.7] + [0.1] * (NUM_CLASSES - 1)))
    if arch == "retinanet":
        conv = model.head.classification_head.cls_logits
        conv.weight.zero_()
        conv.bias.fill_(_logit(0.1))
    elif arch == "fcos":
        # FCOS scores sqrt(sigmoid(cls) * sigmoid(centre-ness)): sqrt(0.04 * 0.5) = 0.14
        conv = model.head.classification_head.cls_logits
        conv.weight.zero_()
        conv.bias.fill_(_logit(0.04))
        ctr = model.head.regression_head.bbox_ctrness
        ctr.weight.zero_()
        ctr.bias.zero_()
    elif arch == "faster_rcnn":
        lin = model.roi_heads.box_predictor.cls_score
        lin.weight.zero_()
        lin.bias.copy_(background_and_classes)
    elif arch == "ssdlite":
        for block in model.head.classification_head.module_list:
            conv = block[-1]
            conv.weight.zero_()
            conv.bias.copy_(background_and_classes.repeat(conv.bias.numel() // NUM_CLASSES))
    else:  # pragma: no cover
        raise AssertionError(arch)


@pytest.mark.parametrize("arch", PROTOCOL_ARCHS)
def test_eval_returns_detections_down_to_the_protocol_threshold(arch: str) -> None:
    torch.manual_seed(0)
    model = build_detector(arch, NUM_CLASSES, loss="harmonicdet", **SMALL[arch])
    _flat_scores(model, arch)
    model.eval()
    images, _ = batch_for(arch)
    with torch.no_grad():
        out = model(images)
    scores = torch.cat([o["scores"] for o in out])
    assert scores.numel() > 0
    # torchvision's own FCOS cut (0.2) would have dropped all of them
    assert float(scores.max()) < 0.2 and float(scores.min()) >= 0.05
    assert all(len(o["scores"]) <= 100 for o in out)

    set_eval_protocol(model, {"score_thresh": 0.3, "max_detections": 5})
    with torch.no_grad():
        out = model(images)
    assert sum(len(o["scores"]) for o in out) == 0


@pytest.mark.parametrize("arch", ("retinanet", "ssdlite", "faster_rcnn", "fcos", "ssd"))
def test_every_arch_gets_the_same_protocol(arch: str) -> None:
    model = build_detector(
        arch, NUM_CLASSES, eval_protocol=EvalProtocol(0.01, 37, 0.6), **{**SMALL[arch], "image_size": 268}
    )
    holder = model.roi_heads if hasattr(model, "roi_heads") else model
    assert (holder.score_thresh, holder.detections_per_img, holder.nms_thresh) == (0.01, 37, 0.6)
    default = build_detector(arch, NUM_CLASSES, **{**SMALL[arch], "image_size": 268})
    holder = default.roi_heads if hasattr(default, "roi_heads") else default
    assert (holder.score_thresh, holder.detections_per_img, holder.nms_thresh) == (0.05, 100, 0.5)


@pytest.mark.parametrize(
    ("protocol", "needle"),
    [
        ({"score_thresh": 1.5}, "eval.score_thresh"),
        ({"max_detections": 0}, "eval.max_detections"),
        ({"nms_thresh": 0.0}, "eval.nms_thresh"),
        ({"score": 0.1}, "score"),
    ],
)
def test_bad_protocol_is_refused_naming_it(protocol: dict, needle: str) -> None:
    with pytest.raises(EvalProtocolError, match=needle):
        build_detector("retinanet", NUM_CLASSES, eval_protocol=protocol, **SMALL["retinanet"])


@pytest.mark.parametrize("arch", ("retinanet", "fcos"))
@pytest.mark.parametrize("sigmoid_cls", ("focal", "bce"))
def test_sigmoid_heads_couple_beta_c_to_the_ground_truth_score(arch: str, sigmoid_cls: str) -> None:
    torch.manual_seed(0)
    model = build_detector(
        arch, NUM_CLASSES, loss={"kind": "harmonicdet", "sigmoid_cls": sigmoid_cls}, **SMALL[arch]
    )
    images, targets = batch_for(arch)
    model(images, targets)
    diag = pop_diagnostics(model)
    assert diag["score"].numel() > 0
    assert torch.allclose(diag["beta_c"], diag["score"], atol=1e-7)

    # the ablation: beta_c = exp(-coupled loss), which for focal is not p
    ablation = build_detector(
        arch,
        NUM_CLASSES,
        loss={"kind": "harmonicdet", "sigmoid_cls": sigmoid_cls, "coupling": "loss"},
        **SMALL[arch],
    )
    ablation.load_state_dict(model.state_dict())
    ablation(images, targets)
    old = pop_diagnostics(ablation)
    if sigmoid_cls == "focal":
        assert not torch.allclose(old["beta_c"], old["score"], atol=1e-2)
    else:  # BCE of the ground-truth class is -log p: both couplings agree
        assert torch.allclose(old["beta_c"], old["score"], atol=1e-5)


def _sigmoid_positives(seed: int, n: int = 64, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, classes, generator=g) * 2).requires_grad_(True)
    labels = torch.randint(0, classes, (n,), generator=g)
    loc = torch.rand(n, generator=g) * 3  # L_loc from 0 to 3
    return logits, labels, loc


@pytest.mark.parametrize("coupling", ("score", "loss"))
@pytest.mark.parametrize("form", ("focal", "ce"))
@pytest.mark.parametrize("detach", (False, True))
def test_gradient_wrt_the_gt_logit_matches_the_closed_form_sigmoid(
    coupling: str, form: str, detach: bool
) -> None:
    logits, labels, loc = _sigmoid_positives(0)
    onehot = F.one_hot(labels, logits.shape[1]).float()
    gt_logit = logits.gather(1, labels[:, None])[:, 0]
    if form == "focal":
        cls = sigmoid_focal_loss(logits, onehot, reduction="none").sum(1)
    else:
        cls = F.binary_cross_entropy_with_logits(gt_logit, torch.ones_like(gt_logit), reduction="none")
    score = torch.sigmoid(gt_logit)
    terms = harmonic_det_terms(
        cls, loc, None, score, None, use_tc=False, iou_term="none", coupling=coupling, detach_factors=detach
    )
    if coupling == "score":
        assert torch.equal(terms.beta_c, score.detach())
    (terms.cls + terms.loc).sum().backward()
    grad_gt = logits.grad.gather(1, labels[:, None])[:, 0]
    dl_dp = harmonic_score_gradient(score, cls, loc, form=form, coupling=coupling, detach_factors=detach)
    p = score.detach()
    # dp/dz = p (1 - p), and no other term of a positive depends on its ground-truth logit
    torch.testing.assert_close(grad_gt, dl_dp * p * (1 - p), rtol=1e-4, atol=1e-6)


def test_softmax_closed_form_is_eq7() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 6, generator=g).requires_grad_(True)
    labels = torch.randint(1, 6, (32,), generator=g)
    loc = torch.rand(32, generator=g) * 3
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = F.softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    terms = harmonic_det_terms(ce, loc, None, p, None, use_tc=False, iou_term="none", coupling="score")
    (terms.cls + terms.loc).sum().backward()
    grad_gt = logits.grad.gather(1, labels[:, None])[:, 0]
    dl_dp = harmonic_score_gradient(p, ce, loc, form="ce", coupling="score")
    q = p.detach()
    eq7 = loc - (1 + torch.exp(-loc)) / q
    torch.testing.assert_close(dl_dp, eq7)
    torch.testing.assert_close(grad_gt, eq7 * q * (1 - q), rtol=1e-4, atol=1e-6)


def test_the_standard_loss_never_pushes_scores_down() -> None:
    model = build_detector("retinanet", NUM_CLASSES, loss="standard", **SMALL["retinanet"])
    images, targets = batch_for("retinanet")
    model(images, targets)
    diag = pop_diagnostics(model)
    assert (diag["dl_dp"] < 0).all()


def test_fcos_smooth_l1_form_differs_from_giou() -> None:
    images, targets = batch_for("fcos")
    totals = {}
    for form in ("giou", "smooth_l1"):
        torch.manual_seed(0)
        model = build_detector(
            "fcos", NUM_CLASSES, loss={"kind": "harmonicdet", "fcos_loc": form}, **SMALL["fcos"]
        )
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        totals[form] = float(losses["bbox_regression"].detach())
    assert totals["giou"] != pytest.approx(totals["smooth_l1"])


@pytest.mark.parametrize(
    ("loss", "needle"), [({"coupling": "p"}, "loss.coupling"), ({"fcos_loc": "l2"}, "loss.fcos_loc")]
)
def test_bad_coupling_options_are_named(loss: dict, needle: str) -> None:
    with pytest.raises(LossConfigError, match=needle):
        build_detector("fcos", NUM_CLASSES, loss=loss, **SMALL["fcos"])
