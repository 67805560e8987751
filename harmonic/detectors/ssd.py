"""SSD / SSDlite: the HarmonicDet loss in ``SSD.compute_loss`` (softmax CE, smooth L1, hard negatives).

torchvision computes SSD's loss in the model class itself, so the adapter is an ``SSD`` subclass.
What is coupled, per positive default box (matched to a ground-truth box):

* CE: the softmax cross-entropy of the box (background is class 0),
* L (the smooth L1 of Eq. 2/11): SSD's smooth L1 (beta = 1) of the encoded offsets, summed over the
  4 coordinates,
* IoU: the box decoded by SSD's ``BoxCoder`` (weights 10, 10, 5, 5) vs the matched ground truth;
  score p: the softmax probability of the ground-truth class; TC entropy of the full softmax.

Negatives are torchvision's hard negatives (the ``neg_to_pos_ratio`` highest-CE background boxes per
image, chosen on the plain CE) with their CE (Eq. 13). SSD divides everything by the number of
positives of the batch, so ``normalization: detector`` and ``num_pos`` agree here.
Keys: ``bbox_regression``, ``classification``, ``tc`` (when TC is on).

Parts (:mod:`harmonic.loss_parts`): the head is a softmax, so ``cls`` is its CE; ``box`` and
``box_extra`` replace the smooth L1 (beta 1 for ``smooth_l1``, SSD's own); ``kind: pisa`` adds the key
``carl``, normalised like ``bbox_regression``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.ssd import SSD

from harmonic.losses import upcast

from .common import HarmonicPart, paired_iou, part_box_loss

__all__ = ["HarmonicSSD"]

#: SSD's smooth L1 transition point (torchvision's ``SSD.compute_loss``)
SMOOTH_L1_BETA = 1.0


class HarmonicSSD(HarmonicPart, SSD):
    """``SSD`` whose ``compute_loss`` is the configured Harmonic/HarmonicDet loss."""

    _arch = "ssd"

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        if self.loss_config.is_standard and self._plain:
            losses = SSD.compute_loss(self, targets, head_outputs, anchors, matched_idxs)
            with torch.no_grad():
                ce, loc, iou, score, _, _, _ = self._positives(targets, head_outputs, anchors, matched_idxs)
            self._record_standard(ce, loc, iou, score)
            return losses

        ce_pos, loc, iou, score, probs, cls_loss, cls_targets = self._positives(
            targets, head_outputs, anchors, matched_idxs
        )
        carl: Tensor | None = None
        if self._plain:
            terms = self._couple(ce_pos, loc, iou, score, probs)
        else:
            terms, carl = self._weigh(ce_pos, loc, iou, score, probs)

        # torchvision's hard negative mining, on the plain CE of every box
        foreground = cls_targets > 0
        num_negative = self.neg_to_pos_ratio * foreground.sum(1, keepdim=True)
        negative_loss = cls_loss.detach().clone()
        negative_loss[foreground] = -float("inf")
        _, idx = negative_loss.sort(1, descending=True)
        background = idx.sort(1)[1] < num_negative

        denom = max(1, int(foreground.sum()))
        out = {
            "bbox_regression": terms.loc.sum() / denom,
            "classification": (cls_loss[background].sum() + terms.cls.sum()) / denom,
        }
        if self.uses_tc:
            out["tc"] = terms.tc.sum() / denom
        if carl is not None:
            out["carl"] = carl.sum() / denom
        return out

    def _positives(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-positive CE, L, IoU, score, probs (image by image, boxes in order); every box's CE and label."""
        bbox_regression = head_outputs["bbox_regression"]
        cls_logits = head_outputs["cls_logits"]
        loc_l, iou_l, cls_targets = [], [], []
        for tgt, regression, logits, anchors_i, matched in zip(
            targets, bbox_regression, cls_logits, anchors, matched_idxs
        ):
            fg = torch.where(matched >= 0)[0]
            gt = tgt["boxes"][matched[fg]]
            offsets = upcast(regression[fg])  # decoded in float32 (AMP: fp16 areas overflow)
            anchors_fg = anchors_i[fg]
            target_regression = self.box_coder.encode_single(gt, anchors_fg)
            pred = self.box_coder.decode_single(offsets, anchors_fg)
            if self._box_part is None:
                loc = F.smooth_l1_loss(offsets, target_regression, reduction="none").sum(dim=1)
            else:
                loc = part_box_loss(
                    self._box_part,
                    offsets,
                    target_regression,
                    pred,
                    gt,
                    smooth_l1_beta=SMOOTH_L1_BETA,
                    gamma=self.loss_config.gamma,
                )
            loc_l.append(self._with_box_extra(loc, offsets, target_regression, pred, gt, SMOOTH_L1_BETA))
            iou_l.append(paired_iou(pred, gt))
            labels = torch.zeros(logits.size(0), dtype=tgt["labels"].dtype, device=tgt["labels"].device)
            labels[fg] = tgt["labels"][matched[fg]]
            cls_targets.append(labels)
        targets_all = torch.stack(cls_targets)
        num_classes = cls_logits.size(-1)
        foreground = targets_all > 0
        if self.loss_config.is_standard and self._plain:
            # only the positives' CE is needed for the diagnostics
            logits_pos = cls_logits[foreground]
            cls_loss = F.cross_entropy(logits_pos, targets_all[foreground], reduction="none")
            ce_pos = cls_loss
        else:
            cls_loss = F.cross_entropy(
                cls_logits.reshape(-1, num_classes), targets_all.reshape(-1), reduction="none"
            ).view(targets_all.size())
            ce_pos = cls_loss[foreground]
            logits_pos = cls_logits[foreground]
        probs = F.softmax(logits_pos, dim=-1)
        score = probs.gather(1, targets_all[foreground][:, None])[:, 0]
        return ce_pos, torch.cat(loc_l), torch.cat(iou_l), score, probs, cls_loss, targets_all
