"""``build_dataset`` over the three formats and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harmonic.data import CocoDetection, DatasetError, VOCDetection, build_dataset


def test_synthetic_is_generated_on_first_use_and_reused(tmp_path: Path):
    cfg = {
        "format": "synthetic",
        "root": str(tmp_path / "shapes"),
        "train": 3,
        "val": 2,
        "image_size": 64,
        "seed": 2,
    }
    ds = build_dataset(cfg, "train", with_masks=True)
    assert isinstance(ds, CocoDetection) and len(ds) == 3 and ds[0][1]["masks"].shape[-1] == 64
    stamp = (tmp_path / "shapes" / "synth.json").stat().st_mtime_ns
    assert len(build_dataset(cfg, "val")) == 2
    assert (tmp_path / "shapes" / "synth.json").stat().st_mtime_ns == stamp  # not regenerated
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left
    with pytest.raises(DatasetError, match="seed"):
        build_dataset(cfg | {"seed": 3}, "train")
    with pytest.raises(DatasetError, match="colour"):
        build_dataset(cfg | {"colour": "red"}, "train")


def test_coco_layout_conventions(synth_root: Path, tmp_path: Path):
    ds = build_dataset({"format": "coco", "root": str(synth_root)}, "val")
    assert isinstance(ds, CocoDetection) and ds.ann_file.name == "instances_val.json"
    # COCO 2017 naming wins when present
    root = tmp_path / "coco"
    shutil.copytree(synth_root / "val", root / "val2017")
    (root / "annotations").mkdir()
    shutil.copy(
        synth_root / "annotations" / "instances_val.json", root / "annotations" / "instances_val2017.json"
    )
    assert build_dataset({"format": "coco", "root": str(root)}, "val").images_dir.name == "val2017"
    explicit = {
        "format": "coco",
        "root": str(root),
        "train": {"images": "val2017", "ann": "annotations/instances_val2017.json"},
    }
    assert len(build_dataset(explicit, "train")) == 6
    with pytest.raises(DatasetError, match="instances_train2017.json|instances_train.json"):
        build_dataset({"format": "coco", "root": str(root)}, "train")
    with pytest.raises(DatasetError, match="missing_dir"):
        build_dataset({"format": "coco", "root": str(tmp_path / "missing_dir")}, "train")


def test_voc_and_bad_format(tmp_path: Path):
    base = tmp_path / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "test.txt").write_text("")
    ds = build_dataset({"format": "voc", "root": str(tmp_path / "VOCdevkit"), "val": "2007-test"}, "val")
    assert isinstance(ds, VOCDetection) and len(ds) == 0
    with pytest.raises(DatasetError, match="trainval.txt"):
        build_dataset({"format": "voc", "root": str(tmp_path / "VOCdevkit")}, "train")
    with pytest.raises(DatasetError, match="format"):
        build_dataset({"format": "yolo", "root": str(tmp_path)}, "train")
    with pytest.raises(DatasetError, match="root"):
        build_dataset({"format": "coco"}, "train")
