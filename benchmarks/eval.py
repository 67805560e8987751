"""``hdet bench eval``: this project's evaluation time / pycocotools' on one generated set.

Both evaluate the same ground truth and detections in the same process, one after the other;
the 12 summary numbers must agree to 1e-9 or the command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import time
from typing import Any

import numpy as np

from harmonic.eval.coco import STATS_KEYS, evaluate

__all__ = ["main", "make_eval_set"]


def make_eval_set(
    n_images: int = 5000,
    dets_per_image: float = 30.0,
    *,
    seed: int = 0,
    n_categories: int = 20,
    gts_per_image: float = 7.0,
    crowd_share: float = 0.01,
    empty_image_share: float = 0.03,
    unused_categories: int = 2,
    tie_share: float = 0.2,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A realistic COCO-format ground truth and results list, deterministic for a seed.

    Images of 640x480 hold a Poisson number of objects of many sizes (small, medium and large
    by COCO's areas) and ``n_categories`` classes, of which the last ``unused_categories`` never
    occur. A few objects are crowd regions, some images have no objects. Detections are boxes
    jittered around objects (score loosely following their IoU, sometimes with the wrong class)
    and false positives anywhere; on average ``dets_per_image`` per image, and some images
    have detections but no objects. A share of scores is rounded to 2 decimals so that ties
    (whose order COCO's evaluation defines) occur.

    Returns:
        ``(ground_truth_dict, detections_list)``.
    """
    rng = np.random.default_rng(seed)
    W, H = 640.0, 480.0
    images = [
        {"id": i + 1, "width": int(W), "height": int(H), "file_name": f"{i + 1:06d}.png"}
        for i in range(n_images)
    ]
    categories = [
        {"id": c + 1, "name": f"class{c + 1}", "supercategory": "shape"} for c in range(n_categories)
    ]
    used = max(1, n_categories - unused_categories)
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    ann_id = 1
    for img in images:
        n_gt = 0 if rng.random() < empty_image_share else int(rng.poisson(gts_per_image))
        # Log-uniform sizes cover all three COCO area ranges.
        side = np.exp(rng.uniform(np.log(8), np.log(300), size=n_gt))
        aspect = np.exp(rng.uniform(-0.7, 0.7, size=n_gt))
        w = np.minimum(side * aspect, W - 1)
        h = np.minimum(side / aspect, H - 1)
        x = rng.uniform(0, W - w)
        y = rng.uniform(0, H - h)
        cls = rng.integers(1, used + 1, size=n_gt)
        crowd = rng.random(n_gt) < crowd_share
        boxes = []
        for j in range(n_gt):
            bb = [float(x[j]), float(y[j]), float(w[j]), float(h[j])]
            # A mask area a little below the box area, as for real instance masks.
            area = float(w[j] * h[j] * rng.uniform(0.6, 1.0))
            anns.append(
                {"id": ann_id, "image_id": img["id"], "category_id": int(cls[j]), "bbox": bb,
                 "area": area, "iscrowd": int(crowd[j])}
            )  # fmt: skip
            ann_id += 1
            boxes.append((bb, int(cls[j])))
        n_det = int(rng.poisson(dets_per_image))
        # About two thirds of the detections sit on objects, the rest are false positives.
        n_on = min(n_det, int(round(n_det * 0.65))) if boxes else 0
        for _ in range(n_on):
            bb, c = boxes[int(rng.integers(len(boxes)))]
            s = rng.normal(0, 0.12, size=4)
            jw, jh = bb[2] * np.exp(s[2]), bb[3] * np.exp(s[3])
            jx, jy = bb[0] + s[0] * bb[2], bb[1] + s[1] * bb[3]
            if rng.random() < 0.08:
                c = int(rng.integers(1, n_categories + 1))
            quality = float(np.exp(-np.abs(s).sum() * 2))
            score = float(np.clip(0.7 * quality + 0.3 * rng.random(), 0.001, 1.0))
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": c,
                    "bbox": [float(jx), float(jy), float(jw), float(jh)],
                    "score": score,
                }
            )
        for _ in range(n_det - n_on):
            side_f = float(np.exp(rng.uniform(np.log(8), np.log(250))))
            fx, fy = float(rng.uniform(0, W - side_f)), float(rng.uniform(0, H - side_f))
            c = int(rng.integers(1, n_categories + 1))
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": c,
                    "bbox": [fx, fy, side_f, side_f * float(rng.uniform(0.5, 2))],
                    "score": float(rng.random() * 0.6),
                }
            )
    for d in dets:
        if rng.random() < tie_share:
            d["score"] = round(d["score"], 2)
    gt = {
        "info": {"description": "generated evaluation set"},
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    return gt, dets


def pycocotools_stats(gt: dict[str, Any], dets: list[dict[str, Any]]) -> tuple[np.ndarray, Any]:
    """Plain pycocotools: ``COCO`` + ``loadRes`` + ``COCOeval`` evaluate/accumulate/summarize.

    Its prints are silenced. Returns ``(stats, cocoeval)``. ``dets`` is modified (loadRes adds
    fields), so pass a copy.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64), ev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hdet bench eval", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000, help="number of generated images (default 5000)")
    p.add_argument(
        "--dets-per-image", type=float, default=30.0, help="mean detections per image (default 30)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.images < 1 or args.dets_per_image <= 0:
        p.error("--images must be >= 1 and --dets-per-image > 0")

    gt, dets = make_eval_set(args.images, args.dets_per_image, seed=args.seed)
    n_gt = len(gt["annotations"])
    print(f"generated {args.images} images, {n_gt} objects, {len(dets)} detections (seed {args.seed})")
    dets_copy = copy.deepcopy(dets)

    t0 = time.perf_counter()
    ours = evaluate(gt, dets)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, _ = pycocotools_stats(gt, dets_copy)
    t_ref = time.perf_counter() - t0

    ours_stats = np.array([ours.stats[k] for k in STATS_KEYS])
    diff = float(np.abs(ours_stats - ref).max())
    for k, a, b in zip(STATS_KEYS, ours_stats, ref):
        print(f"  {k:<6} harmonic {a:.6f}  pycocotools {b:.6f}")
    ratio = t_ours / t_ref
    print(f"harmonic.eval.evaluate: {t_ours:.3f} s")
    print(f"pycocotools COCOeval:   {t_ref:.3f} s")
    print(f"ratio (harmonic / pycocotools): {ratio:.3f}   max |stats difference|: {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"images": args.images, "objects": n_gt, "detections": len(dets), "seed": args.seed,
                 "harmonic_s": t_ours, "pycocotools_s": t_ref, "ratio": ratio, "max_abs_stats_diff": diff},
                f, indent=2,
            )  # fmt: skip
    if diff > 1e-9:
        print(f"FAIL: the summaries differ by {diff:.3e} (> 1e-9)", file=sys.stderr)
        return 1
    return 0
