"""The synthetic shapes set: determinism, masks, occlusion, loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from harmonic.data import CocoDetection, check_dataset, synth


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    kw = {"train": 4, "val": 2, "image_size": 96}
    synth.generate(tmp_path / "a", seed=5, **kw)
    synth.main(
        ["--out", str(tmp_path / "b"), "--train", "4", "--val", "2", "--image-size", "96", "--seed", "5"]
    )
    synth.generate(tmp_path / "c", seed=6, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 4 + 2 + 3  # images, two annotation files, synth.json
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_parallel_generation_writes_the_same_files(tmp_path: Path):
    synth.generate(tmp_path / "a", train=3, val=0, image_size=64, seed=1)
    synth.generate(tmp_path / "b", train=3, val=0, image_size=64, seed=1, jobs=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_annotations_are_valid_coco_with_occlusion(synth_root: Path):
    data = json.loads((synth_root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(synth.CATEGORIES)
    assert min(a["id"] for a in data["annotations"]) == 1
    assert all(a["iscrowd"] == 0 and a["segmentation"] for a in data["annotations"])
    assert check_dataset(synth_root / "train", synth_root / "annotations" / "instances_train.json").ok
    # occlusion happens: some boxes of the same image overlap
    overlaps = 0
    by_image: dict[int, list[list[float]]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        b = np.array(boxes)
        x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
        ov = (np.minimum(x1[:, None], x1) > np.maximum(x0[:, None], x0)) & (
            np.minimum(y1[:, None], y1) > np.maximum(y0[:, None], y0)
        )
        overlaps += int(ov.sum() - len(b)) // 2
    assert overlaps >= 3
    # every category appears
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, len(synth.CATEGORIES) + 1))


def test_loads_with_masks_inside_boxes(synth_root: Path):
    ds = CocoDetection(
        synth_root / "train", synth_root / "annotations" / "instances_train.json", with_masks=True
    )
    assert ds.num_classes == 5 and len(ds) == 16
    n = 0
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 128, 128)
        masks = t["masks"].bool()
        for m, box, area in zip(masks, t["boxes"], t["area"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            # the box is the tight box of the mask (visible extent), the area its pixel count
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()
            assert int(m.sum()) == int(area)
            n += 1
        # one pixel belongs to one object: masks do not overlap
        assert int(masks.sum(0).max()) <= 1
    assert n > 16


def test_render_params_are_validated(tmp_path: Path):
    import pytest

    with pytest.raises(ValueError, match="max_objects"):
        synth.generate(tmp_path, min_objects=3, max_objects=2)
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path), "--image-size", "8"])


def test_held_out_test_split_shares_no_image_with_val(tmp_path: Path):
    from harmonic.data import DatasetError, build_dataset

    synth.generate(tmp_path / "s", train=2, val=3, test=3, image_size=64, seed=2)
    files = _files(tmp_path / "s")
    val = {k[len("val/") :]: v for k, v in files.items() if k.startswith("val/")}
    test = {k[len("test/") :]: v for k, v in files.items() if k.startswith("test/")}
    assert val.keys() == test.keys() and len(test) == 3
    assert all(val[k] != test[k] for k in val)  # same names, other images: its own random stream
    cfg = {
        "format": "synthetic",
        "root": str(tmp_path / "g"),
        "train": 2,
        "val": 2,
        "test": 2,
        "image_size": 64,
    }
    assert len(build_dataset(cfg, "test")) == 2
    no_test = {**cfg, "root": str(tmp_path / "h"), "test": 0}
    try:
        build_dataset(no_test, "test")
    except DatasetError as e:
        assert "dataset.test" in str(e)
    else:
        raise AssertionError("a set without a test split built one")
    assert not (tmp_path / "h" / "test").exists()
