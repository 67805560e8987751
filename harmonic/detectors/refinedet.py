"""RefineDet (Zhang et al. 2018, "Single-Shot Refinement Neural Network for Object Detection"): the
model, with the original loss, in torchvision's detection contract, and :func:`build_refinedet`.

Images in (a list of 0-1 tensors, resized to a fixed square by ``GeneralizedRCNNTransform`` as SSD
does), a loss dict out in training, ``{"boxes", "scores", "labels"}`` per image in eval, in the
pixels of the given images. The network (:func:`~.trunks.refinedet_trunk` for its four maps, strides
8, 16, 32, 64):

* ARM, the anchor refinement module: on each trunk map, 3x3 convolutions give every anchor an
  objectness (2-way softmax) and offsets; the anchors (3 per position: aspect ratios 0.5, 1, 2 of a
  square 4x the map's stride, 32-256 px, centred on the cells) decoded by those offsets (detached,
  as the original's loss layer reads them) are the *refined anchors*;
* TCBs, transfer connection blocks: conv 3x3 - ReLU - conv 3x3 on the trunk map, plus the 2x2
  stride-2 deconvolution of the TCB above (cropped to odd maps), ReLU, conv 3x3 - ReLU (256 channels);
* ODM, the object detection module: on each TCB map, 3x3 convolutions give every refined anchor the
  class scores (softmax over background + classes) and offsets *from the refined anchor*.

Negative anchor filtering: an anchor whose ARM background probability exceeds ``objectness_thresh``
(0.99) takes no part in the ODM's training (neither positive nor a negative candidate) and its ODM
scores are 0 at inference.

The loss (``compute_loss``), the original's: the ARM's multibox loss on binary labels (anchors matched
to a ground truth at IoU >= 0.5, plus each one's best anchor) and the ODM's multibox loss on the refined
anchors (matched the same way, filtered anchors dropped), each softmax CE with 3:1 hard negative
mining + smooth L1, divided by its own number of positives (:mod:`.multibox`). Keys
``arm_classification``, ``arm_bbox_regression``, ``classification``, ``bbox_regression``. The Harmonic
adapter (:mod:`.refinedet_harmonic`) changes the ODM's part only; the ARM keeps this binary loss.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from harmonic.losses import upcast

from .multibox import MultiboxTargets, match, multibox_loss, multibox_targets
from .trunks import RESNET_MEAN, RESNET_STD, VGG_MEAN, VGG_STD, refinedet_trunk, xavier_init

__all__ = ["RefineDet", "RefineDetAnchors", "TransferConnection", "build_refinedet"]


class RefineDetAnchors(nn.Module):
    """RefineDet's anchors: on each map, at every cell centre, one square ``size`` (4x the stride) at
    each aspect ratio (h / w), in the pixels of the transformed image; ``[A, 4]`` per image, in the
    (row, column, anchor) order of torchvision's ``SSDHead`` outputs."""

    def __init__(
        self,
        sizes: tuple[float, ...] = (32, 64, 128, 256),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    ):
        super().__init__()
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios

    def num_anchors_per_location(self) -> list[int]:
        return [len(self.aspect_ratios)] * len(self.sizes)

    def forward(self, images: ImageList, features: list[Tensor]) -> list[Tensor]:
        h_img, w_img = images.tensors.shape[-2:]
        dtype, device = features[0].dtype, features[0].device
        ratios = torch.as_tensor(self.aspect_ratios, dtype=dtype, device=device)
        per_level = []
        for size, f in zip(self.sizes, features):
            h, w = f.shape[-2:]
            cy = (torch.arange(h, dtype=dtype, device=device) + 0.5) * (h_img / h)
            cx = (torch.arange(w, dtype=dtype, device=device) + 0.5) * (w_img / w)
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            half_w = size / 2 / torch.sqrt(ratios)
            half_h = size / 2 * torch.sqrt(ratios)
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
            offsets = torch.stack([-half_w, -half_h, half_w, half_h], dim=-1)[None]
            per_level.append((centres + offsets).reshape(-1, 4))
        anchors = torch.cat(per_level)
        return [anchors for _ in range(images.tensors.size(0))]


class TransferConnection(nn.Module):
    """A transfer connection block (Fig. 2 of the RefineDet paper)."""

    def __init__(self, in_channels: int, channels: int = 256, has_above: bool = True) -> None:
        super().__init__()
        self.lateral = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2) if has_above else None
        self.out = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        xavier_init(self)

    def forward(self, x: Tensor, above: Tensor | None) -> Tensor:
        y = self.lateral(x)
        if self.up is not None and above is not None:
            y = y + self.up(above)[..., : y.shape[-2], : y.shape[-1]]
        return self.out(F.relu(y))


