"""The peer losses: what the field uses against the same score/IoU misalignment and box-loss imbalance.

Each function is element-wise (one value per logit, per coordinate or per box; ``reduction``
``none`` by default) and typed like :mod:`harmonic.losses`, and its docstring cites the paper and
equation it implements. Where torchvision keeps an implementation (the sigmoid focal loss, the
GIoU/DIoU/CIoU losses) the function is a thin wrapper around it. Every function computes in float32
at least (see :func:`harmonic.losses.upcast`). Which detector head takes which of them, and how a
loss is composed of them, is :mod:`harmonic.loss_parts`'s.

Targets (the IoU targets of QFL and VFL, the GHM-C histogram) carry no gradient: the callers pass
detached IoUs, as GFL and VarifocalNet do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

from harmonic.losses import _reduce, upcast

__all__ = [
    "balanced_l1_loss",
    "carl_weights",
    "ciou_loss",
    "diou_loss",
    "ghm_c_loss",
    "ghm_c_weights",
    "giou_loss",
    "quality_focal_loss",
    "sigmoid_focal_loss",
    "varifocal_loss",
]


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", Eq. 5).

    ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)`` per logit, with ``p_t = p`` where the target is 1
    and ``1 - p`` where it is 0; :func:`torchvision.ops.sigmoid_focal_loss`, computed in float32.

    Args:
        logits: any shape, one binary classifier per element.
        targets: same shape, in {0, 1}.
        alpha: weight of the positives (``1 - alpha`` of the negatives); < 0 turns it off.
        gamma: focusing parameter, >= 0.
        reduction: ``none`` | ``mean`` | ``sum``.
    """
    return _tv_sigmoid_focal_loss(upcast(logits), upcast(targets), alpha, gamma, reduction)


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0, reduction: str = "none") -> Tensor:
    """Quality focal loss (Li et al. 2020, "Generalized Focal Loss", Eq. 5).

    ``QFL(sigma) = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))`` per logit, with
    ``sigma`` the sigmoid of the logit and ``y`` the soft target: the IoU of the predicted box with
    its ground truth at the ground-truth class of a positive, 0 everywhere else. It is the binary
    cross-entropy against the soft target, scaled by the distance to it.

    Args:
        logits: any shape (``[N, C]`` in the heads).
        targets: same shape, in [0, 1], no gradient.
        beta: focusing parameter, >= 0 (2 in the paper).
        reduction: ``none`` | ``mean`` | ``sum``.
    """
    logits, targets = upcast(logits), upcast(targets)
    scale = (targets - torch.sigmoid(logits)).abs().pow(beta)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(scale * bce, reduction)


def varifocal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.75, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """Varifocal loss (Zhang et al. 2021, "VarifocalNet: An IoU-aware Dense Object Detector", Eq. 2).

    ``VFL(p, q) = -q (q log p + (1 - q) log(1 - p))`` where ``q > 0`` and ``-alpha p^gamma log(1 - p)``
    where ``q = 0``, with ``p`` the sigmoid of the logit and ``q`` the IoU target (the IoU of the
    predicted box with its ground truth at the ground-truth class of a positive, 0 elsewhere):
    positives are weighted by their own quality, only negatives are down-weighted.

    Args:
        logits: any shape (``[N, C]`` in the heads).
        targets: same shape, in [0, 1], no gradient.
        alpha: weight of the negatives (0.75 in the paper).
        gamma: focusing parameter of the negatives (2 in the paper).
        reduction: ``none`` | ``mean`` | ``sum``.
    """
    logits, targets = upcast(logits), upcast(targets)
    weight = torch.where(targets > 0, targets, alpha * torch.sigmoid(logits).pow(gamma))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(weight * bce, reduction)


def ghm_c_weights(logits: Tensor, targets: Tensor, bins: int = 10, valid: Tensor | None = None) -> Tensor:
    """The harmonizing weights of GHM-C (Li, Liu, Wang 2019, "Gradient Harmonized Single-stage
    Detector", Sec. 3.2-3.3), divided by the number of elements: ``beta_i / N = 1 / GD(g_i)``.

    ``g = |p - p*|`` is the norm of the binary cross-entropy's gradient w.r.t. the logit; the gradient
    density of the unit-region approximation is ``GD(g) = R(g) * M``, with ``M = bins`` equal bins on
    [0, 1] and ``R(g)`` the number of elements whose ``g`` falls in ``g``'s bin. The histogram is the
    one of this call's elements (one batch): the paper's moving average over batches (momentum) is
    left out. mmdetection divides by the number of non-empty bins instead of ``M``.

    Args:
        logits: any shape.
        targets: same shape, in {0, 1}.
        bins: M, >= 1 (30 in the paper's ablation, 10 in its released configs).
        valid: bool, same shape; elements where it is False get weight 0 and are not counted
            (None: every element counts).

    Returns:
        Detached weights of ``logits``'s shape.
    """
    if bins < 1:
        raise ValueError(f"bins={bins} must be >= 1")
    with torch.no_grad():
        g = (torch.sigmoid(upcast(logits)) - upcast(targets)).abs()
        index = (g * bins).floor().clamp(0, bins - 1).long()
        mask = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.expand_as(g)
        counts = torch.bincount(index[mask], minlength=bins).to(g.dtype)
        weights = 1.0 / (bins * counts[index].clamp(min=1.0))
        return torch.where(mask, weights, torch.zeros_like(weights))


