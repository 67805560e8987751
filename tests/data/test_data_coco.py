"""COCO loader and ``hdet data check`` on every kind of broken input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harmonic.data import CocoDetection, DatasetError, check_dataset
from harmonic.data import check as check_mod


def test_coco_items_boxes_labels_and_negatives(coco_set):
    img_dir, ann, _ = coco_set()
    ds = CocoDetection(img_dir, ann, with_masks=True)
    assert len(ds) == 3 and ds.ids == [3, 7, 9]  # sorted by image id, the empty image kept
    assert ds.num_classes == 2
    assert ds.categories == ["star", "cross"]  # label order = category id order (5, 11)
    assert ds.cat_id_to_label == {5: 1, 11: 2} and ds.label_to_cat_id == {1: 5, 2: 11}
    assert ds.aspect_ratios() == pytest.approx([0.5, 40 / 30, 1.0])

    image, t = ds[1]  # image id 7
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert int(t["image_id"]) == 7
    # the crowd box stays out of the training target
    assert t["boxes"].tolist() == [[2, 3, 12, 11], [20, 10, 35, 22]]
    assert t["labels"].tolist() == [1, 2] and t["labels"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [0, 0]
    assert t["masks"].shape == (2, 30, 40) and t["masks"].dtype == torch.uint8
    assert int(t["masks"][0].sum()) == 80
    # ... but in the evaluation ground truth
    assert [a["iscrowd"] for a in ds.coco.imgToAnns[7]] == [0, 0, 1]

    _, empty = ds[2]
    assert (
        empty["boxes"].shape == (0, 4)
        and empty["labels"].shape == (0,)
        and empty["masks"].shape == (0, 32, 32)
    )


def test_coco_clips_boxes_within_tolerance(coco_set):
    def edit(d):
        d["annotations"][1]["bbox"] = [20, 10, 20.5, 12]  # 0.5 px past the right edge

    img_dir, ann, _ = coco_set(edit)
    ds = CocoDetection(img_dir, ann)
    assert ds[1][1]["boxes"][1].tolist() == [20, 10, 40, 22]


BROKEN = {
    "box_outside": lambda d: d["annotations"][0].update(bbox=[30, 3, 20, 8]),
    "empty_box": lambda d: d["annotations"][0].update(bbox=[2, 3, 0, 8]),
    "unknown_category": lambda d: d["annotations"][1].update(category_id=99),
    "duplicate_ann_id": lambda d: d["annotations"][1].update(id=1),
    "zero_ann_id": lambda d: d["annotations"][3].update(id=0),
    "unknown_image": lambda d: d["annotations"][3].update(image_id=1234),
    "bad_bbox": lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_check_finds_annotation_problem_and_loader_refuses_or_skips(coco_set, kind):
    img_dir, ann, data = coco_set(BROKEN[kind])
    report = check_dataset(img_dir, ann)
    assert not report.ok
    assert [p.kind for p in report.problems] == [kind]
    p = report.problems[0]
    assert p.annotation_id is not None and p.ann_index is not None
    assert kind in report.format()

    assert check_mod.main([str(img_dir), "--ann", str(ann)]) == 1
    with pytest.raises(DatasetError, match=kind):
        CocoDetection(img_dir, ann)
    ds = CocoDetection(img_dir, ann, skip_bad=True)
    assert ds.skipped == 1
    # the bad annotation is gone from the evaluation ground truth too
    assert len(ds.coco.anns) == len(data["annotations"]) - 1
    total_boxes = sum(len(ds[i][1]["boxes"]) for i in range(len(ds)))
    assert total_boxes == len(data["annotations"]) - 1 - 1  # minus the skipped and the crowd one


def test_check_missing_and_unreadable_images(coco_set):
    img_dir, ann, _ = coco_set()
    (img_dir / "b.png").unlink()
    (img_dir / "a.png").write_bytes(b"this is not an image")
    report = check_dataset(img_dir, ann)
    kinds = {p.kind: p for p in report.problems}
    assert set(kinds) == {"missing_image", "unreadable_image"}
    assert kinds["missing_image"].file.endswith("b.png") and kinds["unreadable_image"].file.endswith("a.png")
    assert check_mod.main([str(img_dir), "--ann", str(ann)]) == 1

    # the loader only checks existence up front ...
    with pytest.raises(DatasetError, match="missing_image.*b.png"):
        CocoDetection(img_dir, ann)
    ds = CocoDetection(img_dir, ann, skip_bad=True)
    assert ds.skipped == 1 and ds.skipped_images == 1 and ds.ids == [7, 9]
    # ... and names the file that does not decode when it is read
    with pytest.raises(DatasetError, match="a.png"):
        ds[0]


def test_check_size_mismatch(coco_set):
    img_dir, ann, _ = coco_set(lambda d: d["images"][0].update(width=41))
    assert [p.kind for p in check_dataset(img_dir, ann).problems] == ["size_mismatch"]


def test_malformed_json_is_a_clear_error(tmp_path: Path, capsys):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text('{"images": [], "annotations": [,]}')
    report = check_dataset(tmp_path / "images", ann)
    assert [p.kind for p in report.problems] == ["malformed_json"]
    assert "line 1" in report.problems[0].message
    assert check_mod.main(["--ann", str(ann), "--images", str(tmp_path / "images")]) == 1
    with pytest.raises(DatasetError, match="malformed_json"):
        CocoDetection(tmp_path / "images", ann, skip_bad=True)  # nothing to skip: always refused
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="categories"):
        CocoDetection(tmp_path / "images", ann)


def test_check_main_over_a_layout(synth_root: Path, tmp_path: Path, capsys):
    assert check_mod.main([str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "[val]" in out and "no problems" in out
    assert check_mod.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert check_mod.main([str(tmp_path)]) == 2  # no annotations/ folder
    assert "instances_" in capsys.readouterr().err


def test_missing_paths_are_named(tmp_path: Path):
    with pytest.raises(DatasetError, match="nope"):
        CocoDetection(tmp_path / "nope", tmp_path / "ann.json")
    with pytest.raises(DatasetError, match="ann.json"):
        CocoDetection(tmp_path, tmp_path / "ann.json")
