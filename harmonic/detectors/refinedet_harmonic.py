"""RefineDet: the Harmonic / HarmonicDet loss on the object detection module (ODM); the anchor
refinement module (ARM) keeps its own binary multibox loss, whatever the loss kind.

Why only the ODM: its boxes and scores are the detections, so it is where the paper's consistency
between score and localisation is wanted; the ARM's objectness and first regression only pick and
place the anchors the ODM starts from. The paper reports RefineDet rows without saying which
module its loss went to; this is the choice. What is coupled, per positive refined anchor (matched
to a ground truth, not dropped by negative anchor filtering):

* CE: the softmax cross-entropy of the anchor's ODM scores (background is class 0),
* L (the smooth L1 of Eq. 2/11): smooth L1 (beta 1) of the ODM offsets against the ground truth
  encoded from the refined anchor (weights 10, 10, 5, 5), summed over the 4 coordinates,
* IoU: the box decoded from the ODM offsets and the refined anchor vs its ground truth; score p: the
  softmax probability of the ground-truth class; TC entropy of the full softmax.

Negatives are the ODM's hard negatives (3 per positive, chosen on the plain CE among the anchors
that survive the filtering) with their CE (Eq. 13). Everything is divided by the ODM's number of
positives, so ``normalization: detector`` and ``num_pos`` agree. ``kind: standard`` is
:class:`~.refinedet.RefineDet`'s loss unchanged. Keys: those of RefineDet, plus ``tc`` (when TC is on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonic.losses import upcast

from .common import HarmonicPart, paired_iou
from .multibox import MultiboxTargets, hard_negatives, smooth_l1
from .refinedet import RefineDet

__all__ = ["HarmonicRefineDet"]


class HarmonicRefineDet(HarmonicPart, RefineDet):
    """``RefineDet`` whose ODM loss is the configured Harmonic/HarmonicDet loss."""

    _arch = "refinedet"

    def odm_loss(self, odm: dict[str, Tensor], t: MultiboxTargets) -> dict[str, Tensor]:
        if self.loss_config.is_standard:
            losses = RefineDet.odm_loss(self, odm, t)
            with torch.no_grad():
                ce, loc, iou, score, _ = self._positives(odm, t)
            self._record_standard(ce, loc, iou, score)
            return losses
        cls_logits = odm["cls_logits"]
        cls_loss = F.cross_entropy(cls_logits.flatten(0, 1), t.labels.flatten(), reduction="none").view_as(
            t.labels
        )
        ce_pos, loc, iou, score, probs = self._positives(odm, t, cls_loss[t.positive])
        terms = self._couple(ce_pos, loc, iou, score, probs)
        negative = hard_negatives(cls_loss, t, self.neg_to_pos_ratio)
        n = max(1, int(t.positive.sum()))
        out = {
            "classification": (cls_loss[negative].sum() + terms.cls.sum()) / n,
            "bbox_regression": terms.loc.sum() / n,
        }
        if self.uses_tc:
            out["tc"] = terms.tc.sum() / n
        return out

    def _positives(
        self, odm: dict[str, Tensor], t: MultiboxTargets, ce_pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-positive CE, L, IoU, score and class distribution (positives in ``t``'s order)."""
        logits_pos = odm["cls_logits"][t.positive]
        labels_pos = t.labels[t.positive]
        if ce_pos is None:
            ce_pos = F.cross_entropy(logits_pos, labels_pos, reduction="none")
        regression = odm["bbox_regression"]
        loc = smooth_l1(self.box_coder, regression, t)
        # the positives' offsets decoded in float32 (AMP: fp16 areas overflow)
        iou = paired_iou(self.box_coder.decode_single(upcast(regression[t.positive]), t.anchors), t.gt_boxes)
        probs = F.softmax(logits_pos, dim=-1)
        score = probs.gather(1, labels_pos[:, None])[:, 0]
        return ce_pos, loc, iou, score, probs