def ghm_c_loss(
    logits: Tensor, targets: Tensor, bins: int = 10, valid: Tensor | None = None, reduction: str = "none"
) -> Tensor:
    """GHM-C loss (Li, Liu, Wang 2019, "Gradient Harmonized Single-stage Detector", Eq. 8 with the
    unit-region approximation of Sec. 3.3): ``L = 1/N sum_i beta_i CE(p_i, p*_i)``, ``beta_i = N / GD(g_i)``.

    The sum (``reduction="sum"``) is the loss of the paper: it normalises itself, so a head must not
    divide it by its number of positives. Per batch, without momentum (see :func:`ghm_c_weights`).

    Args:
        logits: any shape, one binary classifier per element.
        targets: same shape, in {0, 1}.
        bins: number of gradient-norm bins M.
        valid: bool, same shape: the elements that take part (None: all).
        reduction: ``none`` (the weighted term of each element; 0 where not valid) | ``mean`` | ``sum``.
    """
    logits, targets = upcast(logits), upcast(targets)
    weights = ghm_c_weights(logits, targets, bins, valid)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(weights * bce, reduction)


def balanced_l1_loss(
    pred: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 1.5, reduction: str = "none"
) -> Tensor:
    """Balanced L1 loss (Pang et al. 2019, "Libra R-CNN", Eq. 8-10), per coordinate.

    With ``x = pred - target`` and ``b`` such that ``alpha ln(b + 1) = gamma`` (Eq. 10)::

        L_b(x) = alpha / b (b|x| + 1) ln(b|x| + 1) - alpha |x|   if |x| < 1
                 gamma |x| + C                                   otherwise

    (Eq. 9), whose gradient is ``alpha ln(b|x| + 1)`` inside and ``gamma`` outside (Eq. 8): inliers
    (accurate boxes) get a larger gradient than under smooth L1, outliers the same bound.
    ``C = gamma / b - alpha`` makes ``L_b`` continuous at ``|x| = 1``.

    Args:
        pred, target: same shape (encoded box offsets in the heads).
        alpha: 0.5 in the paper; > 0.
        gamma: 1.5 in the paper; > 0.
        reduction: ``none`` | ``mean`` | ``sum``.
    """
    if alpha <= 0 or gamma <= 0:
        raise ValueError(f"alpha={alpha} and gamma={gamma} must be > 0")
    x = (upcast(pred) - upcast(target)).abs()
    b = math.exp(gamma / alpha) - 1.0
    inside = alpha / b * (b * x + 1) * torch.log(b * x + 1) - alpha * x
    outside = gamma * x + (gamma / b - alpha)
    return _reduce(torch.where(x < 1.0, inside, outside), reduction)


def carl_weights(score: Tensor, k: float = 1.0, bias: float = 0.2) -> Tensor:
    """The weights of PISA's classification-aware regression loss (Cao et al. 2020, "Prime Sample
    Attention in Object Detection", CARL, Eq. 6-7), one per positive.

    ``v_i = ((1 - b) s_i + b)^k`` (Eq. 6) from the score ``s_i`` of the positive's ground-truth class,
    normalised to average one over the positives, ``c_i = v_i / (1/n sum_j v_j)`` (Eq. 7). The weights
    carry gradient to the scores: ``sum_i c_i L_loc,i`` (Eq. 8) trains the classifier to score the
    well-localised positives higher. PISA adds that sum to the detector's own regression loss.

    Args:
        score: ``[n]`` scores of the positives' ground-truth classes, in [0, 1].
        k: exponent, >= 0 (1 in PISA's configs).
        bias: b in [0, 1] (0.2 in PISA's configs).

    Returns:
        ``[n]`` weights (empty for no positive).
    """
    if k < 0 or not 0.0 <= bias <= 1.0:
        raise ValueError(f"k={k} must be >= 0 and bias={bias} in [0, 1]")
    v = ((1.0 - bias) * upcast(score) + bias).pow(k)
    if v.numel() == 0:
        return v
    return v * (v.numel() / v.sum().clamp(min=1e-12))


def giou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none") -> Tensor:
    """GIoU loss (Rezatofighi et al. 2019, "Generalized Intersection over Union", Alg. 2):
    ``1 - IoU + |C - (A u B)| / |C|`` with ``C`` the smallest box enclosing both;
    :func:`torchvision.ops.generalized_box_iou_loss` of paired ``[N, 4]`` (x1, y1, x2, y2) boxes."""
    return generalized_box_iou_loss(upcast(boxes1), upcast(boxes2), reduction=reduction)


def diou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none") -> Tensor:
    """DIoU loss (Zheng et al. 2020, "Distance-IoU Loss", Eq. 6): ``1 - IoU + rho^2(b, b_gt) / c^2``
    with ``rho`` the distance of the centres and ``c`` the diagonal of the enclosing box;
    :func:`torchvision.ops.distance_box_iou_loss` of paired boxes."""
    return distance_box_iou_loss(upcast(boxes1), upcast(boxes2), reduction=reduction)


def ciou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", min_side: float = 1e-4) -> Tensor:
    """CIoU loss (Zheng et al. 2020, "Distance-IoU Loss", Eq. 10-12): the DIoU loss plus
    ``alpha v``, ``v = 4 / pi^2 (arctan(w_gt / h_gt) - arctan(w / h))^2`` and
    ``alpha = v / ((1 - IoU) + v)``; :func:`torchvision.ops.complete_box_iou_loss` of paired boxes
    (which computes alpha without gradient: a constant weight of v).

    ``boxes1`` are the predictions: a side shorter than ``min_side`` is lengthened to it first, since
    ``w / h`` of an empty box is 0/0 (FCOS predicts such boxes: its distances pass a ReLU).
    """
    boxes1 = upcast(boxes1)
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    boxes1 = torch.stack((x1, y1, torch.maximum(x2, x1 + min_side), torch.maximum(y2, y1 + min_side)), dim=-1)
    return complete_box_iou_loss(boxes1, upcast(boxes2), reduction=reduction)
