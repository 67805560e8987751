"""SSD's multibox loss (Liu et al. 2016, Eq. 1-3), the loss DSSD and RefineDet train with, in parts:
targets of matched default boxes, per-box softmax CE, per-positive smooth L1, hard negative mining.

torchvision's ``SSD.compute_loss`` is this loss for one set of boxes; RefineDet needs it twice (its
anchor refinement module on binary labels, its detection module on the refined anchors, with the
anchors that negative anchor filtering drops taking no part), so here it is in parts, each per box
(no hidden reduction). :func:`multibox_loss` puts them together: on the same boxes it gives what
``SSD.compute_loss`` gives (a test checks it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

__all__ = [
    "IGNORED",
    "MultiboxTargets",
    "hard_negatives",
    "match",
    "multibox_loss",
    "multibox_targets",
    "smooth_l1",
]

#: ``matched`` value of a box that is neither positive nor a negative candidate.
IGNORED = -2


def match(
    matcher: det_utils.SSDMatcher, gt_boxes: Tensor, anchors: Tensor, keep: Tensor | None = None
) -> Tensor:
    """Index of the ground-truth box each anchor is matched to, -1 for background (SSD's matching:
    IoU >= the threshold, plus each ground truth's best anchor), :data:`IGNORED` where ``keep`` is False.

    Args:
        matcher: torchvision's ``SSDMatcher``.
        gt_boxes: ``[G, 4]`` (x1, y1, x2, y2).
        anchors: ``[A, 4]``.
        keep: ``[A]`` bool, the anchors that take part (None: all). A dropped anchor is never any
            ground truth's best anchor unless every anchor is dropped.
    """
    if gt_boxes.numel() == 0:
        matched = torch.full((anchors.size(0),), -1, dtype=torch.int64, device=anchors.device)
    else:
        quality = box_ops.box_iou(gt_boxes, anchors)
        if keep is not None:
            quality = quality.masked_fill(~keep[None], -1.0)
        matched = matcher(quality)
    if keep is not None:
        matched = matched.masked_fill(~keep, IGNORED)
    return matched


class MultiboxTargets(NamedTuple):
    """What the boxes of a batch are trained towards; ``[B, A]`` per box, ``[P, 4]`` per positive
    (positives in the order of ``positive``'s nonzero entries)."""

    labels: Tensor  # [B, A] class of each box, 0 for background (and for ignored boxes)
    positive: Tensor  # [B, A] bool
    candidate: Tensor  # [B, A] bool: may be picked as a negative (neither positive nor ignored)
    gt_boxes: Tensor  # [P, 4] the matched ground-truth box of each positive
    anchors: Tensor  # [P, 4] the positive's own box (default box or refined anchor)


def multibox_targets(
    targets: list[dict[str, Tensor]], anchors: list[Tensor], matched: list[Tensor], *, binary: bool = False
) -> MultiboxTargets:
    """The targets of a batch from its matches (:func:`match`); ``binary``: every positive is class 1
    (RefineDet's anchor refinement module: object or not)."""
    labels, gt_boxes, positive_anchors = [], [], []
    for target, anchors_i, matched_i in zip(targets, anchors, matched):
        fg = torch.where(matched_i >= 0)[0]
        gt = matched_i[fg]
        label = torch.zeros(matched_i.shape, dtype=torch.int64, device=matched_i.device)
        label[fg] = 1 if binary else target["labels"][gt]
        labels.append(label)
        gt_boxes.append(target["boxes"][gt])
        positive_anchors.append(anchors_i[fg])
    matched_all = torch.stack(matched)
    return MultiboxTargets(
        torch.stack(labels),
        matched_all >= 0,
        matched_all == -1,
        torch.cat(gt_boxes),
        torch.cat(positive_anchors),
    )


def smooth_l1(box_coder: det_utils.BoxCoder, bbox_regression: Tensor, t: MultiboxTargets) -> Tensor:
    """Smooth L1 (beta 1) of each positive's predicted offsets against its encoded ground truth, summed
    over the 4 coordinates (SSD's L_loc, Eq. 2), ``[P]``; ``bbox_regression`` is ``[B, A, 4]``."""
    target = box_coder.encode_single(t.gt_boxes, t.anchors)
    return F.smooth_l1_loss(bbox_regression[t.positive], target, reduction="none").sum(dim=1)


def hard_negatives(cls_loss: Tensor, t: MultiboxTargets, neg_to_pos_ratio: float) -> Tensor:
    """SSD's hard negative mining: in each image, the ``neg_to_pos_ratio`` x #positives candidate boxes
    with the highest classification loss (chosen on its value, no gradient), ``[B, A]`` bool.

    As torchvision's ``SSD.compute_loss``, except that a positive or ignored box is never picked even
    when an image has fewer candidates than it asks for.
    """
    loss = cls_loss.detach().masked_fill(~t.candidate, -float("inf"))
    num_negative = neg_to_pos_ratio * t.positive.sum(1, keepdim=True)
    _, order = loss.sort(1, descending=True)
    return (order.sort(1)[1] < num_negative) & t.candidate


def multibox_loss(
    box_coder: det_utils.BoxCoder,
    cls_logits: Tensor,
    bbox_regression: Tensor,
    t: MultiboxTargets,
    neg_to_pos_ratio: float = 3.0,
) -> dict[str, Tensor]:
    """SSD's loss, Eq. 1: ``(sum of the CE of positives and hard negatives + sum of L_loc) / N``.

    Args:
        box_coder: encodes the ground truth against the boxes (torchvision's (10, 10, 5, 5)).
        cls_logits: ``[B, A, C]`` (class 0: background).
        bbox_regression: ``[B, A, 4]`` predicted offsets.
        t: the targets (:func:`multibox_targets`).
        neg_to_pos_ratio: negatives per positive (3 in SSD, DSSD and RefineDet).

    Returns:
        ``{"classification", "bbox_regression"}``, each divided by N = max(1, #positives of the batch).
    """
    cls_loss = F.cross_entropy(cls_logits.flatten(0, 1), t.labels.flatten(), reduction="none").view_as(
        t.labels
    )
    negative = hard_negatives(cls_loss, t, neg_to_pos_ratio)
    n = max(1, int(t.positive.sum()))
    return {
        "classification": (cls_loss[t.positive].sum() + cls_loss[negative].sum()) / n,
        "bbox_regression": smooth_l1(box_coder, bbox_regression, t).sum() / n,
    }
