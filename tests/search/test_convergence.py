"""Whether an arm's validation AP had plateaued when it was judged: the rule on hand-built histories."""

from __future__ import annotations

import math

import pytest

from workers.evidence import plateau, plateau_sentence


def _climbing(per_epoch: float, seeds: dict[int, float], epochs: int) -> dict[int, dict[int, float]]:
    """Each seed starts at its own level and gains ``per_epoch`` every epoch."""
    return {s: {e: start + per_epoch * (e - 1) for e in range(1, epochs + 1)} for s, start in seeds.items()}


def test_a_climb_larger_than_the_seed_spread_is_still_improving():
    # 3 epochs: one epoch back; each seed gains 3 points; last-epoch SD over seeds is 1 point
    r = plateau(_climbing(0.03, {0: 0.20, 1: 0.21, 2: 0.22}, 3))
    assert (r["last_epoch"], r["back"], r["n_seeds"]) == (3, 1, 3)
    assert r["gain"] == pytest.approx(0.03) and r["seed_sd"] == pytest.approx(0.01)
    assert r["plateaued"] is False
    assert plateau_sentence("baseline", r) == (
        "baseline still improving: +3.0 AP over the last 1 of 3 epochs against a seed SD of 1.0; "
        "the verdict compares arms before they converged"
    )


def test_a_climb_within_the_seed_spread_is_a_plateau():
    r = plateau(_climbing(0.005, {0: 0.20, 1: 0.21, 2: 0.22}, 3))
    assert r["gain"] == pytest.approx(0.005) and r["plateaued"] is True
    assert (
        plateau_sentence("best", r)
        == "best plateaued: +0.5 AP over the last 1 of 3 epochs against a seed SD of 1.0"
    )


def test_the_gain_is_taken_a_quarter_of_the_schedule_back():
    # 12 epochs: 3 back; gains 0.01 per epoch up to epoch 9, then flat
    hist = {s: {e: 0.1 * s + 0.01 * min(e, 9) for e in range(1, 13)} for s in (1, 2)}
    r = plateau(hist)
    assert (r["last_epoch"], r["back"]) == (12, 3)
    assert r["gain"] == pytest.approx(0.0, abs=1e-12) and r["plateaued"] is True
    hist[1][12] += 0.2  # a late jump: mean gain 0.25; last epoch 0.39 and 0.59, SD 0.2 / sqrt(2)
    hist[2][12] += 0.3
    r = plateau(hist)
    assert r["gain"] == pytest.approx(0.25) and r["seed_sd"] == pytest.approx(0.2 / math.sqrt(2))
    assert r["plateaued"] is False
    hist[1][12] -= 0.2  # one seed jumps alone: gain 0.15 against an SD of 0.4 / sqrt(2), within the noise
    r = plateau(hist)
    assert r["gain"] == pytest.approx(0.15) and r["plateaued"] is True


def test_identical_seeds_that_stopped_moving_have_plateaued():
    r = plateau({0: {1: 0.2, 2: 0.3, 3: 0.3}, 1: {1: 0.2, 2: 0.3, 3: 0.3}})
    assert r["gain"] == 0.0 and r["seed_sd"] == 0.0 and r["plateaued"] is True


def test_the_epochs_compared_are_the_ones_every_seed_reached():
    # seed 1 stopped at epoch 2: judged at epoch 2 against epoch 1
    r = plateau({0: {1: 0.1, 2: 0.2, 3: 0.9}, 1: {1: 0.1, 2: 0.22}})
    assert (r["last_epoch"], r["back"]) == (2, 1) and r["gain"] == pytest.approx(0.11)


def test_a_lower_is_better_metric_gains_by_going_down():
    r = plateau({0: {1: 0.30, 2: 0.20}, 1: {1: 0.31, 2: 0.21}, 2: {1: 0.29, 2: 0.19}}, "aic")
    assert r["gain"] == pytest.approx(0.10) and r["plateaued"] is False


def test_unknown_with_one_epoch_or_one_seed():
    one_epoch = plateau({0: {1: 0.2}, 1: {1: 0.3}})
    assert one_epoch["plateaued"] is None and "no earlier epoch" in one_epoch["reason"]
    assert plateau_sentence("baseline", one_epoch) == (
        "baseline: convergence unknown (1 epoch: no earlier epoch to compare with)"
    )
    one_seed = plateau({0: {1: 0.2, 2: 0.3}, 1: {1: float("nan")}})
    assert (
        one_seed["plateaued"] is None and one_seed["n_seeds"] == 1 and "no seed spread" in one_seed["reason"]
    )
