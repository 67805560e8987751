"""Measure a fine-tuning recipe: AP per epoch and CPU time of single-process trainings of a spec.

    .venv/bin/python scripts/finetune.py SPEC [--seeds 0 1] [--augment flip] [--threads 1] [--split test]

The spec's ``pretrain`` section is run (or found in the cache, ``$HDET_HOME/pretrained``) first; then
for every seed the spec's detector is trained with the spec's loss and recipe (optimizer, lr,
warm-up and decay of ``workers.training.recipe``; the data order of a one-worker run: aspect-ratio grouping on
a one-replica ``DistributedSampler``) in a plain loop on ``--threads`` CPU threads, and evaluated on
the held-out split after every epoch with the spec's evaluation protocol (COCO AP of
:func:`harmonic.eval.evaluate`). Printed per epoch: loss, AP, AP50, AP75 and the CPU seconds the
training took so far (evaluation not included); at the end, the final AP of every seed with mean and
standard deviation, and the CPU seconds of one training.

The augmentation is the spec's ``train.augment``; ``--augment`` overrides it (README, "Pretraining").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _evaluate(model: Any, ds: Any, ann_file: str) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from harmonic.data.sampler import collate_fn
    from harmonic.eval import evaluate
    from harmonic.eval.detections import eval_mode, image_id, to_coco_results

    results = []
    with torch.no_grad(), eval_mode(model):
        for images, targets in DataLoader(ds, batch_size=16, collate_fn=collate_fn):
            ids = [image_id(t) for t in targets]
            results.extend(to_coco_results(model(list(images)), ids, ds.label_to_cat_id))
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    return dict(evaluate(ann_file, results).stats)


def train_one(spec: Any, seed: int, augment: str, split: str) -> list[dict[str, float]]:
    """Train ``spec`` with ``seed`` in a plain loop; the per-epoch rows."""
    import torch

    from harmonic.data import build_dataset
    from harmonic.step import optimizer_step, total_loss
    from workers.training import recipe

    t = spec.train
    cfg = recipe.dataset_config(spec)
    train_ds = recipe.train_dataset(spec, augment=augment)
    eval_ds: Any = build_dataset(cfg, split)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = recipe.build_model(spec, train_ds.num_classes)
    model.train()
    # Data loading stays in this process (data_workers=0): the CPU time counted is the training's.
    loader, sampler, iters_per_epoch = recipe.train_loader(
        train_ds, batch_size=t.batch_size, aspect_ratio_groups=t.aspect_ratio_groups, seed=seed
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = recipe.make_optimizer(model, spec)
    scheduler = recipe.make_scheduler(optimizer, spec, iters_per_epoch)
    ann_file = str(Path(cfg["root"]) / "annotations" / f"instances_{split}.json")
    rows, cpu = [], 0.0
    for epoch in range(1, t.epochs + 1):
        sampler.set_epoch(epoch)
        t0, losses = time.process_time(), []
        for images, targets in loader:
            loss = total_loss(model(list(images), list(targets)))
            optimizer_step(
                loss, optimizer, scheduler=scheduler, clip_grad_norm=t.clip_grad_norm, params=params
            )
            losses.append(float(loss.detach()))
        cpu += time.process_time() - t0
        stats = _evaluate(model, eval_ds, ann_file)
        row = {"seed": seed, "epoch": epoch, "loss": statistics.fmean(losses), "cpu_s": cpu}
        row.update({k: 100 * stats[k] for k in ("AP", "AP50", "AP75")})
        rows.append(row)
        print(
            f"seed {seed} epoch {epoch}: loss {row['loss']:.3f}  AP {row['AP']:.1f}  AP50 {row['AP50']:.1f}  "
            f"AP75 {row['AP75']:.1f}  ({cpu:.0f} CPU s)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--augment", choices=["detector", "flip"], help="default: the spec's train.augment")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--json", help="write every row to this file")
    args = p.parse_args(argv)

    import torch

    from workers.pretrain import ensure_pretrained
    from workers.spec import Spec

    torch.set_num_threads(args.threads)
    spec = Spec.from_file(args.spec)
    if spec.pretrain is not None:  # as hdet run does, without the MLflow run
        t0 = time.time()
        done = ensure_pretrained(spec)
        spec = spec.with_overrides({"detector.pretrained_backbone": str(done.path)})
        print(f"pretrained body ready in {time.time() - t0:.0f} s: {done.path}", flush=True)
    augment = args.augment or spec.train.augment
    rows = [row for seed in args.seeds for row in train_one(spec, seed, augment, args.split)]
    finals = [r for r in rows if r["epoch"] == spec.train.epochs]
    aps = [r["AP"] for r in finals]
    cpus = [r["cpu_s"] for r in finals]
    sd = statistics.stdev(aps) if len(aps) > 1 else math.nan
    print(
        f"final AP over seeds {args.seeds}: {', '.join(f'{a:.1f}' for a in aps)}; mean {statistics.fmean(aps):.1f} "
        f"sd {sd:.1f}; CPU s per training: {', '.join(f'{c:.0f}' for c in cpus)}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
