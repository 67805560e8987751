"""What every detector adapter shares: the coupling of the per-positive terms, diagnostics, NMS-off.

Each adapter (:mod:`.rcnn`, :mod:`.retinanet`, :mod:`.ssd`, :mod:`.fcos`) gathers, for the positive
samples of one training step, the quantities of Eq. 11-12:

* ``cls_loss``: the head's classification loss of the positive (softmax CE, or the sigmoid head's
  focal/BCE loss, see ``LossConfig.sigmoid_cls``),
* ``loc_loss``: the head's *own* regression loss of the positive, summed over its 4 coordinates
  (it plays the part of the smooth L1 term of Eq. 2/11, see each adapter's docstring),
* ``iou``: IoU of the box decoded from the predicted offsets (with the head's box coder) with the
  matched ground-truth box,
* ``score``/``probs``: the probability of the ground-truth class and the class distribution whose
  entropy weights the Task-Contrastive loss,

and hands them to :meth:`HarmonicPart._couple`, which applies :func:`harmonic.losses.harmonic_det_terms`
and records the diagnostics. beta_c is the score p of the ground-truth class (``coupling: score``,
Eq. 5) on every head; negatives keep the head's own classification loss (Eq. 13).

The diagnostics of a step are, per positive: ``score`` (p), ``iou``, ``beta_r``, ``beta_c`` and
``dl_dp``, the closed-form gradient of its loss w.r.t. p (:func:`harmonic.losses.harmonic_score_gradient`;
positive where Eq. 7 pushes the score down).

A loss with parts (``LossConfig.cls``, ``box``, ``box_extra``, ``kind: pisa``; see
:mod:`harmonic.loss_parts`) goes through the same quantities: the adapter computes ``cls_loss`` and
``loc_loss`` with the parts (:func:`part_box_loss`, :func:`sigmoid_cls_loss`) and
:meth:`HarmonicPart._weigh` couples them per ``kind``. A part equal to the head's own is no part: the
preset's code path runs, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from harmonic.config import LossConfig
from harmonic.loss_parts import effective_box, effective_cls
from harmonic.losses import (
    HarmonicTerms,
    harmonic_det_terms,
    harmonic_score_gradient,
    hiou_loss,
    iou_loss,
    upcast,
)
from harmonic.peer_losses import (
    balanced_l1_loss,
    carl_weights,
    ciou_loss,
    diou_loss,
    giou_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
    varifocal_loss,
)

__all__ = [
    "HarmonicPart",
    "gt_score_gradient",
    "paired_iou",
    "part_box_loss",
    "per_sample_box_loss",
    "sigmoid_cls_loss",
    "pop_diagnostics",
    "pre_nms_predictions",
    "unwrap",
]

DIAGNOSTIC_KEYS = ("score", "iou", "beta_r", "beta_c", "dl_dp")


def paired_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of each box with the box at the same index, ``[N, 4] x [N, 4] -> [N]`` (x1, y1, x2, y2).

    Unlike :func:`torchvision.ops.box_iou` (all pairs) this is the element-wise IoU; it carries
    gradient to both inputs and lies in [0, 1] (degenerate boxes give 0, never NaN). It computes in
    float32 whatever the inputs' dtype: an fp16 area overflows past 256 x 256 px (AMP's decoded boxes).
    """
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    return (inter / (area1 + area2 - inter + eps)).clamp(0.0, 1.0)


