"""``hdet bench loss`` knows DSSD and RefineDet: each gets its small backbone unless the one asked
for fits it, and one interleaved step of each loss gives a finite ratio."""

from __future__ import annotations

import math

from benchmarks.loss import _backbone, bench_arch


def test_the_loss_bench_knows_dssd_and_refinedet() -> None:
    assert (_backbone("dssd", None), _backbone("refinedet", "vgg16"), _backbone("dssd", "vgg16")) == (
        "resnet18",
        "vgg16",
        "resnet18",
    )
    r = bench_arch("refinedet", backbone="resnet18", image_size=64, batch=1, steps=1, warmup=0)
    assert r["image_size"] == 64 and math.isfinite(r["ratio"]) and r["ratio"] > 0
