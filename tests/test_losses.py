"""Closed-form values, gradients and degenerate inputs of the paper's losses (Eq. 2-14)."""

from __future__ import annotations

import math

import pytest
import torch

from harmonic.config import LossConfig, LossConfigError
from harmonic.losses import (
    cls_loss_grad,
    entropy,
    harmonic_det_loss,
    harmonic_det_terms,
    harmonic_loss,
    harmonic_score_gradient,
    hiou_loss,
    iou_loss,
    tc_loss,
    upcast,
)
from harmonic.metrics import average_inconsistency

E = math.e


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- harmonic loss (Eq. 2-3)


def test_harmonic_loss_closed_form() -> None:
    # cls=1, loc=2: (1 + e^-2) * 1 + (1 + e^-1) * 2
    got = harmonic_loss(t(1.0), t(2.0))
    assert got.item() == pytest.approx((1 + E**-2) * 1 + (1 + E**-1) * 2, abs=1e-12)


def test_harmonic_loss_zero_losses_is_zero() -> None:
    assert harmonic_loss(t(0.0, 0.0), t(0.0, 0.0)).tolist() == [0.0, 0.0]


def test_harmonic_loss_perfect_box_doubles_classification_weight() -> None:
    # identical boxes: loc = 0 -> beta_r = 1, so the classification loss counts twice
    cls = t(0.3, 1.7)
    assert torch.allclose(harmonic_loss(cls, torch.zeros(2, dtype=torch.float64)), 2 * cls)


def test_harmonic_loss_reductions() -> None:
    cls, loc = t(0.5, 1.0, 2.0), t(0.1, 0.0, 3.0)
    per = harmonic_loss(cls, loc)
    assert per.shape == (3,)
    assert harmonic_loss(cls, loc, reduction="sum").item() == pytest.approx(per.sum().item())
    assert harmonic_loss(cls, loc, reduction="mean").item() == pytest.approx(per.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        harmonic_loss(cls, loc, reduction="avg")


def test_harmonic_loss_zero_positives() -> None:
    empty = torch.zeros(0)
    assert harmonic_loss(empty, empty).shape == (0,)
    assert harmonic_loss(empty, empty, reduction="mean").item() == 0.0
    assert harmonic_det_loss(empty, empty, empty, empty, torch.zeros(0, 3), reduction="sum").item() == 0.0


@pytest.mark.parametrize("p", [1e-6, 0.01, 0.3, 0.5, 0.9, 1 - 1e-6])
@pytest.mark.parametrize("loc_value", [0.0, 0.25, 1.0, 3.0])
def test_eq7_gradient_with_softmax_ce(p: float, loc_value: float) -> None:
    """dL/dp = L_loc - (1 + e^-L_loc) / p (Eq. 7) when CE = -log p and beta_c carries gradient."""
    prob = torch.tensor([p], dtype=torch.float64, requires_grad=True)
    loc = torch.tensor([loc_value], dtype=torch.float64)
    harmonic_loss(-torch.log(prob), loc).sum().backward()
    expected = loc_value - (1 + math.exp(-loc_value)) / p
    assert prob.grad is not None
    assert prob.grad.item() == pytest.approx(expected, rel=1e-9)


def test_eq7_gradient_through_softmax_logits() -> None:
    """The same gradient reached through a softmax head, by the chain rule dp/dz."""
    logits = torch.tensor([[0.2, 1.3, -0.4]], dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([1]), reduction="none")
    loc = torch.tensor([0.7], dtype=torch.float64)
    harmonic_loss(ce, loc).sum().backward()
    p = probs[0, 1].item()
    dl_dp = 0.7 - (1 + math.exp(-0.7)) / p
    dp_dz = torch.tensor([-p * probs[0, 0].item(), p * (1 - p), -p * probs[0, 2].item()], dtype=torch.float64)
    assert logits.grad is not None
    assert torch.allclose(logits.grad[0], dl_dp * dp_dz, atol=1e-12)


def test_detach_factors_removes_the_cross_gradient() -> None:
    prob = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    loc = torch.tensor([1.5], dtype=torch.float64)
    harmonic_loss(-torch.log(prob), loc, detach_factors=True).sum().backward()
    # with beta_c constant, only (1 + beta_r) dCE/dp remains
    assert prob.grad is not None
    assert prob.grad.item() == pytest.approx(-(1 + math.exp(-1.5)) / 0.4, rel=1e-9)


def test_harmonic_weights_follow_the_other_branch() -> None:
    """Situation (2) of Sec. 3.1: good classification, bad regression -> regression weighted more."""
    cls_good, cls_bad = t(0.05), t(2.0)
    loc_good, loc_bad = t(0.05), t(2.0)
    # the weight on the regression loss is (1 + exp(-CE)): larger when classification is good
    terms_good = harmonic_det_terms(cls_good, loc_bad, None, None, None, use_tc=False, iou_term="none")
    terms_bad = harmonic_det_terms(cls_bad, loc_bad, None, None, None, use_tc=False, iou_term="none")
    assert (terms_good.loc / loc_bad).item() > (terms_bad.loc / loc_bad).item()
    terms = harmonic_det_terms(cls_bad, loc_good, None, None, None, use_tc=False, iou_term="none")
    assert (terms.cls / cls_bad).item() > (terms_bad.cls / cls_bad).item()


# ---------------------------------------------------------------- IoU / HIoU (Eq. 9-10)


def test_hiou_closed_form() -> None:
    iou = t(0.0, 0.5, 1.0)
    got = hiou_loss(iou, gamma=0.8)
    assert got.tolist() == pytest.approx([1.0, 1.5**0.8 * 0.5, 0.0], abs=1e-12)
    assert iou_loss(iou).tolist() == [1.0, 0.5, 0.0]


def test_hiou_with_gamma_zero_is_the_iou_loss() -> None:
    iou = torch.rand(50, dtype=torch.float64)
    assert torch.allclose(hiou_loss(iou, gamma=0.0), iou_loss(iou))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.8, 1.0])
