"""Fixtures of the data tests: small COCO/VOC files written to tmp_path and one tiny synthetic set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harmonic.data import synth


def write_image(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def coco_dict() -> dict[str, Any]:
    """Three images (one without annotations), two categories with non-contiguous ids, one crowd box."""
    return {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "b.png", "width": 20, "height": 40},
            {"id": 9, "file_name": "empty.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 5,
                "bbox": [2, 3, 10, 8],
                "area": 80,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 11,
                "bbox": [20, 10, 15, 12],
                "area": 180,
                "iscrowd": 0,
                "segmentation": [[20, 10, 35, 10, 35, 22, 20, 22]],
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 5,
                "bbox": [0, 0, 40, 30],
                "area": 1200,
                "iscrowd": 1,
                "segmentation": {"size": [30, 40], "counts": [0, 1200]},
            },
            {
                "id": 4,
                "image_id": 3,
                "category_id": 11,
                "bbox": [1, 1, 5, 30],
                "area": 150,
                "iscrowd": 0,
                "segmentation": [[1, 1, 6, 1, 6, 31, 1, 31]],
            },
        ],
        "categories": [{"id": 11, "name": "cross"}, {"id": 5, "name": "star"}],
    }


@pytest.fixture
def coco_set(tmp_path: Path) -> Callable[..., tuple[Path, Path, dict[str, Any]]]:
    """Write ``coco_dict()`` (optionally edited) and its images; return (images_dir, ann_file, dict)."""

    def make(
        edit: Callable[[dict[str, Any]], None] | None = None, images: bool = True
    ) -> tuple[Path, Path, dict[str, Any]]:
        data = coco_dict()
        if edit is not None:
            edit(data)
        img_dir = tmp_path / "images"
        img_dir.mkdir(exist_ok=True)
        if images:
            for k, im in enumerate(coco_dict()["images"]):
                write_image(img_dir / im["file_name"], im["width"], im["height"], seed=k)
        ann = tmp_path / "ann.json"
        ann.write_text(json.dumps(data))
        return img_dir, ann, data

    return make


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "shapes"
    synth.generate(root, train=16, val=6, image_size=128, seed=3)
    return root
