"""A detector's outputs as evaluation inputs: COCO results, pre-NMS records, image ids, eval mode.
Pure helpers (no Ray, MLflow or config layer), shared by the training workers and the scripts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["AP_IOU_KEYS", "to_coco_results", "to_pre_nms_records", "image_id", "eval_mode"]

#: IoU thresholds of the AP-vs-IoU curve, in percent (metric suffixes ``ap_iou_50`` ... ``ap_iou_95``).
AP_IOU_KEYS = tuple(range(50, 100, 5))


def to_coco_results(
    outputs: Sequence[Mapping[str, Any]], image_ids: Sequence[int], label_to_cat_id: Any
) -> list[dict[str, Any]]:
    """A torchvision detector's outputs (xyxy boxes, scores, contiguous labels) as COCO results
    (xywh boxes, dataset category ids); images without a box add nothing, and neither do boxes of a
    label without a category (the background 0, which RetinaNet and FCOS score like any class)."""
    results = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for b, s, lab in zip(xywh.tolist(), out["scores"].tolist(), out["labels"].tolist()):
            if int(lab) not in label_to_cat_id:
                continue
            results.append(
                {
                    "image_id": int(img_id),
                    "category_id": int(label_to_cat_id[int(lab)]),
                    "bbox": b,
                    "score": float(s),
                }
            )
    return results


def to_pre_nms_records(
    outputs: Sequence[Mapping[str, Any]], image_ids: Sequence[int], label_to_cat_id: Any
) -> list[dict[str, Any]]:
    """Pre-NMS predictions (:func:`harmonic.detectors.pre_nms_predictions`) in the form of
    :func:`harmonic.analysis.nms_audit`: numpy arrays, dataset category ids (background left out,
    as in :func:`to_coco_results`)."""
    import numpy as np

    records = []
    for out, img_id in zip(outputs, image_ids):
        labels = out["labels"].cpu().tolist()
        keep = [i for i, lab in enumerate(labels) if int(lab) in label_to_cat_id]
        records.append(
            {
                "image_id": img_id,
                "boxes": out["boxes"].detach().float().cpu().numpy()[keep],
                "scores": out["scores"].detach().float().cpu().numpy()[keep],
                "labels": np.asarray([label_to_cat_id[labels[i]] for i in keep], dtype=np.int64),
            }
        )
    return records


def image_id(target: Mapping[str, Any]) -> int:
    """A target's ``image_id`` as an int (a tensor or a number)."""
    v = target["image_id"]
    return int(v.item() if hasattr(v, "item") else v)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
