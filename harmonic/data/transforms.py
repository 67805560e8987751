"""Training transforms on ``(image, target)`` pairs; boxes, areas and masks follow the image.

Images are FloatTensor[3, H, W] in [0, 1] and targets the dicts of :class:`CocoDetection`
(``boxes`` x1 y1 x2 y2 in pixels; optional ``masks`` UInt8[N, H, W]). Randomness comes from
torch's global generator, so ``torch.manual_seed`` and the DataLoader's per-worker seeding make
runs reproducible.

Choices (see :func:`build_transforms`)
    * Training images are resized so that the longer side is ``image_size``, keeping the aspect
      ratio; the detectors pad (R-CNN family, RetinaNet, FCOS) or warp (SSD) from there, so
      their own resize, configured with the same size, is then a no-op.
    * Evaluation images are *not* resized: torchvision detectors resize internally and map
      their boxes back to the size of the tensor they were given, so predictions come out in
      the pixels of the original image, the frame of the COCO ground truth.
    * After every training pipeline, boxes narrower or shorter than ``MIN_BOX_SIZE`` pixels are
      dropped (with their labels/masks): torchvision rejects degenerate boxes and such boxes
      cannot be learnt at that resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor

from harmonic.data.coco import Target

MIN_BOX_SIZE = 1.0
# per-box entries of a target, filtered together with the boxes
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd", "masks")
# DSSD and RefineDet train with SSD's augmentation in their papers
SSD_ARCHS = ("ssd", "ssdlite", "dssd", "refinedet")
# fill of the zoom-out canvas: the ImageNet mean, what SSD's reference recipe uses
IMAGENET_MEAN = (0.485, 0.456, 0.406)

Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


def _select(target: Target, keep: Tensor) -> Target:
    out = dict(target)
    for k in PER_BOX_KEYS:
        if k in out:
            out[k] = out[k][keep]
    return out


def _box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize so that the longer side is ``size`` (aspect kept); bilinear with antialiasing for the
    image, nearest-exact for masks (a mask pixel survives where its centre falls)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"Resize: size must be >= 1, got {size}")
        self.size = size

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        h, w = image.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(
            image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )[0]
        image = image.clamp_(0.0, 1.0)  # the antialiasing filter may overshoot by a rounding error
        sx, sy = nw / w, nh / h
        target = dict(target)
        boxes = target["boxes"] * torch.tensor([sx, sy, sx, sy])
        # a box on the image edge must stay on it despite float rounding
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh)
        target["boxes"] = boxes
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target and target["masks"].shape[0] > 0:
            m = F.interpolate(target["masks"][:, None], size=(nh, nw), mode="nearest-exact")
            target["masks"] = m[:, 0]
        elif "masks" in target:
            target["masks"] = target["masks"].new_zeros((0, nh, nw))
        return image, target

    def __repr__(self) -> str:
        return f"Resize(longer_side={self.size})"


class RandomHorizontalFlip:
    """Mirror image, boxes and masks with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        w = image.shape[-1]
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _rotate_hue(image: Tensor, hue: float) -> Tensor:
    """Shift the hue by ``hue`` turns as a rotation of the chroma plane in YIQ space: one 3x3 matrix,
    many times cheaper than the RGB->HSV->RGB round trip, and as good for augmentation."""
    a = -2.0 * torch.pi * hue  # YIQ turns the other way round than HSV
    c, s = torch.cos(torch.tensor(a)), torch.sin(torch.tensor(a))
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, float(c), -float(s)], [0.0, float(s), float(c)]])
    m = _YIQ2RGB @ rot @ _RGB2YIQ
    return torch.einsum("ij,jhw->ihw", m.to(image.dtype), image)