def per_sample_box_loss(
    loss_type: str,
    box_coder: Any,
    anchors: Tensor,
    matched_gt_boxes: Tensor,
    bbox_regression: Tensor,
    pred_boxes: Tensor,
    beta: float = 1.0,
) -> Tensor:
    """torchvision's ``_box_loss`` of one image, one value per positive (no reduction).

    Summing the result gives exactly what the head's own regression loss sums, so the "smooth L1"
    term of Eq. 2/11 is the head's regression loss, per sample, summed over the 4 coordinates.

    Args:
        loss_type: ``l1`` | ``smooth_l1`` | ``giou`` | ``diou`` | ``ciou`` (the head's ``_loss_type``).
        box_coder: the head's box coder (``encode_single`` for the offset losses).
        anchors: anchors of the positives, ``[N, 4]``.
        matched_gt_boxes: their ground-truth boxes, ``[N, 4]``.
        bbox_regression: predicted offsets, ``[N, 4]``.
        pred_boxes: boxes decoded from ``bbox_regression`` (for the IoU-type losses), ``[N, 4]``.
        beta: smooth L1 transition point.

    Returns:
        ``[N]`` tensor.
    """
    if loss_type in ("l1", "smooth_l1"):
        target = box_coder.encode_single(matched_gt_boxes, anchors)
        if loss_type == "l1":
            return F.l1_loss(bbox_regression, target, reduction="none").sum(dim=1)
        return F.smooth_l1_loss(bbox_regression, target, reduction="none", beta=beta).sum(dim=1)
    if loss_type == "giou":
        return generalized_box_iou_loss(pred_boxes, matched_gt_boxes, reduction="none")
    if loss_type == "diou":
        return distance_box_iou_loss(pred_boxes, matched_gt_boxes, reduction="none")
    if loss_type == "ciou":
        return complete_box_iou_loss(pred_boxes, matched_gt_boxes, reduction="none")
    raise ValueError(f"unsupported regression loss {loss_type!r}; expected l1, smooth_l1, giou, diou or ciou")


def part_box_loss(
    part: str,
    offsets: Tensor,
    target_offsets: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    *,
    smooth_l1_beta: float,
    gamma: float,
) -> Tensor:
    """The localisation part ``part`` of each positive, ``[N]`` (see :mod:`harmonic.loss_parts`).

    Args:
        part: one of :data:`harmonic.loss_parts.BOX_PARTS`.
        offsets: predicted offsets, ``[N, 4]`` (for ``smooth_l1``, ``l1``, ``balanced_l1``: summed
            over the 4 coordinates).
        target_offsets: the ground truth encoded by the head's box coder, ``[N, 4]``.
        pred_boxes: boxes decoded from ``offsets`` (for the IoU-type parts), ``[N, 4]``.
        gt_boxes: their ground-truth boxes, ``[N, 4]``.
        smooth_l1_beta: smooth L1's transition point.
        gamma: HIoU's focusing parameter (Eq. 10).
    """
    if part == "smooth_l1":
        return F.smooth_l1_loss(offsets, target_offsets, beta=smooth_l1_beta, reduction="none").sum(dim=1)
    if part == "l1":
        return F.l1_loss(offsets, target_offsets, reduction="none").sum(dim=1)
    if part == "balanced_l1":
        return balanced_l1_loss(offsets, target_offsets).sum(dim=1)
    if part == "iou":
        return iou_loss(paired_iou(pred_boxes, gt_boxes))
    if part == "hiou":
        return hiou_loss(paired_iou(pred_boxes, gt_boxes), gamma)
    if part == "giou":
        return giou_loss(pred_boxes, gt_boxes)
    if part == "diou":
        return diou_loss(pred_boxes, gt_boxes)
    if part == "ciou":
        return ciou_loss(pred_boxes, gt_boxes)
    raise ValueError(f"box part {part!r} is none of smooth_l1, l1, balanced_l1, iou, giou, diou, ciou, hiou")


def sigmoid_cls_loss(part: str, logits: Tensor, targets: Tensor) -> Tensor:
    """The classification part ``part`` of a sigmoid head per logit, ``logits``'s shape.

    ``targets``: one-hot ground-truth classes for ``focal``; for ``quality_focal`` and ``varifocal``
    the one-hot classes times the (detached) IoU of each positive's decoded box. GHM-C needs the
    whole batch at once and is computed by the heads with :func:`harmonic.peer_losses.ghm_c_loss`.
    """
    if part == "focal":
        return sigmoid_focal_loss(logits, targets)
    if part == "quality_focal":
        return quality_focal_loss(logits, targets)
    if part == "varifocal":
        return varifocal_loss(logits, targets)
    raise ValueError(f"sigmoid classification part {part!r} is none of focal, quality_focal, varifocal")


