"""Score/IoU consistency of test detections, and the NMS audit (the paper's Fig. 1 failure).

The paper's claim is that a detector whose classification score does not follow its
localisation quality ranks boxes wrongly: NMS keeps a confident but poorly localised box and
throws away a better one, and AP at high IoU thresholds suffers. These functions measure that
on detections matched to ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torchvision.ops import batched_nms, box_iou

from harmonic.eval.coco import (
    DetectionsLike,
    GroundTruth,
    GroundTruthLike,
    load_detections,
    load_ground_truth,
    match,
)
from harmonic.metrics import average_inconsistency

__all__ = ["MatchedDetections", "consistency_report", "match_detections", "nms_audit"]


@dataclass
class MatchedDetections:
    """Detections with the ground truth they overlap, sorted by image, category, score.

    Attributes:
        image_id: image id of each detection.
        category_id: category id.
        score: confidence.
        iou: IoU with the best-overlapping ground truth of the same image and class (crowd and
            difficult objects excluded); 0 if none overlaps.
        gt_id: annotation id of the ground truth the detection is matched to by COCO's greedy
            matching at ``iou_threshold`` (score order, one detection per object), -1 if none.
    """

    image_id: NDArray[Any]
    category_id: NDArray[Any]
    score: NDArray[np.float64]
    iou: NDArray[np.float64]
    gt_id: NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.score)

    @property
    def matched(self) -> NDArray[np.bool_]:
        """Whether each detection is a true positive at the matching threshold."""
        return self.gt_id >= 0


def match_detections(
    gt: GroundTruthLike, dets: DetectionsLike, iou_threshold: float = 0.5
) -> MatchedDetections:
    """Match detections to ground truth for the consistency analyses.

    Every detection is kept (no ``maxDets`` cap). Matching is COCO's greedy matching at one
    threshold, area range "all"; a detection that only matches a crowd or difficult object
    gets ``gt_id = -1``.

    Args:
        gt: COCO-format ground truth (dict, JSON path or pycocotools ``COCO``).
        dets: COCO results (list of dicts, JSON path or ``[N, 7]`` array).
        iou_threshold: IoU a detection needs to be matched.

    Returns:
        A :class:`MatchedDetections`.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    g = load_ground_truth(gt)
    d = load_detections(dets, g)
    thr = np.array([min(iou_threshold, 1 - 1e-10)])
    m = match(g, d, thr, np.array([[0.0, np.inf]]), None)
    gi = m.gt_index[:, 0, 0]
    real = gi >= 0
    real[real] = ~g.ignore[gi[real]]
    gt_id = np.where(real, g.ann_id[np.where(gi >= 0, gi, 0)], -1)
    return MatchedDetections(
        image_id=g.img_ids[d.img[m.det]],
        category_id=g.cat_ids[d.cat[m.det]],
        score=d.score[m.det],
        iou=m.best_iou,
        gt_id=gt_id.astype(np.int64),
    )


def consistency_report(
    gt: GroundTruthLike,
    dets: DetectionsLike | MatchedDetections,
    *,
    high_score: float = 0.5,
    low_iou: float = 0.5,
    low_score: float = 0.3,
    high_iou: float = 0.75,
    min_iou: float = 0.1,
) -> dict[str, float | int]:
    """Score/IoU consistency of test detections.

    Only detections that overlap an object of their class with ``IoU >= min_iou`` are
    considered: a box on background has no localisation quality to be consistent with, and
    counting it would measure false positives instead.

    Args:
        gt: COCO-format ground truth.
        dets: COCO results, or the output of :func:`match_detections`.
        high_score: a detection with ``score >= high_score`` and ``IoU < low_iou`` is
            "high score, low IoU" (confident but badly localised).
        low_iou: see ``high_score``.
        low_score: a detection with ``score < low_score`` and ``IoU >= high_iou`` is
            "low score, high IoU" (well localised but ranked low; the box NMS drops).
        high_iou: see ``low_score``.
        min_iou: the overlap a detection needs to be considered.

    Returns:
        ``aic`` (mean |score - IoU|, :func:`harmonic.metrics.average_inconsistency`),
        ``spearman`` (rank correlation of score and IoU, NaN with fewer than 2 detections or
        constant values), ``high_score_low_iou_share``, ``low_score_high_iou_share``,
        ``inconsistent_share`` (their sum: the two sets are disjoint), ``n`` (detections
        considered) and ``n_total`` (all detections).
    """
    md = dets if isinstance(dets, MatchedDetections) else match_detections(gt, dets)
    sel = md.iou >= min_iou
    s, i = md.score[sel], md.iou[sel]
    n = int(sel.sum())
    if n >= 2 and np.ptp(s) > 0 and np.ptp(i) > 0:
        from scipy.stats import spearmanr  # (scipy.stats costs 0.7 s to import: only when needed)

        rho = float(spearmanr(s, i).statistic)
    else:
        rho = float("nan")
    hs_li = (s >= high_score) & (i < low_iou)
    ls_hi = (s < low_score) & (i >= high_iou)
    share = (lambda x: float(x.mean())) if n else (lambda x: float("nan"))
    return {
        "aic": average_inconsistency(torch.from_numpy(s), torch.from_numpy(i)),
        "spearman": rho,
        "inconsistent_share": share(hs_li | ls_hi),
        "high_score_low_iou_share": share(hs_li),
        "low_score_high_iou_share": share(ls_hi),
        "n": n,
        "n_total": len(md),
    }


