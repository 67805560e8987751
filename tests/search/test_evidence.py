"""Paired statistics and sensitivity on hand-built numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.evidence import (
    EvidenceError,
    aggregate_seeds,
    compare_metrics,
    paired_comparison,
    pairing_gain,
    pairing_sentence,
    sensitivity,
    wilcoxon_min_p,
)


def test_mean_difference_and_per_seed_pairs_by_seed_not_by_order():
    treatment = {2: 31.0, 0: 30.0, 1: 32.0}
    baseline = {0: 29.0, 1: 30.5, 2: 30.0}
    r = paired_comparison(treatment, baseline, n_boot=2000)
    assert r["n_pairs"] == 3
    assert r["per_seed"][2]["diff"] == pytest.approx(1.0)
    assert r["mean_diff"] == pytest.approx((1.0 + 1.5 + 1.0) / 3)
    assert r["wins"] == 3
    assert r["ci95_low"] < r["mean_diff"] < r["ci95_high"]
    # below 6 pairs the interval used (and shown under the old key) is the t-interval
    assert (r["ci95_low"], r["ci95_high"]) == (r["t_ci95_low"], r["t_ci95_high"])
    assert (r["ci_low"], r["ci_high"], r["ci_method"]) == (r["t_ci95_low"], r["t_ci95_high"], "t")


def test_three_seeds_use_t_test_and_say_wilcoxon_cannot_reach_significance():
    # a large, consistent effect: t says significant, exact Wilcoxon cannot go below 0.25
    r = paired_comparison({0: 10.0, 1: 11.0, 2: 12.0}, {0: 5.0, 1: 5.9, 2: 7.1})
    assert r["test"] == "t"
    assert r["wilcoxon_p"] == pytest.approx(0.25)
    assert r["wilcoxon_min_p"] == pytest.approx(0.25)
    assert r["p_value"] == r["t_p"] < 0.01
    assert "0.25" in r["note"] and "t-test" in r["note"]


def test_six_seeds_use_wilcoxon():
    t = {s: 10.0 + s for s in range(6)}
    b = {s: 9.0 + s - 0.1 * s for s in range(6)}
    r = paired_comparison(t, b)
    assert r["test"] == "wilcoxon"
    assert r["p_value"] == pytest.approx(2 / 2**6)
    assert wilcoxon_min_p(6) == pytest.approx(0.03125)


def test_direction_of_the_difference():
    # 4 noisy pairs, all worse: the old percentile bootstrap ([min d, max d]) excluded 0, the honest
    # t-interval does not
    noisy = paired_comparison({0: 1.0, 1: 2.0, 2: 3.0, 3: 2.5}, {0: 2.0, 1: 3.5, 2: 3.2, 3: 3.0})
    assert noisy["mean_diff"] < 0 and noisy["wins"] == 0
    assert noisy["ci95_low"] < 0 < noisy["ci95_high"] and noisy["p_value"] > 0.05
    worse = paired_comparison({0: 1.0, 1: 2.0, 2: 3.0, 3: 2.5}, {0: 2.0, 1: 3.1, 2: 3.9, 3: 3.6})
    assert worse["mean_diff"] < 0 and worse["ci95_high"] < 0 and worse["wins"] == 0
    comp = compare_metrics(
        {s: {"AP": 40.0 + s, "aic": 0.20} for s in range(4)},
        {s: {"AP": 38.0 + s + 0.1 * s, "aic": 0.30 + 0.01 * s} for s in range(4)},
        metrics=("AP", "aic", "AP90"),
    )
    assert comp["AP"]["better"] == "treatment"
    assert comp["aic"]["higher_is_better"] is False and comp["aic"]["better"] == "treatment"
    assert "AP90" not in comp  # missing metric is left out, not an error


def test_no_effect_gives_large_p_and_interval_around_zero():
    rng = np.random.default_rng(3)
    b = {s: float(v) for s, v in enumerate(rng.normal(30, 1, size=8))}
    t = {s: v + float(e) for (s, v), e in zip(b.items(), [0.2, -0.1, 0.15, -0.2, 0.05, -0.05, 0.1, -0.15])}
    r = paired_comparison(t, b)
    assert r["test"] == "wilcoxon"
    assert r["p_value"] > 0.5
    assert r["ci95_low"] < 0 < r["ci95_high"]


def test_interval_coverage_is_nominal_for_t_hodges_lehmann_and_bootstrap_t():
    # 300 simulated experiments with 10 seeds and true effect 1.0 (seed noise sd 2)
    rng = np.random.default_rng(0)
    cover_t = cover_hl = cover_b = 0
    n_exp = 300
    for i in range(n_exp):
        base = rng.normal(30, 3, size=10)
        treat = base + 1.0 + rng.normal(0, 2, size=10)
        r = paired_comparison(dict(enumerate(treat)), dict(enumerate(base)), n_boot=1000, seed=i)
        assert r["ci_method"] == "wilcoxon-hl" and r["boot_method"] == "bootstrap-t"
        cover_t += r["t_ci95_low"] <= 1.0 <= r["t_ci95_high"]
        cover_hl += r["ci95_low"] <= 1.0 <= r["ci95_high"]
        cover_b += r["boot_ci_low"] <= 1.0 <= r["boot_ci_high"]
    assert 0.91 <= cover_t / n_exp <= 0.985
    assert 0.91 <= cover_hl / n_exp <= 0.99  # exact, so at least nominal up to simulation noise
    assert 0.91 <= cover_b / n_exp <= 0.985


def test_three_seed_interval_covers_the_null_as_promised_unlike_min_max():
    # the old percentile bootstrap was [min d, max d] with 3 seeds: coverage 1 - 2/2**3 = 0.75
    rng = np.random.default_rng(1)
    n_exp = 1000
    cover = cover_min_max = 0
    for _ in range(n_exp):
        d = rng.normal(0.0, 1.0, size=3)
        r = paired_comparison(dict(enumerate(d)), dict.fromkeys(range(3), 0.0))
        cover += r["ci_low"] <= 0.0 <= r["ci_high"]
        cover_min_max += d.min() <= 0.0 <= d.max()
    assert 0.93 <= cover / n_exp <= 0.97
    assert 0.70 <= cover_min_max / n_exp <= 0.80


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    t = {s: float(v) for s, v in enumerate(rng.normal(1.0, 1.0, size=12))}
    b = dict.fromkeys(t, 0.0)
    first, again = paired_comparison(t, b, seed=5), paired_comparison(t, b, seed=5)
    assert math.isfinite(first["boot_ci_low"])
    assert (first["boot_ci_low"], first["boot_ci_high"]) == (again["boot_ci_low"], again["boot_ci_high"])
    assert first["boot_ci_low"] != paired_comparison(t, b, seed=6)["boot_ci_low"]


def test_unpaired_and_non_finite_seeds_are_dropped():
    r = paired_comparison({0: 1.0, 1: float("nan"), 2: 3.0, 3: 1.0}, {0: 0.0, 1: 1.0, 2: 1.0})
    assert r["n_pairs"] == 2
    assert r["unpaired_seeds"] == ["1", "3"]


def test_single_pair_has_no_interval():
    r = paired_comparison({0: 2.0}, {0: 1.0})
    assert r["mean_diff"] == 1.0 and math.isnan(r["p_value"]) and math.isnan(r["ci95_low"])
    assert r["test"] == "none" and r["ci_method"] == "none" and math.isnan(r["ci_low"])


def test_identical_differences_are_handled():
    r = paired_comparison({0: 2.0, 1: 3.0, 2: 4.0}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert r["mean_diff"] == 0 and r["p_value"] == 1.0 and r["wilcoxon_p"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"treatment": {0: 1.0}, "baseline": {1: 1.0}}, "no seed has a value in both arms"),
        ({"treatment": {0: float("nan")}, "baseline": {0: 1.0}}, "treatment: no finite values"),
        ({"treatment": {0: 1.0}, "baseline": {0: 1.0}, "n_boot": 0}, "n_boot"),
        ({"treatment": {0: 1.0}, "baseline": {0: 1.0}, "confidence": 1.5}, "confidence"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs, message):
    with pytest.raises(EvidenceError, match=message):
        paired_comparison(**kwargs)


def test_aggregate_seeds_mean_and_sample_std():
    agg = aggregate_seeds({0: {"AP": 10.0, "done": True, "name": "x"}, 1: {"AP": 12.0}, 2: {"AP": 14.0}})
    assert agg["AP"] == {"mean": 12.0, "std": 2.0, "n": 3.0}
    assert "done" not in agg and "name" not in agg
    assert aggregate_seeds({0: {"AP": 3.0}})["AP"]["std"] == 0.0


def test_sensitivity_share_within_and_correlation():
    configs = [
        {"params": {"loss.alpha": 0.5, "loss.gamma": 0.1, "loss.margin": 0.2}, "objective": 30.0},
        {"params": {"loss.alpha": 1.0, "loss.gamma": 0.5, "loss.margin": 0.2}, "objective": 31.0},
        {"params": {"loss.alpha": 1.5, "loss.gamma": 0.9, "loss.margin": 0.2}, "objective": 31.8},
        {"params": {"loss.alpha": 2.0, "loss.gamma": 0.3, "loss.margin": 0.2}, "objective": 32.0},
        {"params": {"loss.alpha": 2.5, "loss.gamma": 0.7, "loss.margin": 0.2}, "objective": None},
    ]
    s = sensitivity(configs, tolerance=0.5)
    assert s["best"] == 32.0 and s["n_configs"] == 4 and s["n_failed"] == 1
    assert s["n_within"] == 2 and s["share_within"] == pytest.approx(0.5)
    assert s["params"]["alpha"]["spearman"] == pytest.approx(1.0)
    assert s["params"]["alpha"]["values"] == [0.5, 1.0, 1.5, 2.0]
    assert math.isnan(s["params"]["margin"]["spearman"])  # constant parameter


def test_sensitivity_of_nothing():
    s = sensitivity([{"params": {"alpha": 1.0}, "objective": float("nan")}])
    assert s["n_configs"] == 0 and s["n_failed"] == 1 and math.isnan(s["share_within"])
    with pytest.raises(EvidenceError, match="tolerance"):
        sensitivity([], tolerance=-1)


def test_identical_arms_shifted_by_a_constant_leave_differences_without_spread():
    baseline = {0: 0.30, 1: 0.32, 2: 0.35, 3: 0.31}
    treatment = {s: v + 0.05 for s, v in baseline.items()}
    r = paired_comparison(treatment, baseline)
    sd = float(np.std(list(baseline.values()), ddof=1))
    assert r["sd_treatment"] == pytest.approx(sd) and r["sd_baseline"] == pytest.approx(sd)
    assert r["sd_diff"] == pytest.approx(0.0, abs=1e-12) and r["sd_diff"] == pytest.approx(r["std_diff"])
    assert r["correlation"] == pytest.approx(1.0)
    assert r["sd_unpaired"] == pytest.approx(math.sqrt(2) * sd)


def test_mirrored_arms_are_perfectly_anticorrelated_and_double_the_spread():
    baseline = {0: 0.30, 1: 0.32, 2: 0.35}
    treatment = {s: 0.70 - v for s, v in baseline.items()}
    r = pairing_gain([treatment[s] for s in (0, 1, 2)], [baseline[s] for s in (0, 1, 2)])
    sd = float(np.std(list(baseline.values()), ddof=1))
    assert r["correlation"] == pytest.approx(-1.0)
    assert r["sd_diff"] == pytest.approx(2 * sd)


def test_the_variance_of_the_differences_follows_from_the_arms_and_their_correlation():
    rng = np.random.default_rng(3)
    shared = rng.normal(0.3, 0.02, 8)
    t, b = shared + rng.normal(0.01, 0.01, 8), shared + rng.normal(0.0, 0.01, 8)
    r = pairing_gain(t, b)
    assert r["correlation"] == pytest.approx(float(np.corrcoef(t, b)[0, 1]))
    var = (
        r["sd_treatment"] ** 2
        + r["sd_baseline"] ** 2
        - 2 * r["correlation"] * r["sd_treatment"] * r["sd_baseline"]
    )
    assert r["sd_diff"] ** 2 == pytest.approx(var)
    assert r["sd_diff"] < r["sd_unpaired"]  # the shared seed effect is what pairing removes


def test_no_correlation_with_two_seeds_or_an_arm_without_spread():
    assert pairing_gain([0.3, 0.4], [0.2, 0.25])["correlation"] is None
    flat = pairing_gain([0.3, 0.3, 0.3], [0.2, 0.25, 0.21])
    assert flat["correlation"] is None and flat["sd_treatment"] == 0.0
    one = paired_comparison({0: 0.3}, {0: 0.2})
    assert one["correlation"] is None and math.isnan(one["sd_diff"])
    with pytest.raises(EvidenceError):
        pairing_gain([0.3, 0.4], [0.2])


def test_every_compared_metric_says_what_the_pairing_bought_in_table_units():
    baseline = {0: {"AP": 0.30}, 1: {"AP": 0.32}, 2: {"AP": 0.35}}
    treatment = {s: {"AP": m["AP"] + 0.01} for s, m in baseline.items()}
    comp = compare_metrics(treatment, baseline, ("AP",))["AP"]
    assert comp["correlation"] == pytest.approx(1.0) and comp["sd_diff"] == pytest.approx(0.0, abs=1e-12)
    assert pairing_sentence(comp, "AP", "HarmonicDet (best)") == (
        "AP: SD baseline 2.52, HarmonicDet (best) 2.52, of the paired differences 0.00, correlation +1.00; "
        "independent arms: 3.56"
    )
    assert pairing_sentence({"mean_diff": 0.1}, "AP") == ""  # a comparison from before these values
