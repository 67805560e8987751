"""PASCAL VOC detection dataset over the VOCdevkit layout (the paper trains on 07+12 trainval).

Coordinates
    VOC boxes are 1-based inclusive pixel indices: ``xmin=1, xmax=W`` covers the whole image.
    They become continuous pixel-edge coordinates (COCO's and torchvision's) as
    ``(xmin - 1, ymin - 1, xmax, ymax)``, the conversion of detectron2's VOC loader and the one that
    keeps a box's width ``xmax - xmin + 1`` pixels, as VOC's own evaluation counts it.

Difficult objects
    As in VOC's protocol, ``difficult`` objects are not training targets (unless
    ``keep_difficult``) and in evaluation a detection matched to one counts neither as true nor as
    false positive: :meth:`VOCDetection.to_coco` writes them with ``"ignore": 1`` (and
    ``iscrowd: 0``), which this project's evaluator reads as VOC's difficult flag.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from harmonic.data.check import DatasetError
from harmonic.data.coco import Target, Transforms, coco_from_dict, empty_target, load_image

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

DEFAULT_SPLITS: tuple[tuple[str, str], ...] = (("2007", "trainval"), ("2012", "trainval"))


@dataclass(frozen=True)
class _Object:
    label: int  # 1..20
    box: tuple[float, float, float, float]  # x1 y1 x2 y2, pixel edges
    difficult: bool


@dataclass(frozen=True)
class _Record:
    image_path: Path
    file_name: str  # relative to root
    width: int
    height: int
    objects: tuple[_Object, ...]


def _text(node: ET.Element, tag: str, xml_path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DatasetError(f"{xml_path}: missing <{tag}>")
    return child.text.strip()


def parse_voc_xml(xml_path: Path, image_path: Path, file_name: str) -> _Record:
    """Parse one VOC annotation file (sizes from ``<size>``, read from the image when absent or 0)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"cannot parse {xml_path}: {e}") from None
    size = root.find("size")
    w = h = 0
    if size is not None:
        try:
            w, h = int(float(_text(size, "width", xml_path))), int(float(_text(size, "height", xml_path)))
        except (DatasetError, ValueError):
            w = h = 0
    if w <= 0 or h <= 0:
        # a few VOC files carry no or zero sizes; the image header is authoritative
        from PIL import Image

        try:
            with Image.open(image_path) as im:
                w, h = im.size
        except OSError as e:
            raise DatasetError(f"{xml_path}: no <size> and unreadable image {image_path}: {e}") from None
    objects = []
    for obj in root.iter("object"):
        name = _text(obj, "name", xml_path).lower()
        if name not in VOC_CLASSES:
            raise DatasetError(f"{xml_path}: unknown class {name!r} (not one of the 20 VOC classes)")
        diff = obj.find("difficult")
        difficult = diff is not None and diff.text is not None and diff.text.strip() not in ("", "0")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{xml_path}: object {name!r} has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bb, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise DatasetError(f"{xml_path}: bad <bndbox> of {name!r}: {e}") from None
        box = (max(x1 - 1.0, 0.0), max(y1 - 1.0, 0.0), min(x2, float(w)), min(y2, float(h)))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(f"{xml_path}: object {name!r} has an empty box {x1, y1, x2, y2}")
        objects.append(_Object(VOC_CLASSES.index(name) + 1, box, difficult))
    return _Record(image_path, file_name, w, h, tuple(objects))


class VOCDetection(Dataset[tuple[Tensor, Target]]):
    """PASCAL VOC detection over ``root/VOC<year>/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}``.

    Items and attributes are those of :class:`harmonic.data.CocoDetection` (labels 1..20 in the
    standard class order; ``image_id`` is the item's position + 1 in the union of the splits,
    the id :meth:`to_coco` and :attr:`coco` use). All XML files are parsed at construction.

    Args:
        root: the ``VOCdevkit`` folder.
        splits: ``(year, image_set)`` pairs whose union is the dataset, e.g. the paper's
            ``(("2007", "trainval"), ("2012", "trainval"))`` or ``(("2007", "test"),)``.
        transforms: optional callable ``(image, target) -> (image, target)``.
        keep_difficult: keep difficult objects as training targets.

    Raises:
        DatasetError: naming the missing folder/list/file, or the XML that cannot be used.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        splits: Sequence[tuple[str, str]] = DEFAULT_SPLITS,
        *,
        transforms: Transforms | None = None,
        keep_difficult: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"VOCdevkit folder not found: {self.root}")
        if not splits:
            raise DatasetError("VOCDetection needs at least one (year, image_set) split")
        self.splits = tuple((str(y), str(s)) for y, s in splits)
        self.transforms = transforms
        self.keep_difficult = keep_difficult
        self.with_masks = False
        self.skipped = 0
        self.categories: list[str] = list(VOC_CLASSES)
        self.num_classes = len(VOC_CLASSES)
        self.cat_id_to_label: dict[int, int] = {i + 1: i + 1 for i in range(self.num_classes)}
        self.label_to_cat_id: dict[int, int] = dict(self.cat_id_to_label)

        records: list[_Record] = []
        for year, image_set in self.splits:
            base = self.root / f"VOC{year}"
            list_file = base / "ImageSets" / "Main" / f"{image_set}.txt"
            if not list_file.is_file():
                raise DatasetError(f"VOC image list not found: {list_file}")
            names = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
            for name in names:
                xml_path = base / "Annotations" / f"{name}.xml"
                image_path = base / "JPEGImages" / f"{name}.jpg"
                if not xml_path.is_file():
                    raise DatasetError(f"VOC annotation not found: {xml_path} (listed in {list_file})")
                if not image_path.is_file():
                    raise DatasetError(f"VOC image not found: {image_path} (listed in {list_file})")
                records.append(parse_voc_xml(xml_path, image_path, f"VOC{year}/JPEGImages/{name}.jpg"))
        self.records = records
        self.ids: list[int] = list(range(1, len(records) + 1))

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every item, from the XML sizes."""
        return [r.width / r.height for r in self.records]

    def target(self, index: int) -> Target:
        """The target of item ``index`` before transforms, without reading the image."""
        r = self.records[index]
        objs = [o for o in r.objects if self.keep_difficult or not o.difficult]
        if not objs:
            return empty_target(index + 1, r.height, r.width, False)
        boxes = torch.tensor([o.box for o in objs], dtype=torch.float32)
        return {
            "boxes": boxes,
            "labels": torch.tensor([o.label for o in objs], dtype=torch.int64),
            "image_id": torch.tensor(index + 1, dtype=torch.int64),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(len(objs), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image = load_image(self.records[index].image_path)
        target = self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def to_coco(self) -> dict[str, Any]:
        """The ground truth as a COCO dict: every object, difficult ones with ``"ignore": 1``."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, r in zip(self.ids, self.records):
            images.append({"id": image_id, "file_name": r.file_name, "width": r.width, "height": r.height})
            for o in r.objects:
                x1, y1, x2, y2 = o.box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": o.label,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                        "ignore": int(o.difficult),
                    }
                )
        categories = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]
        return {"images": images, "annotations": annotations, "categories": categories}

    @cached_property
    def coco(self) -> COCO:
        """pycocotools ``COCO`` over :meth:`to_coco`, for evaluation."""
        return coco_from_dict(self.to_coco())

    def __repr__(self) -> str:
        splits = "+".join(f"{y}-{s}" for y, s in self.splits)
        return f"{type(self).__name__}({len(self)} images, splits={splits}, root={str(self.root)!r})"
