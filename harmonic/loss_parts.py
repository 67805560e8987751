"""A loss described by its parts, and which detector heads take which parts: plain data, no torch, so
a spec is checked completely (``hdet spec check``, the REST API) without building a model.

A loss has three parts:

* the classification term, ``cls`` (:data:`CLS_PARTS`): the sigmoid focal loss, quality focal loss,
  varifocal loss or GHM-C on a sigmoid head (one binary classifier per class: RetinaNet, FCOS); the
  softmax cross-entropy on a softmax head (one distribution over the classes and the background:
  SSD, SSDlite, DSSD, Faster/Mask R-CNN, RefineDet);
* the localisation term, ``box`` (:data:`BOX_PARTS`), plus an optional second one, ``box_extra``,
  weighted by ``box_extra_weight``: smooth L1, L1 and balanced L1 of the head's encoded box offsets,
  or the IoU, GIoU, DIoU, CIoU and HIoU losses of its decoded boxes;
* the coupling, which ``kind`` names: ``standard`` (none), ``harmonic``/``harmonicdet`` (the
  paper's harmonic factors, Eq. 2-13) or ``pisa`` (PISA's classification-aware regression loss added
  to the localisation term).

A part left unset (None) is the head's own (:data:`OWN_CLS`, :data:`OWN_BOX`); a part equal to the
head's own is the same as leaving it unset, so the presets are exactly what they were. The tensor
functions are in :mod:`harmonic.peer_losses`; this module only says what fits together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from harmonic.config import LossConfig

__all__ = [
    "BOX_PARTS",
    "CLS_PARTS",
    "BoxPart",
    "ClsPart",
    "HARMONIC_KINDS",
    "OWN_BOX",
    "OWN_CLS",
    "PARTS_ARCHS",
    "SIGMOID_CLS_PARTS",
    "SIGMOID_HEADS",
    "check_loss_fits",
    "effective_box",
    "effective_cls",
    "loss_problems",
]

ClsPart = Literal["ce", "focal", "quality_focal", "varifocal", "ghm_c"]
BoxPart = Literal["smooth_l1", "l1", "balanced_l1", "iou", "giou", "diou", "ciou", "hiou"]
CLS_PARTS: tuple[str, ...] = get_args(ClsPart)
#: classification parts of one binary classifier per class
SIGMOID_CLS_PARTS: tuple[str, ...] = ("focal", "quality_focal", "varifocal", "ghm_c")
BOX_PARTS: tuple[str, ...] = get_args(BoxPart)
HARMONIC_KINDS: tuple[str, ...] = ("harmonic", "harmonicdet")

#: heads with one sigmoid classifier per class; every other head is a softmax over the classes
SIGMOID_HEADS: tuple[str, ...] = ("retinanet", "fcos")
#: the heads whose loss takes parts; RefineDet's two-step multibox loss takes the presets only
PARTS_ARCHS: tuple[str, ...] = ("retinanet", "fcos", "ssd", "ssdlite", "dssd", "faster_rcnn", "mask_rcnn")

#: each head's own classification loss (torchvision's)
OWN_CLS: dict[str, str] = {
    "retinanet": "focal",
    "fcos": "focal",
    "ssd": "ce",
    "ssdlite": "ce",
    "dssd": "ce",
    "faster_rcnn": "ce",
    "mask_rcnn": "ce",
    "refinedet": "ce",
}
#: each head's own localisation loss (torchvision's: RetinaNet L1 of the offsets, FCOS GIoU,
#: SSD smooth L1 with beta 1, the R-CNN box head smooth L1 with beta 1/9)
OWN_BOX: dict[str, str] = {
    "retinanet": "l1",
    "fcos": "giou",
    "ssd": "smooth_l1",
    "ssdlite": "smooth_l1",
    "dssd": "smooth_l1",
    "faster_rcnn": "smooth_l1",
    "mask_rcnn": "smooth_l1",
    "refinedet": "smooth_l1",
}


def effective_cls(cfg: LossConfig, arch: str) -> str | None:
    """The classification part ``arch`` trains with when it is not its own; None: its own."""
    return None if cfg.cls in (None, OWN_CLS[arch]) else cfg.cls


def effective_box(cfg: LossConfig, arch: str) -> str | None:
    """The localisation part ``arch`` trains with when it is not its own; None: its own (for FCOS's
    harmonic kinds, ``fcos_loc`` then says which)."""
    return None if cfg.box in (None, OWN_BOX[arch]) else cfg.box


def _heads(names: tuple[str, ...]) -> str:
    return ", ".join(names)


def loss_problems(cfg: LossConfig, arch: str) -> list[tuple[str, str]]:
    """Every reason ``arch``'s head cannot train with ``cfg``, as ``(field path, message)`` pairs.

    The options each make sense alone (:class:`~harmonic.config.LossConfig` checked them); this
    checks what the head can take.
    """
    problems: list[tuple[str, str]] = []
    if arch not in OWN_CLS:
        return problems  # an unknown arch is the detector section's problem
    if arch not in PARTS_ARCHS:
        given = [f for f in ("cls", "box", "box_extra") if getattr(cfg, f) is not None]
        if cfg.kind == "pisa":
            given.append("kind")
        for name in given:
            problems.append(
                (
                    f"loss.{name}",
                    f"{arch} takes the presets only (kind standard, harmonic or harmonicdet, no cls, box "
                    "or box_extra): its two-step multibox loss has no parts",
                )
            )
        return problems
    sigmoid = arch in SIGMOID_HEADS
    if cfg.cls is not None:
        if sigmoid and cfg.cls not in SIGMOID_CLS_PARTS:
            problems.append(
                (
                    "loss.cls",
                    f"{cfg.cls} is a softmax cross-entropy; {arch}'s head is a sigmoid classifier per "
                    f"class: take one of {_heads(SIGMOID_CLS_PARTS)}",
                )
            )
        elif not sigmoid and cfg.cls != "ce":
            problems.append(
                (
                    "loss.cls",
                    f"{cfg.cls} needs a sigmoid classification head (one binary classifier per class: "
                    f"{_heads(SIGMOID_HEADS)}); {arch}'s head is a softmax over the classes: take ce",
                )
            )
    if arch == "fcos" and cfg.fcos_loc != "giou" and cfg.box not in (None, cfg.fcos_loc):
        problems.append(
            (
                "loss.fcos_loc",
                f"{cfg.fcos_loc} and box: {cfg.box} both name FCOS's localisation term; give it as box "
                "alone (fcos_loc: smooth_l1 is box: smooth_l1)",
            )
        )
    return problems


def check_loss_fits(cfg: LossConfig, arch: str) -> None:
    """Raise :class:`~harmonic.config.LossConfigError` with every problem of :func:`loss_problems`."""
    from harmonic.config import LossConfigError

    problems = loss_problems(cfg, arch)
    if problems:
        raise LossConfigError("; ".join(f"{path}: {msg}" for path, msg in problems))