def test_hiou_is_monotonic_decreasing_for_gamma_in_range(gamma: float) -> None:
    iou = torch.linspace(0, 1, 2001, dtype=torch.float64)
    values = hiou_loss(iou, gamma)
    assert bool((values[1:] <= values[:-1] + 1e-15).all())


def test_hiou_would_not_be_monotonic_above_one() -> None:
    """Why gamma > 1 is refused: (1+x)^g (1-x) rises near x = 0 for g > 1."""
    x = torch.tensor([0.0, 0.05], dtype=torch.float64)
    raw = (1 + x).pow(1.5) * (1 - x)
    assert raw[1] > raw[0]


@pytest.mark.parametrize("gamma", [-0.1, 1.01, 2.0])
def test_hiou_refuses_gamma_outside_unit_interval(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"gamma=.*outside \[0, 1\]"):
        hiou_loss(t(0.5), gamma)


def test_hiou_upweights_accurate_boxes_relative_to_iou_loss() -> None:
    iou = t(0.2, 0.9)
    ratio = hiou_loss(iou, 0.8) / iou_loss(iou)
    assert ratio[1] > ratio[0] > 1.0


# ---------------------------------------------------------------- TC loss (Eq. 8)


def test_entropy_handles_zero_probabilities() -> None:
    probs = t(1.0, 0.0, 0.0).reshape(1, 3)
    assert entropy(probs).item() == 0.0
    uniform = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert entropy(uniform).item() == pytest.approx(math.log(4))


def test_tc_closed_form() -> None:
    probs = t(1.0, 0.0).reshape(1, 2)  # entropy 0 -> beta_e = 1 -> weight 1/2
    got = tc_loss(t(0.9), t(0.3), probs, margin=0.2)
    assert got.item() == pytest.approx(0.5 * (0.6 - 0.2))
    # inside the margin: no loss
    assert tc_loss(t(0.5), t(0.4), probs, margin=0.2).item() == 0.0


def test_tc_weight_shrinks_with_uncertainty() -> None:
    confident = t(0.98, 0.01, 0.01).reshape(1, 3)
    uncertain = t(0.34, 0.33, 0.33).reshape(1, 3)
    a = tc_loss(t(0.9), t(0.1), confident, 0.2)
    b = tc_loss(t(0.9), t(0.1), uncertain, 0.2)
    assert a.item() > b.item() > 0


