"""Training transforms (boxes stay valid and agree with masks) and aspect-ratio grouped batching."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from harmonic.data import (
    CocoDetection,
    GroupedBatchSampler,
    build_transforms,
    collate_fn,
    create_aspect_ratio_groups,
)
from harmonic.data.transforms import RandomHorizontalFlip, RandomIoUCrop, RandomZoomOut, Resize


def _masks_inside_boxes(t: dict[str, torch.Tensor], tol: float = 0.0) -> None:
    for m, box in zip(t["masks"].bool(), t["boxes"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if xs.numel() == 0:
            continue
        # every mask pixel [c, c + 1) overlaps the box [x1, x2) grown by tol
        assert xs.min() + 1 > box[0] - tol and xs.max() < box[2] + tol, (box, xs.min(), xs.max())
        assert ys.min() + 1 > box[1] - tol and ys.max() < box[3] + tol, (box, ys.min(), ys.max())


def _check(image: torch.Tensor, t: dict[str, torch.Tensor]) -> None:
    h, w = image.shape[-2:]
    b = t["boxes"]
    assert b.dtype == torch.float32 and b.shape[1] == 4
    assert bool((b[:, 2] - b[:, 0] >= 1).all() and (b[:, 3] - b[:, 1] >= 1).all())
    assert bool((b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all())
    n = len(b)
    assert t["labels"].shape == (n,) and t["area"].shape == (n,) and t["iscrowd"].shape == (n,)
    assert t["masks"].shape == (n, h, w)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # one resize keeps each mask pixel on its box; a chain of resizes (SSD's) may drift by one pixel
    _masks_inside_boxes(t, tol=1.0)


@pytest.mark.parametrize("arch", ["retinanet", "ssd"])
def test_training_pipelines_keep_boxes_valid_and_masks_consistent(synth_root: Path, arch: str):
    torch.manual_seed(0)
    ds = CocoDetection(
        synth_root / "train",
        synth_root / "annotations" / "instances_train.json",
        with_masks=True,
        transforms=build_transforms(arch, 96, train=True),
    )
    sizes = set()
    for _ in range(2 if arch == "ssd" else 1):
        for i in range(len(ds)):
            image, t = ds[i]
            assert max(image.shape[-2:]) == 96
            sizes.add(tuple(image.shape[-2:]))
            _check(image, t)
    if arch == "ssd":
        assert len(sizes) > 1  # the IoU crop changes the aspect ratio


def test_eval_pipeline_leaves_items_unchanged(synth_root: Path):
    ann = synth_root / "annotations" / "instances_val.json"
    plain = CocoDetection(synth_root / "val", ann)
    ds = CocoDetection(synth_root / "val", ann, transforms=build_transforms("faster_rcnn", 64, train=False))
    (a, ta), (b, tb) = plain[0], ds[0]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def _target() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = torch.rand(3, 20, 30)
    masks = torch.zeros(2, 20, 30, dtype=torch.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[1, 10:18, 20:29] = 1
    t = {
        "boxes": torch.tensor([[3.0, 2.0, 9.0, 6.0], [20.0, 10.0, 29.0, 18.0]]),
        "labels": torch.tensor([1, 2]),
        "area": torch.tensor([24.0, 72.0]),
        "iscrowd": torch.zeros(2, dtype=torch.int64),
        "masks": masks,
        "image_id": torch.tensor(4),
    }
    return image, t


def test_horizontal_flip_boxes():
    image, t = _target()
    out, ft = RandomHorizontalFlip(p=1.0)(image, t)
    assert ft["boxes"].tolist() == [[21, 2, 27, 6], [1, 10, 10, 18]]
    assert torch.equal(out, image.flip(-1))
    # the flipped box is the tight box of the flipped mask
    for m, box in zip(ft["masks"], ft["boxes"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()
    assert RandomHorizontalFlip(p=0.0)(image, t)[1] is t


def test_resize_scales_boxes_masks_and_area():
    image, t = _target()
    out, rt = Resize(60)(image, t)
    assert out.shape == (3, 40, 60)
    assert rt["boxes"].tolist() == [[6, 4, 18, 12], [40, 20, 58, 36]]
    assert rt["area"].tolist() == [96, 288]
    assert rt["masks"].flatten(1).sum(1).tolist() == [96, 288]


def test_zoom_out_and_iou_crop_move_boxes_with_masks():
    torch.manual_seed(1)
    image, t = _target()
    for _ in range(20):
        img, zt = RandomZoomOut(p=1.0, side_range=(1.5, 3.0))(image, t)
        assert img.shape[-2] >= 30 and int(zt["masks"].sum()) == int(t["masks"].sum())
        _masks_inside_boxes(zt)
        img, ct = RandomIoUCrop(sampler_options=[0.0, 0.3])(img, zt)
        assert len(ct["boxes"]) >= 1
        assert ct["masks"].shape[-2:] == img.shape[-2:]
        _masks_inside_boxes(ct)
        assert ct["area"].tolist() == ct["masks"].flatten(1).sum(1).float().tolist()


def test_aspect_ratio_groups():
    groups = create_aspect_ratio_groups([0.4, 0.75, 1.0, 1.33, 3.0], k=1)
    # bins 0.5, 1, 2: below 0.5 | [0.5, 1) | [1, 2) | from 2
    assert groups == [0, 1, 2, 2, 3]
    assert create_aspect_ratio_groups([0.9, 1.1], k=0) == [0, 1]


class _Stub(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grouped_sampler_over_distributed_sampler(world: int):
    n, batch = 23, 4
    ds = _Stub(n)
    ratios = [0.75 if i % 3 else 1.33 for i in range(n)]
    groups = create_aspect_ratio_groups(ratios, k=2)
    counts, seen = [], Counter()
    num_groups = len(set(groups))
    for rank in range(world):
        dist = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
        gbs = GroupedBatchSampler(dist, groups, batch)
        gbs.set_epoch(3)
        batches = list(gbs)
        counts.append(len(batches))
        assert len(batches) == len(gbs)
        # only the leftovers of the smaller partial groups may wait for another epoch
        unused = set(dist) - {i for b in batches for i in b}
        assert len(unused) <= (num_groups - 1) * (batch - 1)
        for b in batches:
            assert len(b) == batch
            assert len({groups[i] for i in b}) == 1  # one aspect-ratio group per batch
            seen.update(b)
    assert len(set(counts)) == 1  # every rank runs the same number of steps
    assert counts[0] == -(-len(dist) // batch)


def test_grouped_sampler_groups_and_covers_single_process():
    groups = [i % 2 for i in range(10)]
    batches = list(GroupedBatchSampler(SequentialSampler(range(10)), groups, 3))
    assert len(batches) == 4
    assert batches[:2] == [[0, 2, 4], [1, 3, 5]]
    assert sorted({i for b in batches for i in b}) == list(range(10))


def test_collate_fn():
    images, targets = collate_fn([(1, "a"), (2, "b")])
    assert images == (1, 2) and targets == ("a", "b")
