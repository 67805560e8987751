"""The honest-statistics rule: which test and interval for how many seeds, Holm across a table, verdicts.

Every expected number is computed independently here with scipy or by enumeration, never read back
from the module under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from workers.evidence import (
    BOOTSTRAP_MIN_PAIRS,
    NO_DIFFERENCE,
    compare_metrics,
    hodges_lehmann_interval,
    holm_adjust,
    interval_cell,
    interval_header,
    method_note,
    paired_comparison,
    verdict_sentence,
)


def _arms(diffs: dict[str, list[float]], base: float = 0.30) -> tuple[dict, dict]:
    """Per-seed metrics of two arms whose paired differences are ``diffs[metric]``."""
    n = len(next(iter(diffs.values())))
    baseline = {s: {m: base + 0.01 * s for m in diffs} for s in range(n)}
    treatment = {s: {m: baseline[s][m] + d[s] for m, d in diffs.items()} for s in range(n)}
    return treatment, baseline


def _t_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    half = stats.t.ppf(1 - (1 - confidence) / 2, df=len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def test_three_seeds_whose_t_test_is_not_significant_are_no_detectable_difference():
    diffs = [0.010, 0.012, -0.004]
    assert stats.ttest_1samp(diffs, 0.0).pvalue > 0.05
    treatment, baseline = _arms({"AP": diffs})
    comp = compare_metrics(treatment, baseline, metrics=("AP",))["AP"]
    assert comp["test"] == "t" and comp["n_pairs"] == 3
    assert comp["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    assert comp["better"] == "unclear"
    assert comp["verdict"] == NO_DIFFERENCE == "no detectable difference"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_eight_consistent_seeds_name_the_winning_arm_in_either_direction(sign: float):
    up = [0.011, 0.013, 0.008, 0.020, 0.015, 0.009, 0.017, 0.012]
    treatment, baseline = _arms({"AP": [sign * d for d in up], "AP50": [sign * d for d in up], "aic": up})
    comp = compare_metrics(treatment, baseline, metrics=("AP", "AP50", "aic"))
    # exact Wilcoxon: all 8 of one sign gives p = 2 / 2**8; Holm over 3 equal p-values multiplies by 3
    assert comp["AP"]["test"] == "wilcoxon" and comp["AP"]["ci_method"] == "wilcoxon-hl"
    assert comp["AP"]["p_value"] == pytest.approx(2 / 2**8)
    assert comp["AP"]["p_adjusted"] == pytest.approx(3 * 2 / 2**8)
    winner = "treatment" if sign > 0 else "baseline"
    assert comp["AP"]["better"] == comp["AP50"]["better"] == winner
    assert comp["AP"]["verdict"] == ("HarmonicDet better" if sign > 0 else "baseline better")
    # aic is lower-is-better: the treatment's higher AIC makes the baseline better
    assert comp["aic"]["higher_is_better"] is False
    assert comp["aic"]["better"] == "baseline" and comp["aic"]["verdict"] == "baseline better"


def test_lower_aic_makes_the_treatment_better():
    down = [-0.02, -0.03, -0.025, -0.01, -0.035, -0.015, -0.04]
    treatment, baseline = _arms({"aic": down}, base=0.25)
    comp = compare_metrics(treatment, baseline, metrics=("aic",), treatment_label="HD", baseline_label="std")
    assert comp["aic"]["ci_high"] < 0
    assert comp["aic"]["better"] == "treatment" and comp["aic"]["verdict"] == "HD better"


def test_holm_turns_a_raw_p_below_005_into_unclear():
    strong, noise = [0.010, 0.014, 0.021], [0.001, -0.001, 0.0005]
    raw = stats.ttest_1samp(strong, 0.0).pvalue
    assert 0.025 < raw < 0.05  # significant alone, not after doubling
    treatment, baseline = _arms({"AP": strong, "AP50": noise})
    alone = compare_metrics(treatment, baseline, metrics=("AP",))["AP"]
    assert alone["better"] == "treatment" and alone["p_adjusted"] == pytest.approx(raw)
    comp = compare_metrics(treatment, baseline, metrics=("AP", "AP50"))
    ap = comp["AP"]
    assert ap["p_value"] == pytest.approx(raw) and ap["p_value"] < 0.05
    assert ap["p_adjusted"] == pytest.approx(2 * raw) and ap["p_adjusted"] >= 0.05
    assert ap["ci_low"] > 0  # the interval alone would still say "better"
    assert ap["holm_k"] == 2
    assert ap["better"] == "unclear" and ap["verdict"] == NO_DIFFERENCE


def test_holm_adjusted_p_values_by_hand():
    adj = holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    # sorted 0.01, 0.03, 0.04 over k = 3: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert adj["a"] == pytest.approx(0.03)
    assert adj["c"] == pytest.approx(0.06)
    assert adj["b"] == pytest.approx(0.06)
    assert math.isnan(adj["d"])
    assert holm_adjust({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_a_metric_missing_from_one_arm_is_out_of_the_table_and_the_holm_family():
    strong = [0.010, 0.014, 0.021]
    treatment, baseline = _arms({"AP": strong, "AP90": [0.0, 0.0, 0.0]})
    for metrics in baseline.values():
        del metrics["AP90"]
    comp = compare_metrics(treatment, baseline, metrics=("AP", "AP90", "AP75"))
    assert list(comp) == ["AP"]
    assert comp["AP"]["holm_k"] == 1 and comp["AP"]["p_adjusted"] == pytest.approx(comp["AP"]["p_value"])


def test_three_seed_interval_is_the_scipy_t_interval_not_min_max():
    d = np.array([0.010, 0.015, 0.035])
    r = paired_comparison(dict(enumerate(d)), dict.fromkeys(range(3), 0.0))
    low, high = _t_interval(d)
    assert r["ci_method"] == "t"
    assert r["ci_low"] == pytest.approx(low) and r["ci_high"] == pytest.approx(high)
    assert (r["ci95_low"], r["ci95_high"]) == (r["ci_low"], r["ci_high"])
    assert r["ci_low"] < d.min() and r["ci_high"] > d.max()  # wider than [min d, max d]
    assert r["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)


def test_six_seeds_use_the_walsh_average_interval_of_the_exact_wilcoxon_test():
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.7, 0.4])
    r = paired_comparison(dict(enumerate(d)), dict.fromkeys(range(6), 0.0))
    # with 6 pairs P(T+ <= 0) = 1/64 <= 0.025 < P(T+ <= 1): the interval is [min, max] of Walsh averages
    assert r["test"] == "wilcoxon" and r["ci_method"] == "wilcoxon-hl"
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(d.min()), pytest.approx(d.max()))
    assert r["ci_confidence"] == pytest.approx(1 - 2 / 64)
    walsh = [(d[i] + d[j]) / 2 for i in range(6) for j in range(i, 6)]
    assert r["hl_estimate"] == pytest.approx(np.median(walsh))
    assert r["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue)


def test_hodges_lehmann_interval_matches_enumeration_and_agrees_with_the_test():
    rng = np.random.default_rng(11)
    for n in (7, 9, 12):
        for _ in range(20):
            d = rng.normal(0.5, 1.0, size=n)
            low, high, _, level = hodges_lehmann_interval(d)
            # the exact null of T+ by enumerating every sign pattern of the ranks
            sums = np.array(
                [sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s)
                 for signs in itertools.product((0, 1), repeat=n)]
            )  # fmt: skip
            k = max(t for t in range(sums.max() + 1) if (sums <= t).mean() <= 0.025)
            walsh = np.sort([(d[i] + d[j]) / 2 for i in range(n) for j in range(i, n)])
            assert (low, high) == (pytest.approx(walsh[k]), pytest.approx(walsh[-1 - k]))
            assert level == pytest.approx(1 - 2 * (sums <= k).mean())
            assert (stats.wilcoxon(d).pvalue < 0.05) == (not low <= 0 <= high)


@pytest.mark.parametrize("n", [2, 3, 6, 9, 10, 16])
def test_bootstrap_fields_appear_only_from_ten_pairs_and_contain_the_mean(n: int):
    rng = np.random.default_rng(n)
    d = rng.normal(0.02, 0.01, size=n)
    r = paired_comparison(dict(enumerate(d)), dict.fromkeys(range(n), 0.0), n_boot=2000)
    assert r["ci_method"] in {"t", "wilcoxon-hl"}  # the bootstrap is never the interval used
    if n < BOOTSTRAP_MIN_PAIRS:
        assert math.isnan(r["boot_ci_low"]) and math.isnan(r["boot_ci_high"]) and r["boot_method"] is None
    else:
        assert r["boot_method"] == "bootstrap-t"
        assert r["boot_ci_low"] < d.mean() < r["boot_ci_high"]
        assert (r["boot_ci_low"], r["boot_ci_high"]) != (r["ci_low"], r["ci_high"])


def test_verdict_sentence_says_no_detectable_difference_and_warns_about_few_seeds():
    treatment, baseline = _arms({"AP": [0.010, 0.012, -0.004], "AP50": [0.02, 0.01, 0.03]})
    comp = compare_metrics(treatment, baseline, metrics=("AP", "AP50"))
    sentence = verdict_sentence(comp, "HarmonicDet", "the baseline", primary="AP")
    assert NO_DIFFERENCE in sentence and "HarmonicDet" in sentence
    assert "3 seeds" in sentence and "wide" in sentence
    assert "Holm-adjusted p" in sentence and "over 2 metrics" in sentence
    assert "No verdict" in verdict_sentence(comp, primary="AP90")


def test_verdict_sentence_names_the_winner_only_when_test_and_interval_agree():
    up = [0.011, 0.013, 0.008, 0.020, 0.015, 0.009, 0.017, 0.012]
    treatment, baseline = _arms({"AP": up})
    comp = compare_metrics(treatment, baseline, metrics=("AP",))
    sentence = verdict_sentence(comp, "HarmonicDet", "the baseline")
    assert sentence.startswith("On AP, HarmonicDet is better than the baseline")
    assert NO_DIFFERENCE not in sentence and "wide" not in sentence
    # an interval that includes 0 overrides a small p (e.g. a hand-edited or inconsistent record)
    comp["AP"]["ci_low"] = -0.001
    assert NO_DIFFERENCE in verdict_sentence(comp, "HarmonicDet", "the baseline")


def test_a_table_mixing_t_and_wilcoxon_names_the_method_in_each_cell_and_explains_both():
    up = [0.011, 0.013, 0.008, 0.020, 0.015, 0.009, 0.017, 0.012]
    treatment, baseline = _arms({"AP": up, "AP50": up})
    for seed in range(3, 8):  # AP50 measured on 3 seeds only
        del treatment[seed]["AP50"]
    comp = compare_metrics(treatment, baseline, metrics=("AP", "AP50"))
    assert (comp["AP"]["test"], comp["AP50"]["test"]) == ("wilcoxon", "t")
    assert interval_header(comp) == "95% CI"
    assert interval_cell(comp, "AP", 100.0, 1).endswith(" wilcoxon-hl")
    assert interval_cell(comp, "AP50", 100.0, 1).endswith(" t")
    note = method_note(comp)
    assert "paired t-test on 3 seeds" in note and "exact Wilcoxon signed-rank test on 8 seeds" in note
    assert "Holm-adjusted over the 2 metrics" in note
    single = compare_metrics({0: {"AP": 0.3}}, {0: {"AP": 0.2}}, metrics=("AP",))
    assert single["AP"]["holm_k"] == 0 and math.isnan(single["AP"]["p_adjusted"])
    assert single["AP"]["verdict"] == NO_DIFFERENCE and interval_cell(single, "AP") == "-"