class RefineDet(nn.Module):
    """RefineDet (module docstring): ``backbone`` returns the four trunk maps (``out_channels``)."""

    def __init__(
        self,
        backbone: nn.Module,
        anchor_generator: RefineDetAnchors,
        size: tuple[int, int],
        num_classes: int,
        image_mean: list[float],
        image_std: list[float],
        *,
        tcb_channels: int = 256,
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        detections_per_img: int = 200,
        iou_thresh: float = 0.5,
        topk_candidates: int = 400,
        neg_to_pos_ratio: float = 3.0,
        objectness_thresh: float = 0.99,
    ) -> None:
        super().__init__()
        channels: list[int] = list(backbone.out_channels)  # type: ignore[arg-type]
        num_anchors = anchor_generator.num_anchors_per_location()
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.arm_head = SSDHead(channels, num_anchors, 2)
        self.tcbs = nn.ModuleList(
            TransferConnection(c, tcb_channels, has_above=i < len(channels) - 1)
            for i, c in enumerate(channels)
        )
        self.head = SSDHead([tcb_channels] * len(channels), num_anchors, num_classes)  # the ODM
        self.transform = GeneralizedRCNNTransform(
            min(size), max(size), image_mean, image_std, size_divisible=1, fixed_size=size
        )
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.proposal_matcher = det_utils.SSDMatcher(iou_thresh)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.neg_to_pos_ratio = neg_to_pos_ratio
        self.objectness_thresh = objectness_thresh

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("targets should not be None in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        arm = self.arm_head(features)
        above: Tensor | None = None
        tcb_maps: list[Tensor] = []
        for tcb, f in zip(reversed(self.tcbs), reversed(features)):
            above = tcb(f, above)
            tcb_maps.insert(0, above)
        odm = self.head(tcb_maps)
        anchors = self.anchor_generator(image_list, features)
        # decoded in float32: under AMP the ARM's offsets are fp16, too coarse for anchors of 300+ px
        refined = [
            self.box_coder.decode_single(upcast(r.detach()), a)
            for r, a in zip(arm["bbox_regression"], anchors)
        ]
        with torch.no_grad():
            keep = F.softmax(arm["cls_logits"], dim=-1)[..., 0] <= self.objectness_thresh
        if self.training:
            assert targets is not None
            return self.compute_loss(targets, arm, odm, anchors, refined, keep)
        detections = self.postprocess_detections(odm, refined, keep, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)  # type: ignore[no-any-return]

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        arm: dict[str, Tensor],
        odm: dict[str, Tensor],
        anchors: list[Tensor],
        refined: list[Tensor],
        keep: Tensor,
    ) -> dict[str, Tensor]:
        """The ARM's binary multibox loss on the anchors plus :meth:`odm_loss` on the refined anchors."""
        for i, target in enumerate(targets):
            boxes = target["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or (boxes[:, 2:] <= boxes[:, :2]).any():
                raise ValueError(f"target {i}: boxes must be [N, 4] x1 y1 x2 y2 with positive sides")
        arm_matched = [match(self.proposal_matcher, t["boxes"], a) for t, a in zip(targets, anchors)]
        arm_targets = multibox_targets(targets, anchors, arm_matched, binary=True)
        arm_losses = multibox_loss(
            self.box_coder, arm["cls_logits"], arm["bbox_regression"], arm_targets, self.neg_to_pos_ratio
        )
        odm_matched = [
            match(self.proposal_matcher, t["boxes"], r, k) for t, r, k in zip(targets, refined, keep)
        ]
        losses = {f"arm_{k}": v for k, v in arm_losses.items()}
        losses.update(self.odm_loss(odm, multibox_targets(targets, refined, odm_matched)))
        return losses

    def odm_loss(self, odm: dict[str, Tensor], t: MultiboxTargets) -> dict[str, Tensor]:
        """The ODM's loss: SSD's multibox loss (``classification``, ``bbox_regression``)."""
        return multibox_loss(
            self.box_coder, odm["cls_logits"], odm["bbox_regression"], t, self.neg_to_pos_ratio
        )

    def postprocess_detections(
        self, odm: dict[str, Tensor], refined: list[Tensor], keep: Tensor, image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """As torchvision's ``SSD.postprocess_detections``, on the refined anchors, with the scores of
        filtered anchors set to 0: per class, scores > ``score_thresh``, the ``topk_candidates`` best,
        then class-wise NMS at ``nms_thresh`` and the ``detections_per_img`` best."""
        scores_all = F.softmax(odm["cls_logits"], dim=-1) * keep[..., None]
        detections = []
        for regression, scores, anchors, shape in zip(
            odm["bbox_regression"], scores_all, refined, image_shapes
        ):
            boxes = box_ops.clip_boxes_to_image(
                self.box_coder.decode_single(upcast(regression), anchors), shape
            )
            out_boxes, out_scores, out_labels = [], [], []
            for label in range(1, scores.size(-1)):
                score = scores[:, label]
                chosen = score > self.score_thresh
                score, box = score[chosen], boxes[chosen]
                score, idx = score.topk(det_utils._topk_min(score, self.topk_candidates, 0))
                out_boxes.append(box[idx])
                out_scores.append(score)
                out_labels.append(torch.full_like(idx, label))
            image_boxes, image_scores = torch.cat(out_boxes), torch.cat(out_scores)
            image_labels = torch.cat(out_labels)
            best = box_ops.batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)
            best = best[: self.detections_per_img]
            detections.append(
                {"boxes": image_boxes[best], "scores": image_scores[best], "labels": image_labels[best]}
            )
        return detections


def build_refinedet(
    num_classes: int,
    backbone: str,
    image_size: int,
    pretrained: str | os.PathLike[str] | None,
    kwargs: dict[str, Any],
) -> RefineDet:
    """RefineDet on ``vgg16`` or a plain ResNet; ``kwargs`` go to :class:`RefineDet`
    (``trainable_backbone_layers`` to the body)."""
    layers = kwargs.pop("trainable_backbone_layers", None)
    trunk = refinedet_trunk(backbone, pretrained, layers)
    vgg = backbone == "vgg16"
    kwargs.setdefault("image_mean", VGG_MEAN if vgg else RESNET_MEAN)
    kwargs.setdefault("image_std", VGG_STD if vgg else RESNET_STD)
    return RefineDet(trunk, RefineDetAnchors(), (image_size, image_size), num_classes, **kwargs)