def gt_score_gradient(part: str, score: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """d/dp of a positive's classification part at its ground-truth class, p its score, ``[N]``.

    The other classes' terms do not depend on p. ``target``: the ground-truth class's target (the
    IoU for ``quality_focal``/``varifocal``, 1 for ``ghm_c``); ``weight``: GHM-C's weight of that
    element. Differentiated by autograd through the loss itself, so it cannot drift from it.
    """
    with torch.no_grad():
        p = upcast(score.detach()).clamp(1e-6, 1 - 1e-6)
        target = upcast(target.detach())
    with torch.enable_grad():
        p.requires_grad_(True)
        logit = torch.logit(p)
        if part == "ghm_c":
            assert weight is not None
            value = weight.detach() * F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        else:
            value = sigmoid_cls_loss(part, logit, target)
        (grad,) = torch.autograd.grad(value.sum(), p)
    return grad


def sigmoid_class_probs(probs_sigmoid: Tensor) -> Tensor:
    """Per-class sigmoid scores normalised to sum to one (the TC entropy of a sigmoid head), in float32
    (the clamp's 1e-12 is 0 in fp16)."""
    probs_sigmoid = upcast(probs_sigmoid)
    return probs_sigmoid / probs_sigmoid.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def sigmoid_positive_targets(
    cls_part: str, logits_fg: Tensor, labels: Tensor, iou: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The positives' targets on a sigmoid head: row indices, one-hot targets, the targets of the
    classification part (QFL and VFL: the IoU of the box at the class, without gradient), the
    sigmoid scores, and each positive's score at its ground-truth class."""
    rows = torch.arange(labels.numel(), device=labels.device)
    onehot = torch.zeros_like(logits_fg, dtype=torch.float32)
    onehot[rows, labels] = 1.0
    soft = onehot * iou.detach()[:, None] if cls_part in ("quality_focal", "varifocal") else onehot
    sig = torch.sigmoid(logits_fg)
    return rows, onehot, soft, sig, sig.gather(1, labels[:, None])[:, 0]


class HarmonicPart:
    """Mixin of the torchvision part that computes a detector's loss.

    It holds the :class:`~harmonic.config.LossConfig` and the diagnostics of the last training step.
    It adds no parameters or buffers, so the state dict stays torchvision's.
    """

    loss_config: LossConfig
    _diagnostics: dict[str, Tensor] | None
    #: the arch whose head the adapter is (for DSSD, SSDlite and Mask R-CNN: SSD's and Faster R-CNN's)
    _arch: ClassVar[str]
    #: the classification and localisation parts other than the head's own (None: its own)
    _cls_part: str | None
    _box_part: str | None

    def _init_harmonic(self, loss_config: LossConfig) -> None:
        self.loss_config = loss_config
        self._diagnostics = None
        cfg = loss_config
        self._cls_part = effective_cls(cfg, self._arch)
        self._box_part = effective_box(cfg, self._arch)
        # The options of Eq. 11-12, mapped once here rather than unpacked at every step.
        self._terms_options: dict[str, Any] = {
            "alpha": cfg.alpha,
            "gamma": cfg.gamma,
            "margin": cfg.margin,
            "use_tc": cfg.tc,
            "iou_term": cfg.resolved_iou_term,
            "detach_factors": cfg.detach_factors,
            "tc_weight": cfg.tc_weight,
            "detach_tc_weight": cfg.detach_tc_weight,
            "tc_detach_iou": cfg.tc_detach_iou,
            "coupling": cfg.coupling,
        }

    def _record(self, score: Tensor, iou: Tensor, beta_r: Tensor, beta_c: Tensor, dl_dp: Tensor) -> None:
        # Kept on the device: the copy to the CPU (a sync on GPUs) happens only when someone pops them.
        self._diagnostics = {
            "score": score.detach().float(),
            "iou": iou.detach().float(),
            "beta_r": beta_r.detach().float(),
            "beta_c": beta_c.detach().float(),
            "dl_dp": dl_dp.detach().float(),
        }

    def _couple(
        self,
        cls_loss: Tensor,
        loc_loss: Tensor,
        iou: Tensor,
        score: Tensor,
        probs: Tensor,
        form: str = "ce",
        d_cls: Tensor | None = None,
    ) -> HarmonicTerms:
        """The harmonic terms of the positives (Eq. 11-12 per ``loss_config``); records diagnostics.

        ``form`` is the coupled classification loss's form (``ce`` or ``focal``, see
        :func:`harmonic.losses.cls_loss_grad`), for the ``dl_dp`` diagnostic; ``d_cls`` replaces it
        for a classification part (:func:`gt_score_gradient`).
        """
        terms = harmonic_det_terms(cls_loss, loc_loss, iou, score, probs, **self._terms_options)
        dl_dp = harmonic_score_gradient(
            score,
            cls_loss,
            terms.loc_raw,
            form=form,
            coupling=self._terms_options["coupling"],
            detach_factors=self._terms_options["detach_factors"],
            d_cls=d_cls,
        )
        self._record(score, iou, terms.beta_r, terms.beta_c, dl_dp)
        return terms

    def _record_standard(
        self,
        cls_loss: Tensor,
        loc_loss: Tensor,
        iou: Tensor,
        score: Tensor,
        form: str = "ce",
        d_cls: Tensor | None = None,
    ) -> None:
        """Diagnostics of the baseline: beta_r = exp(-L_loc) of the head's own loss, beta_c as the
        configured coupling defines it, and dL/dp of the standard loss (never positive)."""
        with torch.no_grad():
            beta_c = score if self.loss_config.coupling == "score" else torch.exp(-cls_loss)
            dl_dp = harmonic_score_gradient(score, cls_loss, loc_loss, form=form, harmonic=False, d_cls=d_cls)
            self._record(score, iou, torch.exp(-loc_loss), beta_c, dl_dp)

    @property
    def _plain(self) -> bool:
        """No part other than the head's own and no CARL: the preset's own code path runs."""
        cfg = self.loss_config
        return (
            self._cls_part is None and self._box_part is None and cfg.box_extra is None and cfg.kind != "pisa"
        )

    def _with_box_extra(
        self,
        loc: Tensor,
        offsets: Tensor,
        target_offsets: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        smooth_l1_beta: float,
    ) -> Tensor:
        """``loc`` plus ``box_extra_weight`` times the ``box_extra`` part (``loc`` when it is unset)."""
        cfg = self.loss_config
        if cfg.box_extra is None:
            return loc
        extra = part_box_loss(
            cfg.box_extra,
            offsets,
            target_offsets,
            pred_boxes,
            gt_boxes,
            smooth_l1_beta=smooth_l1_beta,
            gamma=cfg.gamma,
        )
        return loc + cfg.box_extra_weight * extra

    def _weigh(
        self,
        cls_loss: Tensor,
        loc_loss: Tensor,
        iou: Tensor,
        score: Tensor,
        probs: Tensor,
        form: str = "ce",
        d_cls: Tensor | None = None,
    ) -> tuple[HarmonicTerms, Tensor | None]:
        """The positives' terms of a loss with parts, coupled per ``kind``, and CARL's per-positive
        term (``kind: pisa``, else None); records the diagnostics.

        ``standard``/``pisa``: the terms are ``cls_loss`` and ``loc_loss`` themselves (no TC);
        ``harmonic``/``harmonicdet``: :meth:`_couple`. ``score`` must carry gradient for CARL.
        """
        cfg = self.loss_config
        if cfg.is_harmonic:
            return self._couple(cls_loss, loc_loss, iou, score, probs, form, d_cls), None
        self._record_standard(cls_loss.detach(), loc_loss.detach(), iou, score.detach(), form, d_cls)
        with torch.no_grad():
            beta_r, beta_c = torch.exp(-loc_loss), score.detach()
        terms = HarmonicTerms(cls_loss, loc_loss, torch.zeros_like(loc_loss), loc_loss, beta_r, beta_c)
        if cfg.kind != "pisa":
            return terms, None
        return terms, carl_weights(score, cfg.carl_k, cfg.carl_bias) * loc_loss

    @property
    def uses_tc(self) -> bool:
        cfg = self.loss_config
        return cfg.is_harmonic and cfg.tc and cfg.tc_weight > 0


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DDP/DataParallel wrapper or a ``torch.compile`` module."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def pop_diagnostics(model: nn.Module, *, to_cpu: bool = True) -> dict[str, Tensor]:
    """Return and clear the per-positive diagnostics of the last training forward.

    Args:
        model: a detector from :func:`harmonic.detectors.build_detector` (DDP-wrapped is fine).
        to_cpu: copy them to the CPU (on a GPU, a wait for the step); False leaves them on the
            model's device, for a caller that reads many steps at once
            (:meth:`harmonic.analysis.TrainingDiagnostics.update_steps`).

    Returns:
        ``{"score", "iou", "beta_r", "beta_c", "dl_dp"}`` -> 1-D detached float tensors over the
        positives of that step (``score``: probability p of the ground-truth class; ``iou``: decoded
        box vs its ground truth; ``beta_r = exp(-L_loc)``; ``beta_c``: p, or exp(-CE) with
        ``coupling: loss``; ``dl_dp``: dL/dp, positive where the loss pushes p down), or ``{}`` if
        nothing was recorded since the last call.
    """
    parts: list[dict[str, Tensor]] = []
    for module in unwrap(model).modules():
        if isinstance(module, HarmonicPart) and module._diagnostics is not None:
            parts.append(module._diagnostics)
            module._diagnostics = None
    if not parts:
        return {}
    out = {k: torch.cat([p[k] for p in parts]) for k in DIAGNOSTIC_KEYS}
    return {k: v.cpu() for k, v in out.items()} if to_cpu else out


def _nms_holder(model: nn.Module) -> nn.Module:
    # R-CNNs do their final NMS in the RoI heads; the one-stage detectors in the model itself.
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads if roi_heads is not None else model


@contextmanager
def nms_disabled(model: nn.Module, max_detections: int = 100_000) -> Iterator[None]:
    """Turn the detector's final NMS off: IoU threshold 1.0 (nothing is suppressed) and a large
    detections-per-image cap; the previous values are restored on exit, even on error."""
    holder = _nms_holder(unwrap(model))
    saved = (holder.nms_thresh, holder.detections_per_img)
    setattr(holder, "nms_thresh", 1.0)  # noqa: B010 (mypy: nn.Module attributes are Tensor | Module)
    setattr(holder, "detections_per_img", max_detections)  # noqa: B010
    try:
        yield
    finally:
        setattr(holder, "nms_thresh", saved[0])  # noqa: B010
        setattr(holder, "detections_per_img", saved[1])  # noqa: B010


@torch.no_grad()
def pre_nms_predictions(model: nn.Module, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Eval-mode predictions with the final NMS turned off, for the NMS audit of the analyses.

    What still applies: the detector's score threshold (``score_thresh``), its per-level top-k
    candidates (``topk_candidates``, one-stage detectors), the removal of tiny boxes (R-CNN), and for
    Faster/Mask R-CNN the RPN's own proposal NMS (the proposals are the R-CNN's samples, not
    detections). Only the last, per-class NMS and the detections-per-image cap are lifted.

    Args:
        model: a detector (plain torchvision or from ``build_detector``; DDP-wrapped is fine).
        images: list of ``[3, H, W]`` tensors in 0-1.

    Returns:
        One ``{"boxes", "scores", "labels"}`` dict per image (masks too for Mask R-CNN).
    """
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        with nms_disabled(inner):
            return inner(images)
    finally:
        inner.train(was_training)
