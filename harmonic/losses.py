"""The losses of "Reconcile Prediction Consistency for Balanced Object Detection" (ICCV 2021).

Every function is per sample (one value per positive sample, no hidden reduction), in the style of
``torchvision.ops.sigmoid_focal_loss``; an optional ``reduction`` is offered where it is cheap.
Options the paper leaves open are documented once, in :mod:`harmonic.config`.

Every function computes in float32 at least: under mixed precision (AMP) its inputs may be fp16 or
bf16, whose range and resolution are too small for ``exp``, entropies and probability clamps; the
inputs are per-positive ``[N]``/``[N, C]`` tensors, so the cast costs nothing next to the network.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "upcast",
    "harmonic_loss",
    "hiou_loss",
    "iou_loss",
    "tc_loss",
    "entropy",
    "harmonic_det_terms",
    "harmonic_det_loss",
    "HarmonicTerms",
    "cls_loss_grad",
    "harmonic_score_gradient",
]


def upcast(t: Tensor) -> Tensor:
    """``t`` as float32 unless it is float32 or float64 already (then ``t`` itself, no copy);
    gradient flows through the cast. torchvision's box losses do the same (``_upcast_non_float``)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction: {reduction!r} is not one of none, mean, sum")


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(
            f"gamma={gamma} is outside [0, 1]: the Harmonic IoU loss (Eq. 10) is only monotonic in IoU "
            "for 0 <= gamma <= 1"
        )


def harmonic_loss(
    cls_loss: Tensor, loc_loss: Tensor, *, detach_factors: bool = False, reduction: str = "none"
) -> Tensor:
    """Harmonic loss of each positive sample, Eq. 2-3.

    ``L_har = (1 + beta_r) * CE + (1 + beta_c) * L_loc`` with ``beta_r = exp(-L_loc)`` and
    ``beta_c = exp(-CE)``: each branch is weighted by how well the *other* branch is doing.

    Args:
        cls_loss: per-sample classification loss CE(p_i, y_i), shape ``[N]``, >= 0.
        loc_loss: per-sample localisation loss L(d_i, d^_i), shape ``[N]``, >= 0.
        detach_factors: treat beta_r and beta_c as constants. Default ``False`` follows the
            paper's Eq. 4-7, which differentiate through beta_c.
        reduction: ``none`` | ``mean`` | ``sum``.

    Returns:
        Loss tensor with the reduction applied.
    """
    cls_loss, loc_loss = upcast(cls_loss), upcast(loc_loss)
    beta_r = torch.exp(-loc_loss)
    beta_c = torch.exp(-cls_loss)
    if detach_factors:
        beta_r, beta_c = beta_r.detach(), beta_c.detach()
    return _reduce((1 + beta_r) * cls_loss + (1 + beta_c) * loc_loss, reduction)


def iou_loss(iou: Tensor, reduction: str = "none") -> Tensor:
    """IoU loss, Eq. 9: ``1 - IoU``."""
    return _reduce(1 - upcast(iou), reduction)


