"""``hdet bench loss``: training-step time with the HarmonicDet loss / with the standard loss.

For each arch, two models with identical weights (one ``standard``, one ``harmonicdet``) train on
the same generated batch; after a warm-up their steps (forward + backward + optimizer step) are
measured interleaved, one of each in turn, so that machine load affects both alike. The table gives
the median milliseconds of each and their ratio; the JSON has every sample. ``--clock cpu`` measures
the CPU time of this process instead of the wall clock: with ``--threads 1`` it hardly depends on
what else the machine runs (another job's load only slows the wall clock).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

from harmonic.catalog import DSSD_REFINEDET_MIN_IMAGE_SIZE, SSD_MIN_IMAGE_SIZE, valid_backbones
from harmonic.detectors import ARCHS, build_detector
from harmonic.step import optimizer_step, total_loss

__all__ = ["loss_main", "bench_arch"]

#: The small backbone of each arch when ``--backbone`` does not fit it.
_SMALL_BACKBONE = {"ssd": "vgg16", "ssdlite": "mobilenet_v3", "dssd": "resnet18", "refinedet": "resnet18"}
_MIN_SIZE = {
    "ssd": SSD_MIN_IMAGE_SIZE,
    "dssd": DSSD_REFINEDET_MIN_IMAGE_SIZE,
    "refinedet": DSSD_REFINEDET_MIN_IMAGE_SIZE,
}


def _backbone(arch: str, requested: str | None) -> str:
    """``requested`` where ``arch`` takes it, else the arch's small backbone (the table names it)."""
    if requested is not None and requested in valid_backbones(arch):
        return requested
    return _SMALL_BACKBONE.get(arch, "resnet18_fpn")


def synthetic_batch(
    n: int, size: int, num_classes: int, seed: int = 0, sides: tuple[float, float] = (1 / 6, 1 / 2)
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``n`` noise images of ``size`` px with 3 filled boxes each (sides drawn between the two
    fractions of ``sides``), their labels and masks: a batch every detector (Mask R-CNN too) trains on."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels, masks = [], [], []
        for _ in range(3):
            w, h = (
                int(v) for v in torch.randint(int(size * sides[0]), int(size * sides[1]), (2,), generator=g)
            )
            x1 = int(torch.randint(0, size - w, (1,), generator=g))
            y1 = int(torch.randint(0, size - h, (1,), generator=g))
            c = int(torch.randint(1, num_classes, (1,), generator=g))
            img[(c - 1) % 3, y1 : y1 + h, x1 : x1 + w] = 1.0
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(c)
            m = torch.zeros(size, size, dtype=torch.uint8)
            m[y1 : y1 + h, x1 : x1 + w] = 1
            masks.append(m)
        images.append(img)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels),
                "masks": torch.stack(masks),
            }
        )
    return images, targets


#: what a step is timed with: the wall clock, or the CPU time of this process (all its threads)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    clock: str = "wall",
) -> float:
    now = CLOCKS[clock]
    t0 = now()
    optimizer_step(total_loss(model(images, targets)), opt)
    return (now() - t0) * 1000.0


def bench_arch(
    arch: str,
    *,
    backbone: str | None,
    image_size: int,
    batch: int,
    steps: int,
    warmup: int,
    num_classes: int = 4,
    clock: str = "wall",
) -> dict[str, Any]:
    """Median step time (ms, ``clock``: see :data:`CLOCKS`) of ``standard`` and ``harmonicdet`` on one
    arch, measured interleaved."""
    size = max(image_size, _MIN_SIZE.get(arch, 0))
    models = {}
    for kind in ("standard", "harmonicdet"):
        torch.manual_seed(0)  # identical initial weights
        models[kind] = build_detector(arch, num_classes, loss=kind, backbone=backbone, image_size=size)
    # lr 0: the weights stay identical, so both models do the same work at every step
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9) for k, m in models.items()}
    images, targets = synthetic_batch(batch, size, num_classes)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + steps):
        order = ("standard", "harmonicdet") if i % 2 == 0 else ("harmonicdet", "standard")
        for kind in order:
            torch.manual_seed(i)  # same proposal/anchor sampling for both
            ms = _step(models[kind], opts[kind], images, targets, clock)
            if i >= warmup:
                times[kind].append(ms)
    std, hdet = statistics.median(times["standard"]), statistics.median(times["harmonicdet"])
    return {
        "arch": arch,
        "backbone": backbone,
        "image_size": size,
        "batch": batch,
        "steps": steps,
        "clock": clock,
        "standard_ms": std,
        "harmonicdet_ms": hdet,
        "ratio": hdet / std,
        "samples_ms": times,
    }


def loss_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hdet bench loss",
        description="training-step time with the harmonicdet loss / with the standard loss",
    )
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument(
        "--backbone",
        default=None,
        help="backbone of every arch that takes it; the others use their small one (resnet18_fpn for "
        "the FPN archs, resnet18 for dssd/refinedet, vgg16 for ssd, mobilenet_v3 for ssdlite)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="input size (SSD300 VGG16: at least 268; dssd/refinedet: 64)",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per loss kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall clock, or this process's CPU time"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    header = (
        f"{'arch':<12} {'backbone':<14} {'size':>4} {'standard ms':>12} {'harmonicdet ms':>15} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for arch in args.archs:
        backbone = _backbone(arch, args.backbone)
        r = bench_arch(
            arch,
            backbone=backbone,
            image_size=args.image_size,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            clock=args.clock,
        )
        rows.append(r)
        print(
            f"{arch:<12} {backbone:<14} {r['image_size']:>4} {r['standard_ms']:>12.1f} "
            f"{r['harmonicdet_ms']:>15.1f} {r['ratio']:>7.3f}",
            flush=True,
        )
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "clock": args.clock,
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(loss_main())
