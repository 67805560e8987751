"""Loss configuration: every choice the paper leaves open, named once, with its default.

This is the one place where the open decisions of "Reconcile Prediction Consistency for
Balanced Object Detection" (ICCV 2021) are written down. The README's "Loss options" section
mirrors this docstring.

kind
    ``standard``: the detector's own torchvision loss, bit for bit (the baseline arm).
    ``harmonic``: Eq. 2-3 (+ the Task-Contrastive loss, Eq. 8, when ``tc``), on the
    detector's own localisation loss (+ an IoU term when ``iou_term`` is set).
    ``harmonicdet``: Eq. 11-13, i.e. ``harmonic`` with the HIoU term inside L_loc.
    ``pisa``: the detector's own loss plus PISA's classification-aware regression loss (CARL,
    Cao et al. 2020, Eq. 6-8): the localisation term of each positive again, weighted by a
    function of its ground-truth score that carries gradient to the classifier. PISA's sample
    reweighting of the classification (ISR) is left out: it is a sampling scheme, not a loss.
    The kind is the coupling part of a loss described by its parts (:mod:`harmonic.loss_parts`);
    with ``cls``, ``box`` and ``box_extra`` unset each kind is exactly what it was without parts.
cls (None: the head's own)
    The classification term: ``focal`` (torchvision's sigmoid focal loss), ``quality_focal`` (GFL's
    QFL, beta 2, target the IoU of the decoded box), ``varifocal`` (VarifocalNet's VFL, alpha 0.75,
    gamma 2, the same target) or ``ghm_c`` (GHM-C, 10 bins, its histogram per batch, no momentum)
    on a sigmoid head (RetinaNet, FCOS); ``ce`` on a softmax head (every other). QFL and VFL are
    normalised like the focal loss (by the positives); GHM-C normalises itself (its weights sum
    to the share of non-empty bins), so a head does not divide it. Open in the papers for the
    harmonic kinds: the coupled CE of a positive is its QFL/VFL summed over the classes; GHM-C's
    weights depend on the whole batch, not on the positive, so it is refused there.
box (None: the head's own)
    The localisation term (the "smooth L1" of Eq. 2/11 for the harmonic kinds): ``smooth_l1``,
    ``l1`` or ``balanced_l1`` (Libra R-CNN, alpha 0.5, gamma 1.5) of the encoded offsets, summed
    over the 4 coordinates; ``iou``, ``giou``, ``diou``, ``ciou`` or ``hiou`` (with ``gamma``) of the
    decoded box. smooth L1's beta is the head's own where it has one (SSD 1, R-CNN 1/9), 1/9 for
    RetinaNet and FCOS (FCOS's ``fcos_loc: smooth_l1``).
box_extra (None), box_extra_weight (1.0)
    A second localisation term added to ``box`` with that weight (e.g. ``smooth_l1`` + 2 ``giou``).
    For the harmonic kinds it is part of L_loc, before the ``iou_term`` of Eq. 11.
carl_k (1.0), carl_bias (0.2)
    ``pisa`` only: k and b of CARL's weight ``((1 - b) s + b)^k`` (PISA's released configs).
alpha (1.5)
    Weight of the IoU term inside L_loc (Eq. 11). The paper's best value (Table 5).
gamma (0.8)
    HIoU focusing parameter (Eq. 10). Must lie in [0, 1]: the loss is only monotonic in IoU
    for gamma <= 1, and gamma < 0 would down-weight accurate boxes.
margin (0.2)
    Task-Contrastive margin (Eq. 8); must be >= 0.
tc (True)
    Add the Task-Contrastive loss (Table 4 ablates it).
iou_term (None -> ``hiou`` for harmonicdet, ``none`` otherwise)
    The IoU part of L_loc: ``none`` (Harmonic loss only), ``iou`` (1 - IoU, Eq. 9, Table 3's
    "+IoU loss") or ``hiou`` (Eq. 10).
detach_factors (False)
    Open in the paper; the default follows its Eq. 4-7, which differentiate *through*
    beta_c = exp(-CE) (so dL/dp = L_loc - (1 + e^-L_loc)/p for softmax CE). ``True`` treats
    beta_r and beta_c as constant weights.
tc_weight (1.0)
    Weight of the TC term; Eq. 12 adds it with weight 1.
detach_tc_weight (True)
    Open in the paper: whether the entropy weight 1/(1 + beta_e) of Eq. 8 carries gradient.
    Default: no, it is a per-sample weight (a gradient through it would push the classifier to
    raise its entropy just to shrink the TC term).
tc_detach_iou (True)
    Open in the paper: whether the TC term pulls the IoU towards the score as well as the score
    towards the IoU. Default: only the score moves (pulling the IoU of a confident, badly
    localised box down would fight the localisation loss).
sigmoid_cls (``focal``)
    Open in the paper, which only writes softmax CE: which classification loss of a
    sigmoid/focal head (RetinaNet, FCOS) is coupled as CE in Eq. 2/12. ``focal``: the head's own
    focal loss of the positive anchor (summed over classes), so the baseline's hard-example
    weighting is kept; ``bce``: binary CE of the ground-truth class only.
    The score p of such a head is the sigmoid of its ground-truth class, and the distribution
    whose entropy weights TC is the per-class sigmoid scores normalised to sum to one.
coupling (``score``)
    What beta_c of Eq. 2-7 is. ``score`` (default, the paper's Eq. 5): beta_c is the confidence p
    of the ground-truth class, for every head. For a softmax head that is exp(-CE), as the paper
    writes it; for a sigmoid head (RetinaNet, FCOS) it is the sigmoid of the ground-truth class,
    while the classification term keeps the head's own loss (``sigmoid_cls``), so the baseline's
    recipe still fits. ``loss``: beta_c = exp(-CE) of whatever classification loss is coupled (an
    ablation; with a focal loss exp(-focal) hardly depends on p, so (1 + beta_c) stops weighting
    the localisation by the classification quality and Eq. 7's resting point moves: at L_loc = 2
    the ground-truth score settles near 0.07 instead of 0.57).
fcos_loc (``giou``)
    FCOS only (the paper never ran FCOS): the "smooth L1" part of L_loc in Eq. 11. ``giou``
    (default): FCOS's own GIoU loss, bounded in [0, 2], so L_loc = GIoU + alpha HIoU <= 2 + alpha
    and the baseline recipe's learning rate fits; it counts the IoU twice. ``smooth_l1``: the
    paper's form, smooth L1 (beta 1/9) of the encoded box offsets (FCOS's left/top/right/bottom
    distances divided by the location's anchor size) + alpha HIoU. The offsets are unbounded
    distances (a few units per side at the start of training), so this L_loc starts several times
    larger than the GIoU form, and Eq. 7 pushes the scores of more positives down early on; that
    is why GIoU is the default.
normalization (``detector``)
    Open in the paper: ``detector`` keeps each head's own normaliser (torchvision's: RetinaNet
    and FCOS divide by the number of foreground anchors, Faster R-CNN's box head by the number
    of sampled RoIs, SSD by the number of positives), so the loss scale and the learning rate of
    the baseline recipe still fit. ``num_pos`` divides every positive term by the number of
    positives as Eq. 13 writes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from harmonic.loss_parts import BOX_PARTS, CLS_PARTS, HARMONIC_KINDS, BoxPart, ClsPart

LossKind = Literal["standard", "harmonic", "harmonicdet", "pisa"]
IoUTerm = Literal["none", "iou", "hiou"]

_KINDS = ("standard", "harmonic", "harmonicdet", "pisa")
_IOU_TERMS = ("none", "iou", "hiou")


class LossConfigError(ValueError):
    """A loss option is out of range; the message names the option."""


@dataclass(frozen=True)
class LossConfig:
    """Options of the Harmonic / HarmonicDet loss; see the module docstring for each default."""

    kind: LossKind = "harmonicdet"
    alpha: float = 1.5
    gamma: float = 0.8
    margin: float = 0.2
    tc: bool = True
    iou_term: IoUTerm | None = None
    detach_factors: bool = False
    tc_weight: float = 1.0
    detach_tc_weight: bool = True
    tc_detach_iou: bool = True
    sigmoid_cls: Literal["focal", "bce"] = "focal"
    normalization: Literal["detector", "num_pos"] = "detector"
    coupling: Literal["score", "loss"] = "score"
    fcos_loc: Literal["giou", "smooth_l1"] = "giou"
    cls: ClsPart | None = None
    box: BoxPart | None = None
    box_extra: BoxPart | None = None
    box_extra_weight: float = 1.0
    carl_k: float = 1.0
    carl_bias: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise LossConfigError(f"loss.kind: {self.kind!r} is not one of {', '.join(_KINDS)}")
        if self.iou_term is not None and self.iou_term not in _IOU_TERMS:
            raise LossConfigError(f"loss.iou_term: {self.iou_term!r} is not one of {', '.join(_IOU_TERMS)}")
        if self.cls is not None and self.cls not in CLS_PARTS:
            raise LossConfigError(f"loss.cls: {self.cls!r} is not one of {', '.join(CLS_PARTS)}")
        for name in ("box", "box_extra"):
            value = getattr(self, name)
            if value is not None and value not in BOX_PARTS:
                raise LossConfigError(f"loss.{name}: {value!r} is not one of {', '.join(BOX_PARTS)}")
        for name in ("alpha", "gamma", "margin", "tc_weight", "box_extra_weight", "carl_k", "carl_bias"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise LossConfigError(f"loss.{name}: must be a finite number, got {value!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise LossConfigError(
                f"loss.gamma: {self.gamma} is outside [0, 1]; the HIoU loss (Eq. 10) is only monotonic "
                "in IoU for 0 <= gamma <= 1"
            )
        if self.alpha < 0:
            raise LossConfigError(f"loss.alpha: must be >= 0, got {self.alpha}")
        if self.margin < 0:
            raise LossConfigError(f"loss.margin: must be >= 0, got {self.margin}")
        if self.tc_weight < 0:
            raise LossConfigError(f"loss.tc_weight: must be >= 0, got {self.tc_weight}")
        if self.box_extra_weight < 0:
            raise LossConfigError(f"loss.box_extra_weight: must be >= 0, got {self.box_extra_weight}")
        if self.carl_k < 0:
            raise LossConfigError(f"loss.carl_k: must be >= 0, got {self.carl_k}")
        if not 0.0 <= self.carl_bias <= 1.0:
            raise LossConfigError(f"loss.carl_bias: must be in [0, 1], got {self.carl_bias}")
        if self.cls == "ghm_c" and self.kind in HARMONIC_KINDS:
            raise LossConfigError(
                f"loss.cls: ghm_c weighs each sample by the gradient density of the whole batch; kind "
                f"{self.kind} couples each positive's own classification loss: take focal, quality_focal "
                "or varifocal, or kind standard or pisa"
            )
        if self.cls in ("quality_focal", "varifocal", "ghm_c") and self.sigmoid_cls == "bce":
            raise LossConfigError(
                f"loss.sigmoid_cls: bce couples the BCE of the ground-truth class under the focal loss; "
                f"with cls: {self.cls} the coupled loss is that of the cls part: leave sigmoid_cls at focal"
            )
        if self.sigmoid_cls not in ("focal", "bce"):
            raise LossConfigError(f"loss.sigmoid_cls: {self.sigmoid_cls!r} is not one of focal, bce")
        if self.coupling not in ("score", "loss"):
            raise LossConfigError(f"loss.coupling: {self.coupling!r} is not one of score, loss")
        if self.fcos_loc not in ("giou", "smooth_l1"):
            raise LossConfigError(f"loss.fcos_loc: {self.fcos_loc!r} is not one of giou, smooth_l1")
        if self.normalization not in ("detector", "num_pos"):
            raise LossConfigError(
                f"loss.normalization: {self.normalization!r} is not one of detector, num_pos"
            )

    @property
    def resolved_iou_term(self) -> IoUTerm:
        """The IoU term in effect: the explicit one, else ``hiou`` for harmonicdet, else ``none``."""
        if self.iou_term is not None:
            return self.iou_term
        return "hiou" if self.kind == "harmonicdet" else "none"

    @property
    def is_standard(self) -> bool:
        return self.kind == "standard"

    @property
    def is_harmonic(self) -> bool:
        """The kind couples the branches with the harmonic factors (Eq. 2-13)."""
        return self.kind in HARMONIC_KINDS

    @property
    def has_parts(self) -> bool:
        """A part (``cls``, ``box``, ``box_extra``) is set; a head may still find them all its own."""
        return self.cls is not None or self.box is not None or self.box_extra is not None

    @property
    def label(self) -> str:
        """A short name of the loss: the kind, then each part that is set (``pisa+box=giou``)."""
        parts = [f"{n}={getattr(self, n)}" for n in ("cls", "box") if getattr(self, n) is not None]
        if self.box_extra is not None:
            weight = f"{self.box_extra_weight:g}*" if self.box_extra_weight != 1 else ""
            parts.append(f"box_extra={weight}{self.box_extra}")
        return "+".join([self.kind, *parts])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iou_term"] = self.resolved_iou_term
        return d

    @classmethod
    def from_any(cls, value: LossConfig | dict[str, Any] | str | None) -> LossConfig:
        """Build from a ``LossConfig``, a dict (e.g. a spec's ``loss`` section), a kind name or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(kind=value)  # type: ignore[arg-type]
        if isinstance(value, dict):
            return cls(**_known_options(cls, value, "loss", LossConfigError))
        raise LossConfigError(f"loss: expected a LossConfig, dict or kind name, got {type(value).__name__}")


def _known_options(cls: type, value: dict[str, Any], section: str, error: type[ValueError]) -> dict[str, Any]:
    """``value`` when every key is a field of the dataclass ``cls``; else ``error`` naming the unknown ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise error(f"{section}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return value


class EvalProtocolError(ValueError):
    """An evaluation-protocol option is out of range; the message names the option."""


@dataclass(frozen=True)
class EvalProtocol:
    """One evaluation protocol for every detector and both arms of a comparison.

    torchvision's detectors each bring their own inference settings (FCOS keeps detections scored
    >= 0.2, RetinaNet >= 0.05, SSDlite >= 0.001; 100 to 300 per image; NMS at 0.45 to 0.6). A loss
    that lowers the scores of positives would lose recall at FCOS's cut without ranking any worse,
    so the protocol is set on every model that :func:`harmonic.detectors.build_detector` builds,
    with COCO-style defaults.

    score_thresh (0.05)
        Detections scored below it are dropped before NMS.
    max_detections (100)
        Detections kept per image after NMS (COCO's AP uses at most 100).
    nms_thresh (0.5)
        IoU of the final, per-class NMS.
    """

    score_thresh: float = 0.05
    max_detections: int = 100
    nms_thresh: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_thresh < 1.0:
            raise EvalProtocolError(f"eval.score_thresh: must be in [0, 1), got {self.score_thresh}")
        if isinstance(self.max_detections, bool) or int(self.max_detections) != self.max_detections:
            raise EvalProtocolError(f"eval.max_detections: must be an integer, got {self.max_detections!r}")
        if self.max_detections < 1:
            raise EvalProtocolError(f"eval.max_detections: must be >= 1, got {self.max_detections}")
        if not 0.0 < self.nms_thresh <= 1.0:
            raise EvalProtocolError(f"eval.nms_thresh: must be in (0, 1], got {self.nms_thresh}")

    @classmethod
    def from_any(cls, value: EvalProtocol | dict[str, Any] | None) -> EvalProtocol:
        """Build from an ``EvalProtocol``, a dict of its options (a spec's ``eval`` section) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, dict):
            return cls(**_known_options(cls, value, "eval", EvalProtocolError))
        raise EvalProtocolError(f"eval: expected an EvalProtocol or dict, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