def hiou_loss(iou: Tensor, gamma: float = 0.8, reduction: str = "none") -> Tensor:
    """Harmonic IoU loss, Eq. 10: ``(1 + IoU)^gamma * (1 - IoU)``.

    The factor ``(1 + IoU)^gamma`` up-weights accurate boxes so that the many low-IoU positives
    do not dominate the localisation loss.

    Args:
        iou: IoU of each predicted box with its ground truth, shape ``[N]``, in [0, 1].
        gamma: focusing parameter in [0, 1]; outside that range the loss is not monotonic in IoU
            (or up-weights bad boxes) and is refused.
        reduction: ``none`` | ``mean`` | ``sum``.

    Returns:
        Loss tensor with the reduction applied.
    """
    _check_gamma(gamma)
    iou = upcast(iou).clamp(0.0, 1.0)
    return _reduce((1 + iou).pow(gamma) * (1 - iou), reduction)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy over the last dimension, ``-sum p log p`` with ``0 log 0 = 0``."""
    probs = upcast(probs)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def tc_loss(
    score: Tensor,
    iou: Tensor,
    probs: Tensor,
    margin: float = 0.2,
    *,
    detach_weight: bool = True,
    detach_iou: bool = True,
    reduction: str = "none",
) -> Tensor:
    """Task-Contrastive loss, Eq. 8.

    ``L_TC = 1 / (1 + beta_e) * max(0, |p - IoU| - margin)`` with ``beta_e = exp(H(probs))``:
    score and IoU are pulled together, less so where the classifier is uncertain.

    Args:
        score: predicted probability of the ground-truth class, shape ``[N]``.
        iou: IoU of the predicted box with its ground truth, shape ``[N]``.
        probs: class distribution of each sample, shape ``[N, C]`` (entropy over the last dim;
            a probability of exactly 0 contributes 0, never NaN).
        margin: gaps below it are ignored; >= 0.
        detach_weight: treat the entropy weight as a constant (see :mod:`harmonic.config`).
        detach_iou: let only the score move towards the IoU (see :mod:`harmonic.config`).
        reduction: ``none`` | ``mean`` | ``sum``.

    Returns:
        Loss tensor with the reduction applied.
    """
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0")
    score, iou = upcast(score), upcast(iou)
    weight = 1.0 / (1.0 + torch.exp(entropy(probs)))
    if detach_weight:
        weight = weight.detach()
    if detach_iou:
        iou = iou.detach()
    gap = torch.relu((score - iou).abs() - margin)
    return _reduce(weight * gap, reduction)


class HarmonicTerms(NamedTuple):
    """The parts of Eq. 12 for each positive sample (all shape ``[N]``)."""

    cls: Tensor  # (1 + beta_r) * CE
    loc: Tensor  # (1 + beta_c) * L_loc
    tc: Tensor  # tc_weight * L_TC (zeros when TC is off)
    loc_raw: Tensor  # L_loc of Eq. 11 (smooth L1 + alpha * IoU term)
    beta_r: Tensor
    beta_c: Tensor

    @property
    def total(self) -> Tensor:
        return self.cls + self.loc + self.tc


def harmonic_det_terms(
    cls_loss: Tensor,
    smooth_l1: Tensor,
    iou: Tensor | None,
    score: Tensor | None,
    probs: Tensor | None,
    *,
    alpha: float = 1.5,
    gamma: float = 0.8,
    margin: float = 0.2,
    use_tc: bool = True,
    iou_term: str = "hiou",
    detach_factors: bool = False,
    tc_weight: float = 1.0,
    detach_tc_weight: bool = True,
    tc_detach_iou: bool = True,
    coupling: str = "loss",
) -> HarmonicTerms:
    """The terms of the HarmonicDet loss of each positive sample, Eq. 11-12.

    ``L_loc = smoothL1 + alpha * L_HIoU`` (Eq. 11) and
    ``L = (1 + beta_r) CE + (1 + beta_c) L_loc + L_TC`` with ``beta_r = exp(-L_loc)``,
    ``beta_c = exp(-CE)`` (Eq. 12). ``iou_term`` selects the IoU part of L_loc for the paper's
    ablations: ``hiou`` (Eq. 10), ``iou`` (Eq. 9) or ``none`` (Harmonic loss, Eq. 2).

    ``iou`` may be None only when neither an IoU term nor TC needs it; ``score``/``probs`` may be
    None only when TC is off.

    ``coupling`` says what beta_c is: ``loss`` (``exp(-cls_loss)``, Eq. 5 as written for softmax CE)
    or ``score`` (the confidence ``score`` of the ground-truth class, which Eq. 5 makes it; for a
    sigmoid head whose coupled loss is focal the two differ, see :mod:`harmonic.config`).
    """
    if coupling not in ("loss", "score"):
        raise ValueError(f"coupling={coupling!r} is not one of loss, score")
    if iou_term not in ("none", "iou", "hiou"):
        raise ValueError(f"iou_term={iou_term!r} is not one of none, iou, hiou")
    cls_loss, loc = upcast(cls_loss), upcast(smooth_l1)
    iou = None if iou is None else upcast(iou)
    score = None if score is None else upcast(score)
    if iou_term != "none":
        if iou is None:
            raise ValueError(f"iou_term={iou_term!r} needs the IoU of each positive")
        extra = hiou_loss(iou, gamma) if iou_term == "hiou" else iou_loss(iou)
        loc = loc + alpha * extra
    beta_r = torch.exp(-loc)
    if coupling == "score":
        if score is None:
            raise ValueError("coupling='score' needs the score of each positive")
        beta_c = score
    else:
        beta_c = torch.exp(-cls_loss)
    if detach_factors:
        beta_r, beta_c = beta_r.detach(), beta_c.detach()
    cls_term = (1 + beta_r) * cls_loss
    loc_term = (1 + beta_c) * loc
    if use_tc and tc_weight > 0:
        if iou is None or score is None or probs is None:
            raise ValueError("the Task-Contrastive loss needs iou, score and probs")
        tc = tc_weight * tc_loss(
            score, iou, probs, margin, detach_weight=detach_tc_weight, detach_iou=tc_detach_iou
        )
    else:
        tc = torch.zeros_like(cls_term)
    return HarmonicTerms(cls_term, loc_term, tc, loc, beta_r.detach(), beta_c.detach())


def harmonic_det_loss(
    cls_loss: Tensor,
    smooth_l1: Tensor,
    iou: Tensor | None,
    score: Tensor | None,
    probs: Tensor | None,
    *,
    alpha: float = 1.5,
    gamma: float = 0.8,
    margin: float = 0.2,
    use_tc: bool = True,
    iou_term: str = "hiou",
    detach_factors: bool = False,
    tc_weight: float = 1.0,
    detach_tc_weight: bool = True,
    tc_detach_iou: bool = True,
    reduction: str = "none",
) -> Tensor:
    """HarmonicDet loss of each positive sample, Eq. 11-12 (HIoU inside L_loc, plus TC).

    Args:
        cls_loss: per-sample classification loss CE(p_i, y_i), shape ``[N]``.
        smooth_l1: per-sample smooth L1 of the box offsets (summed over the 4 coordinates), ``[N]``.
        iou: IoU of each decoded box with its ground truth, ``[N]``.
        score: probability of the ground-truth class, ``[N]``.
        probs: class distribution (for the TC entropy weight), ``[N, C]``.
        alpha: weight of the IoU term in L_loc (Eq. 11).
        gamma: HIoU focusing parameter in [0, 1] (Eq. 10).
        margin: TC margin (Eq. 8).
        use_tc: add the Task-Contrastive loss.
        iou_term: ``hiou`` (paper), ``iou`` or ``none`` (ablations of Table 3).
        detach_factors, tc_weight, detach_tc_weight, tc_detach_iou: see :mod:`harmonic.config`.
        reduction: ``none`` | ``mean`` | ``sum``.

    Returns:
        Loss tensor with the reduction applied. Negatives' CE (Eq. 13) is added by the detector.
    """
    terms = harmonic_det_terms(
        cls_loss,
        smooth_l1,
        iou,
        score,
        probs,
        alpha=alpha,
        gamma=gamma,
        margin=margin,
        use_tc=use_tc,
        iou_term=iou_term,
        detach_factors=detach_factors,
        tc_weight=tc_weight,
        detach_tc_weight=detach_tc_weight,
        tc_detach_iou=tc_detach_iou,
    )
    return _reduce(terms.total, reduction)


#: torchvision's ``sigmoid_focal_loss`` defaults, used by its RetinaNet and FCOS heads.
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def cls_loss_grad(score: Tensor, form: str) -> Tensor:
    """d CE / d p of a positive's classification loss as a function of its ground-truth score p.

    Args:
        score: p, the probability of the ground-truth class, ``[N]``.
        form: ``ce`` (softmax CE or the BCE of the ground-truth class: ``-log p``) or ``focal``
            (torchvision's sigmoid focal loss of the ground-truth class,
            ``-a (1 - p)^g log p`` with a = 0.25, g = 2; the other classes' terms do not depend on p).

    Returns:
        ``[N]`` tensor (always < 0: a higher score lowers the loss).
    """
    p = upcast(score).clamp(min=1e-12, max=1.0)  # (1e-12 is 0 in fp16: the clamp needs float32)
    if form == "ce":
        return -1.0 / p
    if form == "focal":
        a, g = FOCAL_ALPHA, FOCAL_GAMMA
        q = (1.0 - p).clamp(min=0.0)
        return a * (g * q.pow(g - 1) * torch.log(p) - q.pow(g) / p)
    raise ValueError(f"form={form!r} is not one of ce, focal")


def harmonic_score_gradient(
    score: Tensor,
    cls_loss: Tensor,
    loc_loss: Tensor,
    *,
    form: str = "ce",
    coupling: str = "score",
    detach_factors: bool = False,
    harmonic: bool = True,
    d_cls: Tensor | None = None,
) -> Tensor:
    """dL/dp of each positive's loss w.r.t. its ground-truth score p, in closed form (Eq. 4-7).

    For the Harmonic loss ``L = (1 + beta_r) CE + (1 + beta_c) L_loc``,
    ``dL/dp = (1 + beta_r) dCE/dp + (dbeta_c/dp) L_loc``; with softmax CE and ``beta_c = p`` this is
    Eq. 7, ``L_loc - (1 + e^-L_loc) / p``. Where it is positive, gradient descent lowers the score
    of that positive: the localisation is bad enough that a confident classification is penalised.
    The Task-Contrastive term (which pulls p towards the IoU) is not included. For the standard
    loss (``harmonic=False``) it is ``dCE/dp``, never positive.

    Args:
        score: p of each positive, ``[N]``.
        cls_loss: the coupled classification loss of each positive, ``[N]`` (for ``coupling='loss'``).
        loc_loss: L_loc of each positive (Eq. 11), ``[N]``.
        form: the classification loss's form, see :func:`cls_loss_grad`.
        coupling: ``score`` (beta_c = p) or ``loss`` (beta_c = exp(-cls_loss)).
        detach_factors: the factors are constants (then dbeta_c/dp = 0).
        harmonic: False for the standard loss.
        d_cls: dCE/dp of each positive when it is no function of p alone (the quality focal and
            varifocal losses also depend on their IoU target, :mod:`harmonic.peer_losses`); it
            replaces ``form``'s closed form.

    Returns:
        ``[N]`` tensor, detached.
    """
    with torch.no_grad():
        d_cls = cls_loss_grad(score.detach(), form) if d_cls is None else upcast(d_cls.detach())
        if not harmonic:
            return d_cls
        loc = upcast(loc_loss.detach())
        beta_r = torch.exp(-loc)
        if detach_factors:
            d_beta_c = torch.zeros_like(d_cls)
        elif coupling == "score":
            d_beta_c = torch.ones_like(d_cls)
        else:
            d_beta_c = -torch.exp(-upcast(cls_loss.detach())) * d_cls
        return (1.0 + beta_r) * d_cls + d_beta_c * loc