def _xywh_to_xyxy(b: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def nms_audit(
    gt: GroundTruthLike,
    pre_nms: Sequence[Mapping[str, Any]],
    *,
    nms_iou: float = 0.5,
    match_iou: float = 0.5,
    max_dets: int = 100,
) -> dict[str, float | int]:
    """How often NMS kept a worse-localised box over a better one it suppressed (Fig. 1).

    NMS here is class-wise (``torchvision.ops.batched_nms`` at ``nms_iou``), then the
    ``max_dets`` best boxes of the image are kept. For each ground-truth object (crowd and
    difficult ones excluded) that at least one pre-NMS box of its class covers with
    ``IoU >= match_iou`` (an object the detector found before NMS):

    * *kept IoU*: the IoU of the highest-scoring kept box of its class with
      ``IoU >= match_iou``, i.e. the box the evaluation would match to it; 0 if none.
    * *suppressed IoU*: the highest IoU of a box of its class that NMS removed. Boxes dropped
      only by the ``max_dets`` cap are neither kept nor suppressed.

    The object counts as a failure when ``suppressed IoU >= match_iou`` and
    ``suppressed IoU > kept IoU``: NMS threw away a box that would have localised it better
    than the one reported (or, when the kept IoU is 0, lost the object altogether).

    Args:
        gt: COCO-format ground truth.
        pre_nms: one dict per image: ``image_id``, ``boxes`` (``[N, 4]`` x1, y1, x2, y2 in the
            ground truth's pixel coordinates), ``scores`` (``[N]``), ``labels`` (``[N]`` COCO
            category ids); tensors or arrays.
        nms_iou: NMS IoU threshold.
        match_iou: IoU a box needs to count as covering an object.
        max_dets: boxes kept per image after NMS.

    Returns:
        ``objects`` (objects found before NMS), ``objects_with_suppressed_better_box``,
        ``rate`` (their share; NaN without objects), ``mean_iou_lost`` (mean of suppressed IoU
        - kept IoU over those objects; NaN without any), ``objects_lost`` (failures whose kept
        IoU is 0), ``images``.
    """
    g: GroundTruth = load_ground_truth(gt)
    objects = failures = lost = 0
    gaps: list[float] = []
    for n, item in enumerate(pre_nms):
        try:
            img_id = item["image_id"]
            boxes = torch.as_tensor(item["boxes"], dtype=torch.float64).reshape(-1, 4)
            scores = torch.as_tensor(item["scores"], dtype=torch.float64).reshape(-1)
            labels = torch.as_tensor(item["labels"], dtype=torch.int64).reshape(-1)
        except KeyError as e:
            raise ValueError(
                f"pre_nms[{n}] has no {e.args[0]!r} (needs image_id, boxes, scores, labels)"
            ) from None
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                f"pre_nms[{n}]: boxes, scores and labels differ in length ({len(boxes)}, {len(scores)}, {len(labels)})"
            )
        pos = int(np.searchsorted(g.img_ids, img_id))
        if pos >= len(g.img_ids) or g.img_ids[pos] != img_id:
            raise ValueError(f"pre_nms[{n}]: image id {img_id!r} is not in the ground truth")
        rows = np.flatnonzero((g.img == pos) & ~g.ignore)
        if len(rows) == 0 or len(boxes) == 0:
            continue
        keep_all = batched_nms(boxes, scores, labels, nms_iou)
        kept = torch.zeros(len(boxes), dtype=torch.bool)
        kept[keep_all[:max_dets]] = True
        suppressed = torch.ones(len(boxes), dtype=torch.bool)
        suppressed[keep_all] = False
        gt_boxes = torch.from_numpy(_xywh_to_xyxy(g.box[rows]))
        gt_labels = torch.from_numpy(np.asarray(g.cat_ids[g.cat[rows]], dtype=np.int64))
        ious = box_iou(gt_boxes, boxes)  # [G, N]
        ious = torch.where(gt_labels[:, None] == labels[None, :], ious, torch.zeros_like(ious))
        for j in range(len(rows)):
            row = ious[j]
            covers = row >= match_iou
            if not bool(covers.any()):
                continue
            objects += 1
            k_cand = kept & covers
            kept_iou = float(row[k_cand][scores[k_cand].argmax()]) if bool(k_cand.any()) else 0.0
            supp_iou = float(row[suppressed].max()) if bool(suppressed.any()) else 0.0
            if supp_iou >= match_iou and supp_iou > kept_iou:
                failures += 1
                lost += kept_iou == 0.0
                gaps.append(supp_iou - kept_iou)
    return {
        "objects": objects,
        "objects_with_suppressed_better_box": failures,
        "rate": failures / objects if objects else float("nan"),
        "mean_iou_lost": float(np.mean(gaps)) if gaps else float("nan"),
        "objects_lost": lost,
        "images": len(pre_nms),
    }
