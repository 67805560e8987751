"""The paper's PASCAL VOC protocol (its Table 1).

The paper reports "COCO-style AP" on VOC 2007 test: AP averaged over the IoU thresholds
0.50:0.10:0.90, and the AP at each of them (AP50, AP60, AP70, AP80, AP90). We read "COCO-style"
as COCO's evaluation at those thresholds: 101-point interpolated precision, area range ``all``,
at most 100 detections per image and category, averaged over the classes. Difficult objects
(``"ignore": 1`` in the ground truth written by the VOC loader's ``to_coco()``) are ignored as
VOC ignores them (see :mod:`harmonic.eval.coco`).
"""

from __future__ import annotations

import numpy as np

from harmonic.eval.coco import DetectionsLike, GroundTruthLike, evaluate

__all__ = ["VOC_IOU_THRESHOLDS", "evaluate_voc"]

VOC_IOU_THRESHOLDS = np.linspace(0.5, 0.9, 5)


def evaluate_voc(gt: GroundTruthLike, dets: DetectionsLike) -> dict[str, float]:
    """The paper's VOC numbers: ``AP`` (mean over IoU 0.50:0.10:0.90) and ``AP50`` ... ``AP90``.

    Args:
        gt: COCO-format ground truth (dict, JSON path or pycocotools ``COCO``), e.g. the VOC
            loader's ``to_coco()``.
        dets: COCO results (list of dicts, JSON path or ``[N, 7]`` array).

    Returns:
        ``{"AP", "AP50", "AP60", "AP70", "AP80", "AP90"}``; -1 where no class has a
        positive.
    """
    res = evaluate(gt, dets, iou_thresholds=VOC_IOU_THRESHOLDS, area_ranges={"all": (0.0, 1e10)})
    prec = res.precision[:, :, :, 0, -1]
    defined = prec[prec > -1]
    out = {"AP": float(defined.mean()) if defined.size else -1.0}
    for t in VOC_IOU_THRESHOLDS:
        out[f"AP{round(t * 100)}"] = res.ap_vs_iou[round(float(t), 2)]
    return out