def test_tc_no_nan_with_zero_probability_and_gradients() -> None:
    logits = torch.tensor([[30.0, -30.0, -30.0]], dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    probs = torch.where(probs < 1e-20, torch.zeros_like(probs), probs)
    loss = tc_loss(probs[:, 0], t(0.2), probs, 0.2, detach_weight=False)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_tc_detach_iou_controls_which_side_moves() -> None:
    probs = t(0.7, 0.3).reshape(1, 2)
    score = torch.tensor([0.9], dtype=torch.float64, requires_grad=True)
    iou = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    tc_loss(score, iou, probs, 0.1).sum().backward()
    assert iou.grad is None and score.grad is not None and score.grad.item() > 0
    iou2 = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    tc_loss(score.detach(), iou2, probs, 0.1, detach_iou=False).sum().backward()
    assert iou2.grad is not None and iou2.grad.item() < 0


def test_tc_refuses_negative_margin() -> None:
    with pytest.raises(ValueError, match="margin"):
        tc_loss(t(0.5), t(0.5), t(0.5, 0.5).reshape(1, 2), -0.1)


# ---------------------------------------------------------------- HarmonicDet (Eq. 11-12)


def test_harmonic_det_closed_form_identical_boxes() -> None:
    """IoU 1 and smooth L1 0: L_loc = 0, so the loss is 2 * CE (+ TC on the score/IoU gap)."""
    cls = t(0.4)
    probs = t(1.0, 0.0).reshape(1, 2)
    score = t(math.exp(-0.4))
    got = harmonic_det_loss(cls, t(0.0), t(1.0), score, probs, alpha=1.5, gamma=0.8, margin=0.2)
    tc = 0.5 * max(0.0, abs(math.exp(-0.4) - 1.0) - 0.2)
    assert got.item() == pytest.approx(2 * 0.4 + tc, abs=1e-12)


def test_harmonic_det_closed_form_known_iou() -> None:
    cls, sl1, iou = 0.7, 0.3, 0.6
    loc = sl1 + 1.5 * (1 + iou) ** 0.8 * (1 - iou)
    expected = (1 + math.exp(-loc)) * cls + (1 + math.exp(-cls)) * loc
    got = harmonic_det_loss(t(cls), t(sl1), t(iou), t(0.5), t(0.5, 0.5).reshape(1, 2), use_tc=False)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    terms = harmonic_det_terms(t(cls), t(sl1), t(iou), None, None, use_tc=False)
    assert terms.loc_raw.item() == pytest.approx(loc)
    assert terms.beta_r.item() == pytest.approx(math.exp(-loc))
    assert terms.beta_c.item() == pytest.approx(math.exp(-cls))


def test_harmonic_det_ablation_variants_differ() -> None:
    args = (t(0.7), t(0.3), t(0.6), t(0.95), t(0.9, 0.1).reshape(1, 2))
    variants = {
        "harmonic": harmonic_det_loss(*args, iou_term="none", use_tc=False),
        "harmonic+tc": harmonic_det_loss(*args, iou_term="none", use_tc=True),
        "harmonic+iou": harmonic_det_loss(*args, iou_term="iou", use_tc=False),
        "harmonic+hiou": harmonic_det_loss(*args, iou_term="hiou", use_tc=False),
        "harmonic+hiou(g=0.5)": harmonic_det_loss(*args, iou_term="hiou", use_tc=False, gamma=0.5),
        "harmonic+hiou(a=0.5)": harmonic_det_loss(*args, iou_term="hiou", use_tc=False, alpha=0.5),
    }
    values = [v.item() for v in variants.values()]
    assert len(set(values)) == len(values)
    assert variants["harmonic+tc"].item() > variants["harmonic"].item()


def test_harmonic_det_degenerate_inputs_stay_finite() -> None:
    n = 64
    g = torch.Generator().manual_seed(0)
    cls = torch.cat([torch.zeros(8), torch.full((8,), 80.0), torch.rand(n - 16, generator=g) * 5])
    sl1 = torch.cat([torch.zeros(8), torch.full((8,), 1e4), torch.rand(n - 16, generator=g)])
    iou = torch.cat([torch.zeros(16), torch.ones(16), torch.rand(n - 32, generator=g)])
    score = torch.cat([torch.zeros(16), torch.ones(16), torch.rand(n - 32, generator=g)])
    probs = torch.zeros(n, 5)
    probs[:, 0] = 1.0
    cls.requires_grad_(True)
    sl1.requires_grad_(True)
    loss = harmonic_det_loss(cls, sl1, iou, score, probs, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    assert cls.grad is not None and torch.isfinite(cls.grad).all()
    assert sl1.grad is not None and torch.isfinite(sl1.grad).all()


def _half_precision_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-positive inputs as an AMP head gives them, in ``dtype``: large and tiny losses, scores of
    0 and 1e-5 (fp16 subnormal), probabilities with zeros."""
    g = torch.Generator().manual_seed(0)
    n = 32
    cls = torch.cat([torch.tensor([0.0, 12.0, 30.0]), torch.rand(n - 3, generator=g) * 4])
    loc = torch.cat([torch.tensor([0.0, 9.0, 0.001]), torch.rand(n - 3, generator=g) * 2])
    iou = torch.cat([torch.tensor([0.0, 1.0, 0.999]), torch.rand(n - 3, generator=g)])
    score = torch.cat([torch.tensor([0.0, 1e-5, 1.0]), torch.rand(n - 3, generator=g)])
    probs = torch.softmax(torch.randn(n, 6, generator=g) * 4, dim=-1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    return {k: v.to(dtype) for k, v in dict(cls=cls, loc=loc, iou=iou, score=score, probs=probs).items()}


def test_upcast_copies_only_half_precision() -> None:
    # the float32 training path pays nothing: the same tensor comes back
    for dtype in (torch.float32, torch.float64):
        x = torch.ones(3, dtype=dtype)
        assert upcast(x) is x
    half = torch.ones(3, dtype=torch.float16, requires_grad=True)
    up = upcast(half)
    assert up.dtype == torch.float32
    up.sum().backward()
    assert half.grad is not None and torch.equal(half.grad, torch.ones(3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_harmonic_det_terms_of_half_precision_inputs_are_the_float32_terms(dtype: torch.dtype) -> None:
    half = _half_precision_inputs(dtype)
    full = {k: v.float() for k, v in half.items()}  # the same rounded values, in float32
    args = ("cls", "loc", "iou", "score", "probs")
    got = harmonic_det_terms(*(half[k] for k in args), coupling="score")
    want = harmonic_det_terms(*(full[k] for k in args), coupling="score")
    for name, g_value, w_value in zip(got._fields, got, want):
        assert g_value.dtype == torch.float32, name
        assert torch.isfinite(g_value).all(), name
        torch.testing.assert_close(g_value, w_value, rtol=1e-6, atol=0.0, msg=name)
    torch.testing.assert_close(
        harmonic_loss(half["cls"], half["loc"]), harmonic_loss(full["cls"], full["loc"]), rtol=1e-6, atol=0.0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["ce", "focal"])
def test_score_gradient_of_half_precision_scores_is_finite(dtype: torch.dtype, form: str) -> None:
    # a clamp to 1e-12 in fp16 is a clamp to 0, and -1/0 is -inf
    x = _half_precision_inputs(dtype)
    d = harmonic_score_gradient(x["score"], x["cls"], x["loc"], form=form, coupling="loss")
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    want = harmonic_score_gradient(
        x["score"].float(), x["cls"].float(), x["loc"].float(), form=form, coupling="loss"
    )
    torch.testing.assert_close(d, want, rtol=1e-6, atol=0.0)
    assert torch.isfinite(cls_loss_grad(x["score"], form)).all()


def test_harmonic_det_needs_iou_for_iou_terms() -> None:
    with pytest.raises(ValueError, match="needs the IoU"):
        harmonic_det_terms(t(1.0), t(1.0), None, None, None, use_tc=False, iou_term="hiou")
    with pytest.raises(ValueError, match="iou_term"):
        harmonic_det_terms(t(1.0), t(1.0), t(0.5), None, None, use_tc=False, iou_term="giou")


# ---------------------------------------------------------------- config


def test_loss_config_defaults_and_resolution() -> None:
    cfg = LossConfig()
    assert (cfg.kind, cfg.alpha, cfg.gamma, cfg.margin, cfg.tc, cfg.detach_factors) == (
        "harmonicdet",
        1.5,
        0.8,
        0.2,
        True,
        False,
    )
    assert cfg.resolved_iou_term == "hiou"
    assert LossConfig(kind="harmonic").resolved_iou_term == "none"
    assert LossConfig(kind="harmonic", iou_term="iou").resolved_iou_term == "iou"
    assert LossConfig.from_any("standard").is_standard
    assert LossConfig.from_any({"kind": "harmonic", "alpha": 1.0}).alpha == 1.0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"gamma": 1.5}, "loss.gamma"),
        ({"gamma": -0.2}, "loss.gamma"),
        ({"margin": -0.1}, "loss.margin"),
        ({"alpha": -1.0}, "loss.alpha"),
        ({"alpha": float("nan")}, "loss.alpha"),
        ({"kind": "focal"}, "loss.kind"),
        ({"iou_term": "giou"}, "loss.iou_term"),
        ({"normalization": "batch"}, "loss.normalization"),
        ({"bogus": 1}, "unknown option"),
    ],
)
def test_loss_config_rejects_bad_options(options: dict, field: str) -> None:
    with pytest.raises(LossConfigError, match=field):
        LossConfig.from_any(options)


# ---------------------------------------------------------------- AIC (Eq. 14)


def test_average_inconsistency() -> None:
    assert average_inconsistency([0.9, 0.5], [0.9, 0.5]) == 0.0
    assert average_inconsistency([0.9, 0.2], [0.5, 0.8]) == pytest.approx((0.4 + 0.6) / 2)
    assert math.isnan(average_inconsistency([], []))
    with pytest.raises(ValueError, match="differ in length"):
        average_inconsistency([0.1], [0.1, 0.2])
