"""harmonic.eval equals pycocotools' COCOeval; VOC difficult semantics; the paper's VOC protocol."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmarks.eval import make_eval_set, pycocotools_stats
from harmonic.eval import STATS_KEYS, evaluate, evaluate_voc


def _compare(gt: dict[str, Any], dets: list[dict[str, Any]]) -> None:
    ours = evaluate(gt, dets)
    ref_stats, ev = pycocotools_stats(copy.deepcopy(gt), copy.deepcopy(dets))
    for k, v in zip(STATS_KEYS, ref_stats):
        assert ours.stats[k] == pytest.approx(v, abs=1e-9), k
    np.testing.assert_allclose(ours.precision, ev.eval["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.recall, ev.eval["recall"], rtol=0, atol=1e-12)
    # Per-class AP and AP per threshold, from pycocotools' own precision array.
    prec = ev.eval["precision"]
    for k, cat in enumerate(sorted(gt["categories"], key=lambda c: c["id"])):
        p = prec[:, :, k, 0, -1]
        ref = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
        assert ours.per_class[cat["name"]] == pytest.approx(ref, abs=1e-9), cat["name"]
    for t, thr in enumerate(ev.params.iouThrs):
        p = prec[t, :, :, 0, -1]
        assert ours.ap_vs_iou[round(float(thr), 2)] == pytest.approx(float(np.mean(p[p > -1])), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_pycocotools_on_generated_sets(seed: int) -> None:
    # Many crowd regions, empty images (which still get false positives), categories that
    # never occur, and a large share of tied scores.
    gt, dets = make_eval_set(
        80,
        25,
        seed=seed,
        n_categories=6,
        crowd_share=0.1,
        empty_image_share=0.15,
        unused_categories=2,
        tie_share=0.5,
    )
    # Some images with objects but no detections at all.
    dets = [d for d in dets if d["image_id"] % 9 != 0]
    _compare(gt, dets)


def test_equals_pycocotools_with_crowded_images_and_ties_between_objects() -> None:
    # More than 100 detections per (image, category) exercises the maxDets cap; duplicated
    # objects give equal IoUs, where pycocotools keeps the later object.
    gt, dets = make_eval_set(20, 150, seed=7, n_categories=2, gts_per_image=20, unused_categories=0)
    extra = []
    next_id = max(a["id"] for a in gt["annotations"]) + 1
    for a in gt["annotations"][::5]:
        extra.append({**a, "id": next_id})
        next_id += 1
    gt["annotations"] += extra
    _compare(gt, dets)


def test_ground_truth_id_zero_quirk_is_reproduced() -> None:
    # pycocotools tests the matched id for truth, so a match to annotation id 0 is no match.
    gt, dets = make_eval_set(15, 20, seed=3, n_categories=3, unused_categories=0)
    for a in gt["annotations"]:
        a["id"] -= 1
    _compare(gt, dets)


def test_input_forms_agree(tmp_path: Any) -> None:
    gt, dets = make_eval_set(20, 10, seed=5, n_categories=3, unused_categories=0)
    base = evaluate(gt, dets).stats
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    assert evaluate(str(gt_path), det_path).stats == base
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    arr = np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets])
    assert evaluate(coco, arr).stats == base


def _one_image(boxes: list[list[float]], **ann_extra: Any) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "shape"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
                **ann_extra,
            }
            for i, b in enumerate(boxes)
        ],
    }


def test_perfect_detections_give_ap_one() -> None:
    gt, _ = make_eval_set(30, 10, seed=2, n_categories=4, crowd_share=0.0, unused_categories=0)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    res = evaluate(gt, dets)
    for k in ("AP", "AP50", "AP75"):
        assert res.stats[k] == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0) for v in res.ap_vs_iou.values())
    assert all(v == pytest.approx(1.0) for v in res.per_class.values())
    voc = evaluate_voc(gt, dets)
    assert voc == {k: pytest.approx(1.0) for k in ("AP", "AP50", "AP60", "AP70", "AP80", "AP90")}


def test_no_detections_gives_zero_and_undefined_stays_minus_one() -> None:
    gt = _one_image([[10, 10, 50, 50]])  # one medium object: small/large undefined
    res = evaluate(gt, [])
    assert res.stats["AP"] == 0.0 and res.stats["APm"] == 0.0
    assert res.stats["APs"] == -1.0 and res.stats["APl"] == -1.0


def test_voc_difficult_objects_are_ignored() -> None:
    box, hard = [10.0, 10.0, 80.0, 80.0], [120.0, 120.0, 60.0, 60.0]
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": hard, "score": 0.95},  # on the difficult object
        {"image_id": 1, "category_id": 1, "bbox": hard, "score": 0.9},  # a duplicate on it
        {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.5},
    ]
    gt = _one_image([box])
    gt["annotations"].append(
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": hard, "area": 3600.0, "iscrowd": 0, "ignore": 1}
    )
    res = evaluate(gt, dets)
    # Neither the difficult object is a positive, nor are detections on it false positives.
    assert res.stats["AP"] == pytest.approx(1.0)
    assert res.stats["AR100"] == pytest.approx(1.0)
    # Without the flag the object counts: two detections rank above the easy one, one is a
    # duplicate (false positive), so AP drops below 1.
    del gt["annotations"][1]["ignore"]
    assert evaluate(gt, dets).stats["AP"] < 0.99
    # And a detection on nothing but a difficult object leaves the class undefined.
    only_hard = _one_image([hard], ignore=1)
    assert evaluate(only_hard, dets[:1]).stats["AP"] == -1.0


def test_evaluate_voc_thresholds() -> None:
    gt = _one_image([[0.0, 0.0, 100.0, 100.0]])
    # IoU = 75 / 100: a match at 0.5, 0.6, 0.7, not at 0.8, 0.9.
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 75.0], "score": 0.9}]
    voc = evaluate_voc(gt, dets)
    assert list(voc) == ["AP", "AP50", "AP60", "AP70", "AP80", "AP90"]
    got = [voc[k] for k in ("AP50", "AP60", "AP70", "AP80", "AP90")]
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0], abs=1e-12)
    assert voc["AP"] == pytest.approx(0.6)


def test_bad_input_is_named() -> None:
    gt = _one_image([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="image ids the ground truth lacks"):
        evaluate(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="'score'"):
        evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="'categories'"):
        evaluate({"images": [], "annotations": []}, [])
    with pytest.raises(ValueError, match="max_dets"):
        evaluate(gt, [], max_dets=(100, 10, 1))


def test_voc_protocol_equals_pycocotools_at_its_thresholds() -> None:
    gt, dets = make_eval_set(40, 20, seed=11, n_categories=5, unused_categories=1)
    voc = evaluate_voc(gt, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iouType="bbox")
        ev.params.iouThrs = np.linspace(0.5, 0.9, 5)
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]
    assert voc["AP"] == pytest.approx(float(np.mean(prec[prec > -1])), abs=1e-9)
    for t, key in enumerate(("AP50", "AP60", "AP70", "AP80", "AP90")):
        p = prec[t]
        assert voc[key] == pytest.approx(float(np.mean(p[p > -1])), abs=1e-9), key
