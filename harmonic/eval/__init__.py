"""Evaluation: COCO box AP equal to pycocotools (fast), the paper's VOC protocol, AP vs IoU.

``evaluate`` returns the COCO suite, per-class AP and the AP-vs-IoU curve; ``evaluate_voc`` the
paper's Table 1 numbers. ``hdet eval`` (:mod:`harmonic.eval_cli`) is their command line.
"""

from harmonic.eval.coco import (
    COCO_AREA_RANGES,
    COCO_IOU_THRESHOLDS,
    COCO_MAX_DETS,
    STATS_KEYS,
    EvalResult,
    evaluate,
)
from harmonic.eval.voc import VOC_IOU_THRESHOLDS, evaluate_voc

__all__ = [
    "COCO_AREA_RANGES",
    "COCO_IOU_THRESHOLDS",
    "COCO_MAX_DETS",
    "STATS_KEYS",
    "VOC_IOU_THRESHOLDS",
    "EvalResult",
    "evaluate",
    "evaluate_voc",
]
