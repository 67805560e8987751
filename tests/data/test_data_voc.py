"""PASCAL VOC loader: 1-based coordinates, difficult objects, the 07+12 union, ``to_coco``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmonic.data import VOC_CLASSES, DatasetError, VOCDetection


def write_image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(path)


def _xml(w: int, h: int, objects: list[tuple[str, int, tuple[int, int, int, int]]], size: bool = True) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects
    )
    sz = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC</folder><filename>x.jpg</filename>{sz}{objs}</annotation>"


def _add(
    root: Path, year: str, name: str, w: int, h: int, objects, image_set: str = "trainval", size: bool = True
):
    base = root / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "Annotations" / f"{name}.xml").write_text(_xml(w, h, objects, size))
    write_image(base / "JPEGImages" / f"{name}.jpg", w, h)
    with (base / "ImageSets" / "Main" / f"{image_set}.txt").open("a") as f:
        f.write(name + "\n")


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    _add(root, "2007", "000005", 50, 40, [("chair", 0, (1, 1, 50, 40)), ("person", 1, (10, 5, 20, 30))])
    _add(root, "2007", "000007", 30, 60, [("car", 0, (5, 6, 15, 16))])
    _add(root, "2007", "000009", 30, 30, [("dog", 0, (2, 2, 9, 9))], image_set="test")
    _add(
        root,
        "2012",
        "2008_000002",
        64,
        48,
        [("tvmonitor", 0, (3, 4, 30, 40)), ("person", 1, (1, 1, 4, 4))],
        size=False,
    )
    return root


def test_voc_union_and_one_based_conversion(devkit: Path):
    ds = VOCDetection(devkit)  # default: 07 trainval + 12 trainval
    assert len(ds) == 3 and ds.num_classes == 20 and ds.categories == list(VOC_CLASSES)
    image, t = ds[0]
    assert image.shape == (3, 40, 50)
    # (xmin - 1, ymin - 1, xmax, ymax): xmin=1..xmax=W covers the whole image; the difficult person is dropped
    assert t["boxes"].tolist() == [[0, 0, 50, 40]]
    assert t["labels"].tolist() == [VOC_CLASSES.index("chair") + 1]
    assert int(t["image_id"]) == 1
    assert ds[1][1]["boxes"].tolist() == [[4, 5, 15, 16]]
    # the 2012 image has no <size>: read from the image header
    assert ds.aspect_ratios() == pytest.approx([50 / 40, 30 / 60, 64 / 48])
    assert ds[2][1]["labels"].tolist() == [VOC_CLASSES.index("tvmonitor") + 1]


def test_voc_keep_difficult_and_splits(devkit: Path):
    ds = VOCDetection(devkit, (("2007", "trainval"),), keep_difficult=True)
    assert len(ds) == 2
    assert ds[0][1]["labels"].tolist() == [VOC_CLASSES.index("chair") + 1, VOC_CLASSES.index("person") + 1]
    assert len(VOCDetection(devkit, (("2007", "test"),))) == 1


def test_voc_to_coco_marks_difficult_as_ignored(devkit: Path):
    ds = VOCDetection(devkit)
    gt = ds.to_coco()
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert gt["images"][2]["file_name"] == "VOC2012/JPEGImages/2008_000002.jpg"
    anns = gt["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5]
    assert [a["ignore"] for a in anns] == [0, 1, 0, 0, 1] and all(a["iscrowd"] == 0 for a in anns)
    assert anns[1]["bbox"] == [9, 4, 11, 26]  # xmin=10..xmax=20 is 11 pixels wide
    assert len(gt["categories"]) == 20 and gt["categories"][0] == {
        "id": 1,
        "name": "aeroplane",
        "supercategory": "voc",
    }
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2


def test_voc_errors_name_the_path(devkit: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match="VOC2010"):
        VOCDetection(devkit, (("2010", "trainval"),))
    with pytest.raises(DatasetError, match="not_a_dir"):
        VOCDetection(tmp_path / "not_a_dir")
    _add(devkit, "2007", "000011", 20, 20, [("unicorn", 0, (1, 1, 5, 5))], image_set="bad")
    with pytest.raises(DatasetError, match="unicorn.*|000011"):
        VOCDetection(devkit, (("2007", "bad"),))
