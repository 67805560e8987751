"""GPU-hours of each experiment in configs/paper/, from its own schedule and a cited throughput.

Not measured here (no GPU on the development machines): the training speed of the same detector in
a reference implementation on 8 V100 GPUs, as its model zoo reports it. A training costs
``epochs x training images / (images per iteration / seconds per iteration)`` seconds on 8 GPUs; an
experiment runs ``arms x seeds`` trainings (the baseline, the confirmatory arm, each arm of
``search.arms``, each grid value, and the best configuration and the baseline again on fresh seeds
when ``search.confirm_best``).
Per-epoch evaluation is left out (a few per cent); the cited R-CNN/RetinaNet speeds are for
1333x800 inputs, larger than this project's image_size 800 (longer side), so they err high.
DSSD and RefineDet are in no model zoo and their papers report inference speeds only: their rows
are SSD's cited speed at the same input size (SSD300's for 320, SSD512's for 512) times the ratio of
the CPU step times measured in README.md ("DSSD and RefineDet", "Measured": one thread, 320 px),
an estimate that assumes a GPU step scales as a CPU one.

    python tests/deploy/gpu_hours.py      # the table of the README (section Deployment)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper"

D2 = "detectron2 MODEL_ZOO.md"
MMDET_VOC = "mmdetection configs/pascal_voc README (8 GPUs x 8 images)"
#: (arch, backbone; SSD: size; DSSD/RefineDet: "backbone@size") -> (seconds per iteration, images per iteration, source); 8 V100.
THROUGHPUT: dict[tuple[str, str | int], tuple[float, int, str]] = {
    ("faster_rcnn", "resnet50_fpn"): (0.210, 16, f"{D2}: faster_rcnn_R_50_FPN_1x"),
    ("faster_rcnn", "resnet101_fpn"): (0.286, 16, f"{D2}: faster_rcnn_R_101_FPN_3x"),
    ("faster_rcnn", "resnext101_32x8d_fpn"): (0.638, 16, f"{D2}: faster_rcnn_X_101_32x8d_FPN_3x"),
    ("retinanet", "resnet50_fpn"): (0.205, 16, f"{D2}: retinanet_R_50_FPN_1x"),
    # Not in the zoo: RetinaNet R50 scaled by the Faster R-CNN X101/R50 ratio (an estimate).
    ("retinanet", "resnext101_32x8d_fpn"): (
        round(0.205 * 0.638 / 0.210, 3),
        16,
        "estimate: R50 x (X101/R50 of Faster R-CNN)",
    ),
    ("mask_rcnn", "resnet50_fpn"): (0.261, 16, f"{D2}: mask_rcnn_R_50_FPN_1x"),
    ("mask_rcnn", "resnext101_32x8d_fpn"): (0.690, 16, f"{D2}: mask_rcnn_X_101_32x8d_FPN_3x"),
    ("ssd", 300): (0.159, 64, f"{MMDET_VOC}: ssd300 240e"),
    ("ssd", 512): (0.214, 64, f"{MMDET_VOC}: ssd512 240e"),
}
#: CPU seconds of one training step at 320 px (README.md, "DSSD and RefineDet", "Measured").
CPU_STEP = {
    ("ssd", "vgg16"): 4.13,
    ("dssd", "resnet50"): 5.06,
    ("dssd", "resnet101"): 6.22,
    ("refinedet", "resnet50"): 2.23,
}
# RefineDet ResNet-101 was not measured: ResNet-50's step plus the 17 extra conv4_x blocks of
# ResNet-101, costed as DSSD ResNet-101 - DSSD ResNet-50 (conv4_x at stride 16 in both).
CPU_STEP["refinedet", "resnet101"] = round(
    CPU_STEP["refinedet", "resnet50"] + CPU_STEP["dssd", "resnet101"] - CPU_STEP["dssd", "resnet50"], 2
)
for _arch, _backbone in [("dssd", "resnet50"), ("refinedet", "resnet50"), ("refinedet", "resnet101")]:
    for _size, _ssd in [(320, 300), (512, 512)]:
        _s, _images, _ = THROUGHPUT["ssd", _ssd]
        _ratio = CPU_STEP[_arch, _backbone] / CPU_STEP["ssd", "vgg16"]
        THROUGHPUT[_arch, f"{_backbone}@{_size}"] = (
            round(_s * _ratio, 3),
            _images,
            f"estimate: ssd{_ssd} 240e x CPU step {CPU_STEP[_arch, _backbone]}/{CPU_STEP['ssd', 'vgg16']} s (README)",
        )
GPUS = 8
#: Training images: COCO train2017 with annotations, VOC 2007+2012 trainval.
TRAIN_IMAGES = {"coco": 117_266, "voc": 16_551}


@dataclass(frozen=True)
class Budget:
    spec: str
    trainings: int
    per_training: float  # GPU-hours
    source: str

    @property
    def total(self) -> float:
        return self.trainings * self.per_training


def budget(path: Path) -> Budget:
    from workers.spec import Spec

    spec = Spec.from_file(path, check_paths=False)
    arch, backbone, size = spec.detector.arch, spec.detector.backbone or "", spec.detector.image_size
    key: tuple[str, str | int] = (
        (arch, size)
        if arch == "ssd"
        else (arch, f"{backbone}@{size}")
        if arch in ("dssd", "refinedet")
        else (arch, backbone)
    )
    s_per_iter, images_per_iter, source = THROUGHPUT[key]
    seconds = spec.train.epochs * TRAIN_IMAGES[spec.dataset.format] * s_per_iter / images_per_iter
    search = spec.search
    assert search is not None, f"{path.name}: a paper experiment compares arms"
    arms = int(search.baseline) + int(search.confirmatory) + len(search.arms)
    for entry in search.space.values():
        ((_, values),) = entry.items()
        arms += len(values)
    if search.space and search.baseline and search.confirm_best:
        arms += 2  # the best configuration and the baseline again, on as many fresh seeds
    return Budget(path.stem, arms * len(search.seeds), GPUS * seconds / 3600, source)


def table() -> str:
    rows = [budget(p) for p in sorted(PAPER.glob("*.yaml"))]
    lines = [
        "| experiment | trainings (arms x seeds) | GPU-h per training | GPU-h | throughput cited |",
        "|---|---:|---:|---:|---|",
    ]
    for b in rows:
        lines.append(f"| `{b.spec}` | {b.trainings} | {b.per_training:.0f} | {b.total:.0f} | {b.source} |")
    lines.append(f"| **all** | {sum(b.trainings for b in rows)} | | **{sum(b.total for b in rows):.0f}** | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(table(), end="")
