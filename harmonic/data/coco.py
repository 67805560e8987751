"""COCO-format detection dataset (COCO 2017, the synthetic set, and most custom sets)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from harmonic.data.check import DatasetError, load_json, validate

log = logging.getLogger(__name__)

Target = dict[str, Tensor]
Transforms = Callable[[Tensor, Target], tuple[Tensor, Target]]


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """Decode an image file to a FloatTensor[3, H, W] in [0, 1] (grey and RGBA become RGB).

    Raises:
        DatasetError: naming the file when it is missing or cannot be decoded.
    """
    try:
        img = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        raise DatasetError(f"unreadable_image: {path}: {e}") from None
    return img.float().div_(255.0)


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` object over an in-memory dict, without pycocotools' prints.

    pycocotools prints while indexing. Redirecting stdout does not silence it inside a Ray Train
    worker, whose ``print`` is patched to go to the log; shadowing ``print`` in pycocotools' module
    for the call does.
    """
    import pycocotools.coco as coco_module

    coco = COCO()
    coco.dataset = data
    coco_module.print = _no_print  # type: ignore[attr-defined]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    finally:
        coco_module.__dict__.pop("print", None)
    return coco


def _no_print(*args: Any, **kwargs: Any) -> None:
    pass


def empty_target(image_id: int, height: int, width: int, with_masks: bool) -> Target:
    target: Target = {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "area": torch.zeros((0,), dtype=torch.float32),
        "iscrowd": torch.zeros((0,), dtype=torch.int64),
    }
    if with_masks:
        target["masks"] = torch.zeros((0, height, width), dtype=torch.uint8)
    return target


class CocoDetection(Dataset[tuple[Tensor, Target]]):
    """A COCO instances file and its image folder, as torchvision detectors take them.

    ``ds[i]`` is ``(image, target)``: ``image`` a FloatTensor[3, H, W] in [0, 1]; ``target`` has
    ``boxes`` (FloatTensor[N, 4], x1 y1 x2 y2 in absolute pixels, clipped to the image), ``labels``
    (Int64[N], contiguous 1..K in the order of the category ids; 0 is the background the detectors
    add), ``image_id`` (int64 scalar: the COCO image id), ``area`` and ``iscrowd`` (the JSON's
    values), and ``masks`` (UInt8[N, H, W]) when ``with_masks``. Images are in increasing id order.

    Crowd annotations (``iscrowd=1``) stay in :attr:`coco`, the ground truth for evaluation, where
    COCO's protocol ignores detections matched to them, but are left out of the training targets,
    as torchvision's reference scripts do. Images without annotations stay: they are negatives.

    The annotation file is validated at construction (see :mod:`harmonic.data.check`; images are
    checked for existence only, the decode happens in ``__getitem__``).

    Args:
        images_dir: folder the JSON's ``file_name`` entries are relative to.
        ann_file: the COCO instances JSON.
        transforms: optional callable ``(image, target) -> (image, target)``.
        with_masks: add instance masks decoded from the segmentation (polygons or RLE).
        skip_bad: drop bad annotations (and missing images with their annotations) instead of
            raising; :attr:`skipped` says how many annotations were dropped.

    Raises:
        DatasetError: the annotation file is missing or malformed, or has problems and
            ``skip_bad`` is False; the message is the check report.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        transforms: Transforms | None = None,
        with_masks: bool = False,
        skip_bad: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        if not self.images_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.images_dir}")
        data = load_json(self.ann_file)
        report = validate(data, self.images_dir, self.ann_file, open_images=False)
        self.skipped = 0
        self.skipped_images = 0
        if not report.ok:
            if report.fatal or not skip_bad:
                hint = "" if report.fatal else "\n(set skip_bad to drop the bad annotations and images)"
                raise DatasetError(report.format() + hint)
            bad_anns = {p.ann_index for p in report.problems if p.ann_index is not None}
            bad_imgs = {p.image_id for p in report.problems if p.ann_index is None and p.image_id is not None}
            anns = [
                a
                for k, a in enumerate(data["annotations"])
                if k not in bad_anns and a.get("image_id") not in bad_imgs
            ]
            self.skipped = len(data["annotations"]) - len(anns)
            self.skipped_images = len(bad_imgs)
            data = dict(data)
            data["annotations"] = anns
            data["images"] = [im for im in data["images"] if im.get("id") not in bad_imgs]
            log.warning(
                "%s: skipped %d bad annotation(s) and %d image(s): %s",
                self.ann_file,
                self.skipped,
                self.skipped_images,
                ", ".join(f"{k} {n}" for k, n in report.counts().items()),
            )
        self.report = report
        self.coco = coco_from_dict(data)
        self.transforms = transforms
        self.with_masks = with_masks

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self.cat_id_to_label: dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.label_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_label.items()}
        self.num_classes = len(cats)
        self.ids: list[int] = sorted(self.coco.imgs.keys())

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every item, from the JSON (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def target(self, index: int) -> Target:
        """The target of item ``index`` before transforms, without reading the image."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not anns:
            return empty_target(image_id, h, w, self.with_masks)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        # the check lets boxes exceed the image by a rounding tolerance; clip those
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", b[2] * b[3])) for a, b in zip(anns, xywh.tolist())]),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.with_masks:
            target["masks"] = torch.from_numpy(np.stack([self._ann_mask(a, h, w) for a in anns]))
        return target

    @staticmethod
    def _ann_mask(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:
            # no segmentation: the box is the best mask there is
            m = np.zeros((h, w), dtype=np.uint8)
            x, y, bw, bh = ann["bbox"]
            m[int(y) : int(np.ceil(y + bh)), int(x) : int(np.ceil(x + bw))] = 1
            return m
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        path = self.image_path(index)
        image = load_image(path)
        target = self.target(index)
        info = self.coco.imgs[self.ids[index]]
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise DatasetError(
                f"size_mismatch: {path}: image is {image.shape[2]}x{image.shape[1]}, "
                f"JSON says {info['width']}x{info['height']}"
            )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"ann_file={str(self.ann_file)!r}, skipped={self.skipped})"
        )
