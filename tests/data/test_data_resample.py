"""A seed's draw of the training images (``train.resample``): the same for every arm of a seed,
different between seeds, and what the training loader then iterates over."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmonic.data import build_dataset
from harmonic.data.sampler import resample_indices
from workers.training.recipe import train_loader


def test_none_keeps_every_image_in_order() -> None:
    assert resample_indices(7, "none", 1.0, seed=3) == list(range(7))


def test_a_bootstrap_draws_with_replacement_the_same_for_a_seed_and_another_for_another_seed() -> None:
    a, b = resample_indices(1000, "bootstrap", 1.0, seed=0), resample_indices(1000, "bootstrap", 1.0, seed=0)
    assert a == b and len(a) == 1000
    unique = len(set(a)) / 1000
    assert 0.60 < unique < 0.67  # 1 - 1/e of the images, on average 0.632
    assert resample_indices(1000, "bootstrap", 1.0, seed=1) != a


def test_a_subsample_draws_distinct_images() -> None:
    drawn = resample_indices(50, "subsample", 0.8, seed=4)
    assert len(drawn) == 40 == len(set(drawn)) and all(0 <= i < 50 for i in drawn)
    assert drawn != resample_indices(50, "subsample", 0.8, seed=5)


def test_the_draw_does_not_follow_the_global_random_state() -> None:
    import numpy as np

    np.random.seed(0)
    first = resample_indices(100, "bootstrap", 0.5, seed=9)
    np.random.seed(123)
    assert resample_indices(100, "bootstrap", 0.5, seed=9) == first


@pytest.mark.parametrize(
    ("method", "fraction", "message"),
    [
        ("jackknife", 1.0, "not one of"),
        ("bootstrap", 0.0, r"not in \(0, 1\]"),
        ("subsample", 0.01, "draws none"),
    ],
)
def test_bad_draws_are_refused_naming_the_option(method: str, fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resample_indices(20, method, fraction, seed=0)


def test_the_training_loader_iterates_over_the_seeds_draw(synth_root: Path) -> None:
    ds = build_dataset({"format": "coco", "root": str(synth_root), "train": "train", "val": "val"}, "train")
    full = train_loader(ds, batch_size=1, aspect_ratio_groups=2, seed=7)
    drawn = train_loader(
        ds, batch_size=1, aspect_ratio_groups=2, seed=7, resample="subsample", resample_fraction=0.5
    )
    assert full.iters_per_epoch == len(ds) == 16 and drawn.iters_per_epoch == 8
    expected = {ds.ids[i] for i in resample_indices(len(ds), "subsample", 0.5, seed=7)}
    seen = {int(targets[0]["image_id"]) for _, targets in drawn.loader}
    assert seen == expected
