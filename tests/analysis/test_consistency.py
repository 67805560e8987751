"""Consistency report and NMS audit on hand-built detections."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.eval import make_eval_set
from harmonic.analysis import consistency_report, match_detections, nms_audit

GT_BOX = [0.0, 0.0, 100.0, 100.0]  # x, y, w, h


def _gt(boxes: list[list[float]], cats: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    cats = cats or [1] * len(boxes)
    return {
        "images": [{"id": 7, "width": 300, "height": 300}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 7,
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
                **extra,
            }
            for i, (b, c) in enumerate(zip(boxes, cats))
        ],
    }


def _det(bbox: list[float], score: float, cat: int = 1) -> dict[str, Any]:
    return {"image_id": 7, "category_id": cat, "bbox": bbox, "score": score}


def test_match_detections_iou_and_greedy_match() -> None:
    gt = _gt([GT_BOX, [200.0, 200.0, 50.0, 50.0]])
    dets = [
        _det([0.0, 0.0, 100.0, 80.0], 0.9),  # IoU 0.8 with object 1
        _det([0.0, 0.0, 100.0, 60.0], 0.7),  # IoU 0.6 with object 1, which is taken: unmatched
        _det([0.0, 0.0, 100.0, 100.0], 0.5, cat=2),  # right place, wrong class: IoU 0
    ]
    md = match_detections(gt, dets)
    assert md.score.tolist() == [0.9, 0.7, 0.5]
    assert md.iou == pytest.approx([0.8, 0.6, 0.0])
    assert md.gt_id.tolist() == [1, -1, -1]
    assert md.matched.tolist() == [True, False, False]
    assert md.category_id.tolist() == [1, 1, 2]


def test_perfect_detections_have_zero_aic() -> None:
    gt, _ = make_eval_set(20, 10, seed=4, crowd_share=0.0, n_categories=3, unused_categories=0)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    rep = consistency_report(gt, dets)
    assert rep["aic"] == pytest.approx(0.0, abs=1e-12)
    assert rep["inconsistent_share"] == 0.0
    assert rep["n"] == rep["n_total"] == len(dets)


def test_report_counts_inconsistent_detections() -> None:
    gt = _gt([GT_BOX, [150.0, 150.0, 100.0, 100.0]])
    dets = [
        _det([0.0, 0.0, 100.0, 40.0], 0.9),  # IoU 0.4, score 0.9: high score, low IoU
        _det([150.0, 150.0, 100.0, 95.0], 0.2),  # IoU 0.95, score 0.2: low score, high IoU
        _det([0.0, 0.0, 100.0, 70.0], 0.7),  # IoU 0.7, score 0.7: consistent
        _det([0.0, 0.0, 100.0, 5.0], 0.9),  # IoU 0.05 < min_iou: not considered
    ]
    rep = consistency_report(gt, dets)
    assert rep["n"] == 3 and rep["n_total"] == 4
    assert rep["high_score_low_iou_share"] == pytest.approx(1 / 3)
    assert rep["low_score_high_iou_share"] == pytest.approx(1 / 3)
    assert rep["inconsistent_share"] == pytest.approx(2 / 3)
    assert rep["aic"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert rep["spearman"] == pytest.approx(-1.0)
    # Thresholds are options: with a stricter "high score" the first one is no longer counted.
    assert consistency_report(gt, dets, high_score=0.95)["high_score_low_iou_share"] == 0.0


def test_report_on_consistent_ranking_has_spearman_one() -> None:
    gt = _gt([GT_BOX])
    heights = [95.0, 85.0, 75.0, 65.0, 55.0]
    dets = [_det([0.0, 0.0, 100.0, h], h / 100.0) for h in heights]
    rep = consistency_report(gt, dets)
    assert rep["aic"] == pytest.approx(0.0, abs=1e-12)
    assert rep["spearman"] == pytest.approx(1.0)
    assert math.isnan(consistency_report(gt, dets[:1])["spearman"])


def _xyxy(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y + h]


def test_nms_audit_catches_the_inconsistent_pair() -> None:
    gt = _gt([GT_BOX])
    poor = _xyxy(10.0, 10.0, 100.0, 100.0)  # IoU 8100 / 11900 with the object
    good = _xyxy(0.0, 0.0, 100.0, 98.0)  # IoU 0.98
    pre = [
        {
            "image_id": 7,
            "boxes": torch.tensor([poor, good]),
            "scores": torch.tensor([0.9, 0.6]),
            "labels": [1, 1],
        }
    ]
    rep = nms_audit(gt, pre)
    assert rep["objects"] == 1
    assert rep["objects_with_suppressed_better_box"] == 1
    assert rep["rate"] == 1.0
    assert rep["mean_iou_lost"] == pytest.approx(0.98 - 8100 / 11900)
    assert rep["objects_lost"] == 0

    # Consistent scores: the better box wins NMS, nothing is lost.
    pre[0]["scores"] = torch.tensor([0.6, 0.9])
    rep = nms_audit(gt, pre)
    assert rep["objects"] == 1 and rep["objects_with_suppressed_better_box"] == 0
    assert rep["rate"] == 0.0 and math.isnan(rep["mean_iou_lost"])

    # NMS is class-wise: a better box of another class is never suppressed by this one.
    pre[0]["scores"] = np.array([0.9, 0.6])
    pre[0]["labels"] = np.array([1, 2])
    assert nms_audit(gt, pre)["objects_with_suppressed_better_box"] == 0


def test_nms_audit_object_lost_altogether() -> None:
    gt = _gt([GT_BOX])
    far = _xyxy(30.0, 30.0, 100.0, 100.0)  # IoU 0.32 with the object: cannot match it
    good = _xyxy(0.0, 0.0, 100.0, 98.0)  # overlaps `far` with IoU 0.316
    pre = [{"image_id": 7, "boxes": [far, good], "scores": [0.9, 0.5], "labels": [1, 1]}]
    assert nms_audit(gt, pre, nms_iou=0.5)["objects_with_suppressed_better_box"] == 0
    rep = nms_audit(gt, pre, nms_iou=0.3)
    assert rep["objects_with_suppressed_better_box"] == 1 and rep["objects_lost"] == 1
    assert rep["mean_iou_lost"] == pytest.approx(0.98)


def test_nms_audit_bad_input() -> None:
    gt = _gt([GT_BOX])
    with pytest.raises(ValueError, match="not in the ground truth"):
        nms_audit(gt, [{"image_id": 3, "boxes": [], "scores": [], "labels": []}])
    with pytest.raises(ValueError, match="'scores'"):
        nms_audit(gt, [{"image_id": 7, "boxes": [], "labels": []}])
    with pytest.raises(ValueError, match="differ in length"):
        nms_audit(gt, [{"image_id": 7, "boxes": [[0, 0, 1, 1]], "scores": [0.1, 0.2], "labels": [1]}])
