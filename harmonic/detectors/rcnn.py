"""Faster / Mask R-CNN: the HarmonicDet loss on the R-CNN box head (the RPN is unchanged).

What is coupled, per sampled positive RoI (label > 0):

* CE: softmax cross-entropy of the box classifier (torchvision's ``fastrcnn_loss``),
* L (the "smooth L1" of Eq. 2/11): the box head's smooth L1 (beta = 1/9) of the class-specific
  offsets, summed over the 4 coordinates,
* IoU: the box decoded from those offsets (the head's ``BoxCoder``, weights 10, 10, 5, 5) vs the
  matched ground-truth box; score p: the softmax probability of the ground-truth class; the TC
  entropy is that of the full softmax (background included).

Negative RoIs keep their CE (Eq. 13). ``normalization: detector`` divides everything by the number
of sampled RoIs, as torchvision does; ``num_pos`` divides the positive terms by the number of
positive RoIs instead. The mask loss of Mask R-CNN is torchvision's, untouched.

Keys: ``loss_classifier`` (negative CE + (1 + beta_r) CE of the positives), ``loss_box_reg``
((1 + beta_c) L_loc), ``loss_tc`` (only when TC is on), plus the RPN's (and ``loss_mask``).

Parts (:mod:`harmonic.loss_parts`): the box classifier is a softmax, so ``cls`` is its CE; ``box`` and
``box_extra`` replace the smooth L1 (beta 1/9 for ``smooth_l1``, the head's own) of the
class-specific offsets; ``kind: pisa`` adds ``loss_carl``, normalised like ``loss_box_reg``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads

from harmonic.losses import upcast

from .common import HarmonicPart, paired_iou, part_box_loss

__all__ = ["HarmonicRoIHeads"]

#: the box head's smooth L1 transition point (torchvision's ``fastrcnn_loss``)
SMOOTH_L1_BETA = 1 / 9


class HarmonicRoIHeads(HarmonicPart, RoIHeads):
    """``RoIHeads`` whose box loss is the configured Harmonic/HarmonicDet loss.

    Torchvision's forward runs unchanged (so proposals sampling, the mask branch and inference are
    its own); the adapter keeps what it needs from the sampling step and the box predictor's output
    and then replaces the two box-head losses. With ``kind: standard`` the losses are torchvision's
    own values, and only the diagnostics are added.
    """

    _sampled: tuple[Any, ...] | None = None
    _arch = "faster_rcnn"

    def select_training_samples(self, proposals, targets):  # type: ignore[no-untyped-def]
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(
            proposals, targets
        )
        self._sampled = (proposals, matched_idxs, labels, regression_targets, targets)
        return proposals, matched_idxs, labels, regression_targets

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        captured: dict[str, Any] = {}

        def keep_output(_module: Any, _inputs: Any, output: Any) -> None:
            captured["out"] = output

        # The hook is registered per call on whatever module is the predictor now, so replacing
        # ``box_predictor`` (e.g. to fine-tune on new classes) keeps working.
        handle = self.box_predictor.register_forward_hook(keep_output)
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            handle.remove()
        sampled, self._sampled = self._sampled, None
        assert sampled is not None, "select_training_samples did not run"
        class_logits, box_regression = captured["out"]
        losses.update(self._box_losses(class_logits, box_regression, *sampled))
        return result, losses

    def _box_losses(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        labels_list: list[Tensor],
        regression_targets: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        cfg = self.loss_config
        # the adapter's own loss replaces torchvision's two box-head losses (all but the plain baseline)
        replaces = not (cfg.is_standard and self._plain)
        labels = torch.cat(labels_list, dim=0)
        num_sampled = labels.numel()
        pos = torch.where(labels > 0)[0]
        labels_pos = labels[pos]

        with torch.set_grad_enabled(replaces and torch.is_grad_enabled()):
            # float32 at least: under AMP the RPN's proposals are fp16, too coarse for the IoU
            dtype = torch.promote_types(proposals[0].dtype, torch.float32)
            gt_boxes = [
                t["boxes"].to(dtype) if t["boxes"].numel() else proposals[0].new_zeros((1, 4), dtype=dtype)
                for t in targets
            ]
            matched_gt = torch.cat([g[m] for g, m in zip(gt_boxes, matched_idxs)], dim=0)[pos]
            # the positives' offsets in float32: decoded in fp16 (AMP) a box's area overflows
            offsets = upcast(box_regression.reshape(num_sampled, -1, 4)[pos, labels_pos])
            target_offsets = torch.cat(regression_targets, dim=0)[pos]
            pred_boxes = self.box_coder.decode_single(offsets, torch.cat(proposals, dim=0)[pos])
            if self._box_part is None:
                loc = F.smooth_l1_loss(offsets, target_offsets, beta=SMOOTH_L1_BETA, reduction="none")
                loc = loc.sum(dim=1)
            else:
                loc = part_box_loss(
                    self._box_part,
                    offsets,
                    target_offsets,
                    pred_boxes,
                    matched_gt,
                    smooth_l1_beta=SMOOTH_L1_BETA,
                    gamma=cfg.gamma,
                )
            loc = self._with_box_extra(loc, offsets, target_offsets, pred_boxes, matched_gt, SMOOTH_L1_BETA)
            iou = paired_iou(pred_boxes, matched_gt)
            logits_pos = class_logits[pos]
            ce_pos = F.cross_entropy(logits_pos, labels_pos, reduction="none")
            probs = F.softmax(logits_pos, dim=-1)
            score = probs.gather(1, labels_pos[:, None])[:, 0]

        if not replaces:
            self._record_standard(ce_pos, loc, iou, score)
            return {}

        carl: Tensor | None = None
        if self._plain:
            terms = self._couple(ce_pos, loc, iou, score, probs)
        else:
            terms, carl = self._weigh(ce_pos, loc, iou, score, probs)
        neg = labels == 0
        neg_ce = F.cross_entropy(class_logits[neg], labels[neg], reduction="sum")
        denom = max(1, num_sampled)
        pos_denom = denom if cfg.normalization == "detector" else max(1, pos.numel())
        out = {
            "loss_classifier": neg_ce / denom + terms.cls.sum() / pos_denom,
            "loss_box_reg": terms.loc.sum() / pos_denom,
        }
        if self.uses_tc:
            out["loss_tc"] = terms.tc.sum() / pos_denom
        if carl is not None:
            out["loss_carl"] = carl.sum() / pos_denom
        return out
