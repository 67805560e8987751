"""FCOS: the HarmonicDet loss on ``FCOSHead`` (sigmoid focal classification, GIoU regression).

What is coupled, per positive location (inside a ground-truth box, right scale, centre sampling):

* CE (``LossConfig.sigmoid_cls``): ``focal`` (default) the head's sigmoid focal loss of the location
  summed over the classes; ``bce`` the binary CE of the ground-truth class only (the other classes
  keep their focal loss, as negatives of those classes),
* L (the "smooth L1" of Eq. 2/11, ``LossConfig.fcos_loc``): ``giou`` (default) FCOS's own
  regression loss, the GIoU loss of the decoded box, which keeps the baseline's recipe but counts
  the IoU twice once HIoU is added; ``smooth_l1`` the paper's form, smooth L1 (beta 1/9) of the
  encoded offsets (left/top/right/bottom distances over the anchor size), summed over the 4 sides,
* IoU: the box decoded by the head's ``BoxLinearCoder`` vs the matched ground truth; score p: sigmoid
  of the ground-truth class logit; TC entropy over the normalised per-class sigmoid scores,
* beta_c (``LossConfig.coupling``): ``score`` (default) p itself, as Eq. 5 defines it; ``loss``
  exp(-CE) of the coupled loss (an ablation).

The centre-ness loss is torchvision's, unchanged (key ``bbox_ctrness``). Negatives keep their focal
loss (Eq. 13). FCOS divides everything by the number of positives of the batch, so
``normalization: detector`` and ``num_pos`` agree here. Keys: ``classification``,
``bbox_regression``, ``bbox_ctrness``, ``tc`` (when TC is on).

Parts (:mod:`harmonic.loss_parts`): ``cls`` replaces the focal loss of every location by the quality
focal, varifocal or GHM-C loss (IoU targets: the IoUs above, detached; GHM-C's histogram over every
location of the batch, its sum not divided by the positives); ``box`` replaces the GIoU loss (and
``fcos_loc``: ``box: smooth_l1`` is ``fcos_loc: smooth_l1``). ``kind: pisa`` adds the key ``carl``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from harmonic.losses import upcast
from harmonic.peer_losses import ghm_c_loss, ghm_c_weights

from .common import (
    HarmonicPart,
    gt_score_gradient,
    paired_iou,
    part_box_loss,
    sigmoid_class_probs,
    sigmoid_cls_loss,
    sigmoid_positive_targets,
)

__all__ = ["HarmonicFCOSHead"]

#: smooth L1's transition point on FCOS's encoded offsets (``fcos_loc: smooth_l1``, ``box: smooth_l1``)
SMOOTH_L1_BETA = 1 / 9


class HarmonicFCOSHead(HarmonicPart, FCOSHead):
    """``FCOSHead`` whose ``compute_loss`` is the configured Harmonic/HarmonicDet loss."""

    _arch = "fcos"

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        cfg = self.loss_config
        if not self._plain:
            return self._parts_loss(targets, head_outputs, anchors, matched_idxs)
        standard = cfg.is_standard
        if standard:
            losses = FCOSHead.compute_loss(self, targets, head_outputs, anchors, matched_idxs)

        cls_logits = head_outputs["cls_logits"]  # [B, A, C]
        all_labels, all_boxes = _matched_targets(targets, matched_idxs)
        all_anchors = torch.stack(anchors)
        fg = all_labels >= 0
        num_foreground = int(fg.sum())

        with torch.set_grad_enabled(not standard and torch.is_grad_enabled()):
            labels_fg = all_labels[fg]
            logits_fg = cls_logits[fg]
            gt_fg = all_boxes[fg]
            anchors_fg = all_anchors[fg]
            # the positives' offsets in float32: decoded in fp16 (AMP) a box's area overflows
            regression_fg = upcast(head_outputs["bbox_regression"][fg])
            pred_fg = self.box_coder.decode(regression_fg, anchors_fg)
            giou = generalized_box_iou_loss(pred_fg, gt_fg, reduction="none")
            if not standard and cfg.fcos_loc == "smooth_l1":
                box_loss = F.smooth_l1_loss(
                    regression_fg,
                    self.box_coder.encode(anchors_fg, gt_fg),
                    beta=1 / 9,
                    reduction="none",
                ).sum(dim=1)
            else:
                box_loss = giou
            iou = paired_iou(pred_fg, gt_fg)
            onehot = torch.zeros_like(logits_fg)
            onehot[torch.arange(logits_fg.size(0), device=logits_fg.device), labels_fg] = 1.0
            focal = sigmoid_focal_loss(logits_fg, onehot, reduction="none")
            form = "ce" if cfg.sigmoid_cls == "bce" else "focal"
            if cfg.sigmoid_cls == "bce":
                gt_logit = logits_fg.gather(1, labels_fg[:, None])[:, 0]
                cls_pos = F.binary_cross_entropy_with_logits(
                    gt_logit, torch.ones_like(gt_logit), reduction="none"
                )
            else:
                cls_pos = focal.sum(dim=1)
            sig = torch.sigmoid(logits_fg)
            score = sig.gather(1, labels_fg[:, None])[:, 0]

        if standard:
            self._record_standard(cls_pos, giou, iou, score, form)
            return losses

        terms = self._couple(cls_pos, box_loss, iou, score, sigmoid_class_probs(sig), form)
        logits_bg = cls_logits[~fg]
        negatives = sigmoid_focal_loss(logits_bg, torch.zeros_like(logits_bg), reduction="sum")
        if cfg.sigmoid_cls == "bce":
            negatives = negatives + focal.sum() - focal.gather(1, labels_fg[:, None]).sum()

        ctrness = self._ctrness(head_outputs, fg, anchors_fg, gt_fg)
        denom = max(1, num_foreground)
        out = {
            "classification": (negatives + terms.cls.sum()) / denom,
            "bbox_regression": terms.loc.sum() / denom,
            "bbox_ctrness": ctrness / denom,
        }
        if self.uses_tc:
            out["tc"] = terms.tc.sum() / denom
        return out

    def _ctrness(
        self, head_outputs: dict[str, Tensor], fg: Tensor, anchors_fg: Tensor, gt_fg: Tensor
    ) -> Tensor:
        """Centre-ness: torchvision's loss (summed), on the positives only (the only ones it counts)."""
        reg_targets = self.box_coder.encode(anchors_fg, gt_fg)
        if reg_targets.numel() == 0:
            ctr_targets = reg_targets.new_zeros(reg_targets.shape[:-1])
        else:
            left_right, top_bottom = reg_targets[:, [0, 2]], reg_targets[:, [1, 3]]
            ctr_targets = torch.sqrt(
                (left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0])
            )
        return F.binary_cross_entropy_with_logits(
            head_outputs["bbox_ctrness"].squeeze(dim=2)[fg], ctr_targets, reduction="sum"
        )

    def _parts_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """The loss with parts: the positives' and negatives' terms per part, coupled per ``kind``."""
        cfg = self.loss_config
        cls_part = self._cls_part or "focal"
        box_part = self._box_part or (cfg.fcos_loc if cfg.is_harmonic else "giou")
        cls_logits = head_outputs["cls_logits"]  # [B, A, C]
        all_labels, all_boxes = _matched_targets(targets, matched_idxs)
        fg = all_labels >= 0
        labels_fg, logits_fg, gt_fg = all_labels[fg], cls_logits[fg], all_boxes[fg]
        anchors_fg = torch.stack(anchors)[fg]
        offsets = upcast(head_outputs["bbox_regression"][fg])
        pred_fg = self.box_coder.decode(offsets, anchors_fg)
        target_offsets = self.box_coder.encode(anchors_fg, gt_fg)
        loc = part_box_loss(
            box_part, offsets, target_offsets, pred_fg, gt_fg, smooth_l1_beta=SMOOTH_L1_BETA, gamma=cfg.gamma
        )
        loc = self._with_box_extra(loc, offsets, target_offsets, pred_fg, gt_fg, SMOOTH_L1_BETA)
        iou = paired_iou(pred_fg, gt_fg)
        rows, onehot, soft, sig, score = sigmoid_positive_targets(cls_part, logits_fg, labels_fg, iou)
        denom = max(1, int(fg.sum()))
        d_cls: Tensor | None = None
        if cls_part == "ghm_c":
            full = torch.zeros_like(cls_logits, dtype=torch.float32)
            full[fg] = onehot
            per_logit = ghm_c_loss(cls_logits, full)
            cls_pos = per_logit[fg].sum(dim=1)
            gt_weights = ghm_c_weights(cls_logits, full)[fg][rows, labels_fg]
            d_cls = gt_score_gradient("ghm_c", score, torch.ones_like(score), gt_weights)
        else:
            cls_pos = sigmoid_cls_loss(cls_part, logits_fg, soft).sum(dim=1)
            logits_bg = cls_logits[~fg]
            negatives = sigmoid_cls_loss(cls_part, logits_bg, torch.zeros_like(logits_bg)).sum()
            if cls_part != "focal":
                d_cls = gt_score_gradient(cls_part, score, soft[rows, labels_fg])
        form = "focal" if cls_part == "focal" else "ce"
        terms, carl = self._weigh(cls_pos, loc, iou, score, sigmoid_class_probs(sig), form, d_cls)
        if cls_part == "ghm_c":
            classification = per_logit.sum()  # GHM-C normalises itself
        else:
            classification = (negatives + terms.cls.sum()) / denom
        out = {
            "classification": classification,
            "bbox_regression": terms.loc.sum() / denom,
            "bbox_ctrness": self._ctrness(head_outputs, fg, anchors_fg, gt_fg) / denom,
        }
        if self.uses_tc:
            out["tc"] = terms.tc.sum() / denom
        if carl is not None:
            out["carl"] = carl.sum() / denom
        return out


def _matched_targets(targets: list[dict[str, Tensor]], matched_idxs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The class (-1: background) and the ground-truth box of every location, ``[B, A]`` and ``[B, A, 4]``."""
    labels_l, boxes_l = [], []
    for tgt, matched in zip(targets, matched_idxs):
        if len(tgt["labels"]) == 0:
            labels_l.append(tgt["labels"].new_full((len(matched),), -1))
            boxes_l.append(tgt["boxes"].new_zeros((len(matched), 4)))
            continue
        labels = tgt["labels"][matched.clip(min=0)]
        labels[matched < 0] = -1
        labels_l.append(labels)
        boxes_l.append(tgt["boxes"][matched.clip(min=0)])
    return torch.stack(labels_l), torch.stack(boxes_l)
