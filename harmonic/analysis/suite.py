"""The metric suite of one set of detections on a dataset: COCO suite, AP90, AP-vs-IoU curve,
VOC AP (VOC sets) and test-time consistency, as one flat dict of numbers.

Here rather than in :mod:`harmonic.eval` because it combines evaluation with the consistency
analysis, which itself builds on :mod:`harmonic.eval` (imports go one way: analysis -> eval).
"""

from __future__ import annotations

import math
from typing import Any

from harmonic.eval.detections import AP_IOU_KEYS

__all__ = ["detection_metrics"]


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
