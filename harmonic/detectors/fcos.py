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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from harmonic.losses import upcast

from .common import HarmonicPart, paired_iou, sigmoid_class_probs

__all__ = ["HarmonicFCOSHead"]


class HarmonicFCOSHead(HarmonicPart, FCOSHead):
    """``FCOSHead`` whose ``compute_loss`` is the configured Harmonic/HarmonicDet loss."""

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        cfg = self.loss_config
        standard = cfg.is_standard
        if standard:
            losses = FCOSHead.compute_loss(self, targets, head_outputs, anchors, matched_idxs)

        cls_logits = head_outputs["cls_logits"]  # [B, A, C]
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
        all_labels, all_boxes, all_anchors = torch.stack(labels_l), torch.stack(boxes_l), torch.stack(anchors)
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

        # centre-ness: torchvision's loss, on the positives only (the only ones it counts)
        reg_targets = self.box_coder.encode(anchors_fg, gt_fg)
        if reg_targets.numel() == 0:
            ctr_targets = reg_targets.new_zeros(reg_targets.shape[:-1])
        else:
            left_right, top_bottom = reg_targets[:, [0, 2]], reg_targets[:, [1, 3]]
            ctr_targets = torch.sqrt(
                (left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0])
            )
        ctrness = F.binary_cross_entropy_with_logits(
            head_outputs["bbox_ctrness"].squeeze(dim=2)[fg], ctr_targets, reduction="sum"
        )
        denom = max(1, num_foreground)
        out = {
            "classification": (negatives + terms.cls.sum()) / denom,
            "bbox_regression": terms.loc.sum() / denom,
            "bbox_ctrness": ctrness / denom,
        }
        if self.uses_tc:
            out["tc"] = terms.tc.sum() / denom
        return out
