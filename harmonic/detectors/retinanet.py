"""RetinaNet: the HarmonicDet loss on ``RetinaNetHead`` (sigmoid focal classification, L1 regression).

What is coupled, per positive anchor (matched to a ground-truth box):

* CE (``LossConfig.sigmoid_cls``): ``focal`` (default) the head's sigmoid focal loss of the anchor
  summed over the classes; ``bce`` the binary CE of the ground-truth class only (the other classes
  of that anchor keep their focal loss, as negatives of those classes),
* L (the "smooth L1" of Eq. 2/11): the head's own regression loss per anchor (``_loss_type``; L1 of
  the encoded offsets by default in torchvision's RetinaNet), summed over the 4 coordinates,
* IoU: the box decoded by the head's ``BoxCoder`` (weights 1, 1, 1, 1) vs the matched ground truth;
  score p: sigmoid of the ground-truth class logit; TC entropy over the per-class sigmoid scores
  normalised to sum to one,
* beta_c (``LossConfig.coupling``): ``score`` (default) p itself, as Eq. 5 defines it; ``loss``
  exp(-CE) of the coupled loss above (an ablation).

Negative anchors keep their focal loss (Eq. 13); anchors between the IoU thresholds stay ignored.
``normalization: detector`` keeps torchvision's normaliser (each image divided by its number of
positives, then averaged over the images); ``num_pos`` divides the positive terms by the number of
positives of the whole batch. Keys: ``classification``, ``bbox_regression``, ``tc`` (when TC is on).

Parts (:mod:`harmonic.loss_parts`): ``cls`` replaces the focal loss of every anchor (positives and
negatives) by the quality focal, varifocal or GHM-C loss, whose IoU targets are the IoUs above
(detached); GHM-C's histogram takes every anchor that is not ignored, over the batch, and its sum is
the classification loss as it stands (not divided by the positives). ``box`` replaces the L1 of the
offsets (smooth L1 with beta 1/9 for ``smooth_l1``). ``kind: pisa`` adds the key ``carl``, normalised
like ``bbox_regression``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import sigmoid_focal_loss

from harmonic.losses import upcast
from harmonic.peer_losses import ghm_c_loss, ghm_c_weights

from .common import (
    HarmonicPart,
    gt_score_gradient,
    paired_iou,
    part_box_loss,
    per_sample_box_loss,
    sigmoid_class_probs,
    sigmoid_cls_loss,
    sigmoid_positive_targets,
)

__all__ = ["HarmonicRetinaNetHead"]

#: smooth L1's transition point when a part asks for it (RetinaNet's own loss is L1; detectron's 1/9)
SMOOTH_L1_BETA = 1 / 9


class HarmonicRetinaNetHead(HarmonicPart, RetinaNetHead):
    """``RetinaNetHead`` whose ``compute_loss`` is the configured Harmonic/HarmonicDet loss."""

    _arch = "retinanet"

    def compute_loss(  # type: ignore[override]
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        cfg = self.loss_config
        if not self._plain:
            return self._parts_loss(targets, head_outputs, anchors, matched_idxs)
        if cfg.is_standard:
            losses = RetinaNetHead.compute_loss(self, targets, head_outputs, anchors, matched_idxs)
            with torch.no_grad():
                cls_pos, loc, iou, score, _, _, _ = self._positives(
                    targets, head_outputs, anchors, matched_idxs, False
                )
            self._record_standard(cls_pos, loc, iou, score, self._form)
            return losses

        cls_pos, loc, iou, score, probs, counts, neg_sums = self._positives(
            targets, head_outputs, anchors, matched_idxs, True
        )
        terms = self._couple(cls_pos, loc, iou, score, probs, self._form)
        num_images = max(1, len(targets))
        per_image = counts.clamp(min=1).to(loc.dtype)
        negatives = (neg_sums / per_image).sum() / num_images
        if cfg.normalization == "detector":
            # each positive weighs 1 / (positives of its image) / images, as in torchvision
            weight = torch.repeat_interleave(1.0 / (per_image * num_images), counts)
        else:
            weight = loc.new_full(loc.shape, 1.0 / max(1, int(loc.numel())))
        out = {
            "classification": negatives + (terms.cls * weight).sum(),
            "bbox_regression": (terms.loc * weight).sum(),
        }
        if self.uses_tc:
            out["tc"] = (terms.tc * weight).sum()
        return out

    @property
    def _form(self) -> str:
        return "ce" if self.loss_config.sigmoid_cls == "bce" else "focal"

    def _positives(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
        with_negatives: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-positive CE, L, IoU, score, probs over the batch, positives per image, negatives' sums."""
        bce = self.loss_config.sigmoid_cls == "bce"
        reg_head = self.regression_head
        cls_l, loc_l, iou_l, score_l, probs_l, counts, neg_l = [], [], [], [], [], [], []
        for tgt, logits, regression, anchors_i, matched in zip(
            targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            fg = torch.where(matched >= 0)[0]
            labels = tgt["labels"][matched[fg]]
            gt = tgt["boxes"][matched[fg]]
            logits_fg = logits[fg]
            onehot = torch.zeros_like(logits_fg)
            onehot[torch.arange(fg.numel(), device=fg.device), labels] = 1.0
            focal = sigmoid_focal_loss(logits_fg, onehot, reduction="none")
            gt_logit = logits_fg.gather(1, labels[:, None])[:, 0]
            if bce:
                cls_pos = F.binary_cross_entropy_with_logits(
                    gt_logit, torch.ones_like(gt_logit), reduction="none"
                )
            else:
                cls_pos = focal.sum(dim=1)
            offsets = upcast(regression[fg])  # decoded in float32 (AMP: fp16 areas overflow)
            anchors_fg = anchors_i[fg]
            pred = reg_head.box_coder.decode_single(offsets, anchors_fg)
            loc_l.append(
                per_sample_box_loss(reg_head._loss_type, reg_head.box_coder, anchors_fg, gt, offsets, pred)
            )
            iou_l.append(paired_iou(pred, gt))
            sig = torch.sigmoid(logits_fg)
            score_l.append(sig.gather(1, labels[:, None])[:, 0])
            probs_l.append(sigmoid_class_probs(sig))
            cls_l.append(cls_pos)
            counts.append(fg.numel())
            if with_negatives:
                # Matcher: -1 below the low threshold (negative), -2 between the thresholds (ignored)
                bg = matched == -1
                neg = sigmoid_focal_loss(logits[bg], torch.zeros_like(logits[bg]), reduction="sum")
                if bce:
                    # the non-ground-truth classes of a positive anchor are negatives of those classes
                    neg = neg + focal.sum() - focal.gather(1, labels[:, None]).sum()
                neg_l.append(neg)
        device = head_outputs["cls_logits"].device
        return (
            torch.cat(cls_l),
            torch.cat(loc_l),
            torch.cat(iou_l),
            torch.cat(score_l),
            torch.cat(probs_l),
            torch.tensor(counts, device=device),
            torch.stack(neg_l) if neg_l else torch.zeros(0, device=device),
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
        box_part = self._box_part
        reg_head = self.regression_head
        all_logits = head_outputs["cls_logits"]
        cls_l, loc_l, iou_l, score_l, probs_l, d_l, counts, neg_l = [], [], [], [], [], [], [], []
        ghm_targets, ghm_valid, fg_l = [], [], []
        for tgt, logits, regression, anchors_i, matched in zip(
            targets, all_logits, head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            fg = torch.where(matched >= 0)[0]
            labels = tgt["labels"][matched[fg]]
            gt = tgt["boxes"][matched[fg]]
            offsets = upcast(regression[fg])
            anchors_fg = anchors_i[fg]
            pred = reg_head.box_coder.decode_single(offsets, anchors_fg)
            iou = paired_iou(pred, gt)
            target_offsets = reg_head.box_coder.encode_single(gt, anchors_fg)
            if box_part is None:
                loc = per_sample_box_loss(
                    reg_head._loss_type, reg_head.box_coder, anchors_fg, gt, offsets, pred
                )
            else:
                loc = part_box_loss(
                    box_part,
                    offsets,
                    target_offsets,
                    pred,
                    gt,
                    smooth_l1_beta=SMOOTH_L1_BETA,
                    gamma=cfg.gamma,
                )
            loc_l.append(self._with_box_extra(loc, offsets, target_offsets, pred, gt, SMOOTH_L1_BETA))
            logits_fg = logits[fg]
            rows, onehot, soft, sig, score = sigmoid_positive_targets(cls_part, logits_fg, labels, iou)
            if cls_part == "ghm_c":
                full = torch.zeros_like(logits, dtype=torch.float32)
                full[fg] = onehot
                ghm_targets.append(full)
                ghm_valid.append(matched != -2)  # -2: between the thresholds, ignored
                fg_l.append((fg, labels))
            else:
                cls_l.append(sigmoid_cls_loss(cls_part, logits_fg, soft).sum(dim=1))
                bg = logits[matched == -1]
                neg_l.append(sigmoid_cls_loss(cls_part, bg, torch.zeros_like(bg)).sum())
                if cls_part != "focal":
                    d_l.append(gt_score_gradient(cls_part, score, soft[rows, labels]))
            iou_l.append(iou)
            score_l.append(score)
            probs_l.append(sigmoid_class_probs(sig))
            counts.append(fg.numel())
        device = all_logits.device
        loc, iou, score = torch.cat(loc_l), torch.cat(iou_l), torch.cat(score_l)
        counts_t = torch.tensor(counts, device=device)
        ghm_total: Tensor | None = None
        if cls_part == "ghm_c":
            full_targets, valid = torch.stack(ghm_targets), torch.stack(ghm_valid)[..., None]
            per_logit = ghm_c_loss(all_logits, full_targets, valid=valid)
            ghm_total = per_logit.sum()
            cls_pos = torch.cat([per_logit[i][fg].sum(dim=1) for i, (fg, _) in enumerate(fg_l)])
            w = ghm_c_weights(all_logits, full_targets, valid=valid)
            gt_weights = torch.cat([w[i][fg, labels] for i, (fg, labels) in enumerate(fg_l)])
            d_cls: Tensor | None = gt_score_gradient("ghm_c", score, torch.ones_like(score), gt_weights)
        else:
            cls_pos = torch.cat(cls_l)
            d_cls = torch.cat(d_l) if d_l else None
        form = "focal" if cls_part == "focal" else "ce"
        terms, carl = self._weigh(cls_pos, loc, iou, score, torch.cat(probs_l), form, d_cls)
        num_images = max(1, len(targets))
        per_image = counts_t.clamp(min=1).to(loc.dtype)
        if cfg.normalization == "detector":
            weight = torch.repeat_interleave(1.0 / (per_image * num_images), counts_t)
        else:
            weight = loc.new_full(loc.shape, 1.0 / max(1, int(loc.numel())))
        if ghm_total is not None:
            classification = ghm_total  # GHM-C normalises itself
        else:
            negatives = (torch.stack(neg_l) / per_image).sum() / num_images
            classification = negatives + (terms.cls * weight).sum()
        out = {"classification": classification, "bbox_regression": (terms.loc * weight).sum()}
        if self.uses_tc:
            out["tc"] = (terms.tc * weight).sum()
        if carl is not None:
            out["carl"] = (carl * weight).sum()
        return out
