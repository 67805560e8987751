"""The metric suite of one set of detections on a dataset: COCO suite, AP90, AP-vs-IoU curve,
VOC AP (VOC sets) and test-time consistency, as one flat dict of numbers; and the detections a
detector would give at a higher score threshold, from those of one run at a lower one (score_cut).

Here rather than in :mod:`harmonic.eval` because it combines evaluation with the consistency
analysis, which itself builds on :mod:`harmonic.eval` (imports go one way: analysis -> eval).
"""

from __future__ import annotations

import math
from typing import Any

from harmonic.eval.detections import AP_IOU_KEYS

__all__ = ["detection_metrics", "score_cut"]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def detection_metrics(ds: Any, dets: list[dict[str, Any]], is_voc: bool, prefix: str = "") -> dict[str, Any]:
    """COCO suite, AP90 and the AP-vs-IoU curve (``ap_iou_50`` ... ``ap_iou_95``), VOC AP (VOC
    sets) and test-time consistency (``aic``, ``spearman``, ``inconsistent_share``) of ``dets``
    (COCO results) on ``ds`` (a dataset with ``.coco``), with ``prefix`` before every key."""
    from harmonic.analysis.consistency import consistency_report
    from harmonic.eval import evaluate, evaluate_voc

    m: dict[str, Any] = {}
    gt = ds.coco
    res = evaluate(gt, dets)
    for k, v in res.stats.items():
        m[k] = float(v)
    curve = {round(float(k) * 100): float(v) for k, v in res.ap_vs_iou.items()}
    for t in AP_IOU_KEYS:
        if t in curve:
            m[f"ap_iou_{t}"] = curve[t]
    m["AP90"] = curve.get(90, float("nan"))
    if is_voc:
        for k, v in evaluate_voc(ds.to_coco(), dets).items():
            m[f"voc_{k}"] = float(v)
    cons = consistency_report(gt, dets)
    for k in ("aic", "spearman", "inconsistent_share"):
        if k in cons and _finite(cons[k]):
            m[k] = float(cons[k])
    return {f"{prefix}{k}": v for k, v in m.items()}


def score_cut(dets: list[dict[str, Any]], score_thresh: float) -> list[dict[str, Any]]:
    """The detections (COCO results, in their order) that the same detector run at ``score_thresh``
    gives, from ``dets`` of a run at a lower threshold: those scored above it.

    Why it is the same: every detector here (torchvision's SSD/SSDlite, RetinaNet, FCOS, Faster/Mask
    R-CNN RoI heads; DSSD, RefineDet) drops scores <= threshold first, then keeps per class or level
    the top-k by score, runs greedy per-class NMS and keeps the best ``detections_per_img``: each
    step ranks by score, so a box above the higher threshold meets the same higher-scored boxes in
    both runs (a lower-scored box never suppresses or displaces it) and the per-image cap keeps the
    same best ones (also when more than the cap score above the threshold). Where it can differ:
    boxes whose scores tie exactly (top-k and NMS break ties by position), and float rounding of
    IoUs at the NMS threshold (torchvision's batched NMS offsets boxes by the largest coordinate of
    all candidates, and on CPU switches to a per-class loop above 1000 candidates).

    Args:
        dets: COCO results of the run at the lower threshold (``score``: the detector's float32 score).
        score_thresh: the higher threshold.
    """
    import numpy as np

    # the detectors compare float32 scores with the threshold rounded to float32 (a 0-d operand)
    cut = float(np.float32(score_thresh))
    return [d for d in dets if d["score"] > cut]