class RandomPhotometricDistort:
    """SSD's photometric distortions, each with probability ``p``: brightness, contrast (before or
    after saturation/hue, at random), saturation, hue, and a random channel permutation."""

    def __init__(
        self,
        brightness: tuple[float, float] = (0.875, 1.125),
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (-0.05, 0.05),
        p: float = 0.5,
    ) -> None:
        self.brightness, self.contrast, self.saturation, self.hue, self.p = (
            brightness,
            contrast,
            saturation,
            hue,
            p,
        )

    @staticmethod
    def _u(lo_hi: tuple[float, float]) -> float:
        lo, hi = lo_hi
        return float(torch.empty(()).uniform_(lo, hi))

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        r = torch.rand(7)
        if r[0] < self.p:
            image = TF.adjust_brightness(image, self._u(self.brightness))
        contrast_first = bool(r[1] < 0.5)
        if contrast_first and r[2] < self.p:
            image = TF.adjust_contrast(image, self._u(self.contrast))
        if r[3] < self.p:
            image = TF.adjust_saturation(image, self._u(self.saturation))
        if r[4] < self.p:
            image = _rotate_hue(image, self._u(self.hue))
        if not contrast_first and r[5] < self.p:
            image = TF.adjust_contrast(image, self._u(self.contrast))
        if r[6] < self.p:
            image = image[torch.randperm(image.shape[0])]
        return image.clamp_(0.0, 1.0), target

    def __repr__(self) -> str:
        return f"RandomPhotometricDistort(p={self.p})"


class RandomZoomOut:
    """SSD's "expand": with probability ``p``, place the image on a canvas ``side_range`` times
    larger filled with ``fill``; objects become smaller."""

    def __init__(
        self,
        fill: Sequence[float] = IMAGENET_MEAN,
        side_range: tuple[float, float] = (1.0, 4.0),
        p: float = 0.5,
    ) -> None:
        if not 1.0 <= side_range[0] <= side_range[1]:
            raise ValueError(f"RandomZoomOut: need 1 <= side_range[0] <= side_range[1], got {side_range}")
        self.fill, self.side_range, self.p = tuple(fill), side_range, p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        c, h, w = image.shape
        r = float(torch.empty(()).uniform_(*self.side_range))
        ch, cw = int(h * r), int(w * r)
        top = int(torch.randint(0, ch - h + 1, ()))
        left = int(torch.randint(0, cw - w + 1, ()))
        canvas = torch.tensor(self.fill, dtype=image.dtype)[:, None, None].expand(c, ch, cw).clone()
        canvas[:, top : top + h, left : left + w] = image
        target = dict(target)
        target["boxes"] = target["boxes"] + torch.tensor([left, top, left, top], dtype=torch.float32)
        if "masks" in target:
            m = target["masks"].new_zeros((target["masks"].shape[0], ch, cw))
            m[:, top : top + h, left : left + w] = target["masks"]
            target["masks"] = m
        return canvas, target

    def __repr__(self) -> str:
        return f"RandomZoomOut(side_range={self.side_range}, p={self.p})"


class RandomIoUCrop:
    """SSD's IoU-constrained random crop.

    Draw a minimum IoU from ``sampler_options`` (None: keep the whole image); try up to
    ``trials`` crops with sides in [min_scale, max_scale] of the image and aspect ratio in
    [min_aspect_ratio, max_aspect_ratio]; accept one that contains at least one box centre and
    overlaps some such box with IoU >= the minimum. Boxes whose centre falls outside are dropped,
    the rest are clipped to the crop (areas scale by the kept fraction of the box; mask areas
    are recounted).
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float | None] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, None),
        trials: int = 40,
    ) -> None:
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options = list(sampler_options)
        self.trials = trials

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        boxes = target["boxes"]
        if boxes.shape[0] == 0:
            return image, target
        h, w = image.shape[-2:]
        cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
        cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
        areas = _box_area(boxes)
        # bounded, unlike the reference loop: a crop that never satisfies the option keeps the image
        for _ in range(50):
            min_iou = self.options[int(torch.randint(len(self.options), ()))]
            if min_iou is None:
                return image, target
            # all trials at once: T candidate crops x N boxes
            r = torch.rand(self.trials, 4)
            scale = self.min_scale + (self.max_scale - self.min_scale) * r[:, :2]
            cw, ch = (w * scale[:, 0]).floor(), (h * scale[:, 1]).floor()
            left, top = ((w - cw) * r[:, 2]).floor(), ((h - ch) * r[:, 3]).floor()
            right, bottom = left + cw, top + ch
            inside = (
                (cx[None] > left[:, None])
                & (cx[None] < right[:, None])
                & (cy[None] > top[:, None])
                & (cy[None] < bottom[:, None])
            )
            iw = (
                torch.min(boxes[None, :, 2], right[:, None]) - torch.max(boxes[None, :, 0], left[:, None])
            ).clamp(min=0)
            ih = (
                torch.min(boxes[None, :, 3], bottom[:, None]) - torch.max(boxes[None, :, 1], top[:, None])
            ).clamp(min=0)
            inter = iw * ih
            iou = inter / (areas[None] + (cw * ch)[:, None] - inter)
            aspect = cw / ch.clamp(min=1)
            ok = (
                (cw >= 1)
                & (ch >= 1)
                & (aspect >= self.min_aspect_ratio)
                & (aspect <= self.max_aspect_ratio)
                & inside.any(1)
                & (torch.where(inside, iou, torch.zeros_like(iou)).amax(1) >= min_iou)
            )
            hits = torch.nonzero(ok).flatten()
            if hits.numel() == 0:
                continue
            k = int(hits[0])
            return self._crop(
                image, _select(target, inside[k]), int(left[k]), int(top[k]), int(right[k]), int(bottom[k])
            )
        return image, target

    @staticmethod
    def _crop(
        image: Tensor, target: Target, left: int, top: int, right: int, bottom: int
    ) -> tuple[Tensor, Target]:
        target = dict(target)
        old = target["boxes"]
        b = old - torch.tensor([left, top, left, top], dtype=torch.float32)
        b[:, 0::2] = b[:, 0::2].clamp(0, right - left)
        b[:, 1::2] = b[:, 1::2].clamp(0, bottom - top)
        target["boxes"] = b
        if "masks" in target:
            target["masks"] = target["masks"][:, top:bottom, left:right]
        if "area" in target:
            if "masks" in target:
                target["area"] = target["masks"].flatten(1).sum(1).float()
            else:
                frac = _box_area(b) / _box_area(old).clamp(min=1e-6)
                target["area"] = target["area"] * frac
        return image[:, top:bottom, left:right], target

    def __repr__(self) -> str:
        return f"RandomIoUCrop(scale=({self.min_scale}, {self.max_scale}), options={self.options})"


class DropSmallBoxes:
    """Drop boxes narrower or shorter than ``min_size`` pixels (see the module docstring)."""

    def __init__(self, min_size: float = MIN_BOX_SIZE) -> None:
        self.min_size = min_size

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        b = target["boxes"]
        keep = ((b[:, 2] - b[:, 0]) >= self.min_size) & ((b[:, 3] - b[:, 1]) >= self.min_size)
        if bool(keep.all()):
            return image, target
        return image, _select(target, keep)

    def __repr__(self) -> str:
        return f"DropSmallBoxes(min_size={self.min_size})"


AUGMENTATIONS: tuple[str, ...] = ("detector", "flip")


def build_transforms(arch: str, image_size: int, train: bool, augment: str = "detector") -> Compose:
    """The data pipeline of a detector.

    Args:
        arch: detector architecture (``retinanet``, ``faster_rcnn``, ``mask_rcnn``, ``fcos``,
            ``ssd``, ``ssdlite``); the SSD family gets SSD's augmentation.
        image_size: longer image side for training.
        train: training pipeline (resize + augmentation) or evaluation pipeline (no change: the
            detector resizes and maps its boxes back to the original image, see the module docstring).
        augment: ``detector`` (each detector's own recipe, below) or ``flip`` (resize and horizontal
            flip for every arch). SSD's photometric distortion, zoom-out and IoU crop belong to its
            600-epoch recipe at 300 px: fine-tuning SSDlite for 4 epochs on 96 px images, a
            pretrained body reached AP 23.7 with ``flip`` and 4.8 with SSD's pipeline (README,
            "Pretraining"); the zoom-out shrinks objects of 30-70 px below every default box.

    Returns:
        A callable ``(image, target) -> (image, target)``.

    Training pipelines:
        ``ssd``/``ssdlite``/``dssd``/``refinedet``: Resize, RandomPhotometricDistort, RandomZoomOut,
        RandomIoUCrop, RandomHorizontalFlip, Resize, DropSmallBoxes (the first resize bounds the cost
        of a zoom-out canvas up to 4x the image).
        others: Resize, RandomHorizontalFlip, DropSmallBoxes.
    """
    if image_size < 1:
        raise ValueError(f"build_transforms: image_size must be >= 1, got {image_size}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment: {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    if not train:
        return Compose([])
    if arch in SSD_ARCHS and augment == "detector":
        return Compose(
            [
                Resize(image_size),
                RandomPhotometricDistort(),
                RandomZoomOut(),
                RandomIoUCrop(),
                RandomHorizontalFlip(0.5),
                Resize(image_size),
                DropSmallBoxes(),
            ]
        )
    return Compose([Resize(image_size), RandomHorizontalFlip(0.5), DropSmallBoxes()])
