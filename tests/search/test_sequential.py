"""Seeds in rounds: the t-mixture confidence sequence, its stopping rule and verdicts, shown valid by
simulation (false verdicts <= alpha, coverage >= 1 - alpha) and shown to catch an invalid rule.

Simulated experiments have normal paired differences with SD 2.4 AP points, the demo's. Every
bound allows three Monte-Carlo standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from workers.evidence import compare_metrics
from workers.evidence.sequential import (
    METHOD,
    Rule,
    anytime_p,
    confidence_sequence,
    minimum_detectable_effect,
    seeds_to_decide,
    should_stop,
    simulate,
    verdict,
)

SD = 2.4
N_EXPERIMENTS = 4000
ALPHA = 0.05

#: every stopping rule an evidence section can describe: fixed seeds, rounds to a target, rounds
#: under a training budget, rounds with an equivalence margin wider than the target.
RULES = {
    "fixed 5 seeds": Rule(),
    "fixed 12 seeds, margin 2": Rule(min_seeds=12, margin=2.0),
    "rounds to +-1.5": Rule(target_halfwidth=1.5),
    "rounds to +-1.0, 40 trainings": Rule(target_halfwidth=1.0, max_trainings=40),
    "rounds of 4 to +-1.5, margin 2.5": Rule(target_halfwidth=1.5, round_size=4, margin=2.5, min_seeds=6),
}


def _mc(rate: float) -> float:
    return 3 * math.sqrt(rate * (1 - rate) / N_EXPERIMENTS)


@pytest.mark.parametrize("name", list(RULES))
def test_no_true_difference_gives_a_false_verdict_at_most_alpha_of_the_time(name: str):
    sim = simulate(SD, 0.0, RULES[name], N_EXPERIMENTS, np.random.default_rng(1))
    assert sim.false_verdict_rate <= ALPHA + _mc(ALPHA), sim
    assert sim.outcomes["better"] + sim.outcomes["worse"] <= ALPHA + _mc(ALPHA)


@pytest.mark.parametrize("true_diff", [0.0, 2.0])
@pytest.mark.parametrize("name", list(RULES))
def test_the_interval_covers_the_true_difference_at_the_stopping_seed(name: str, true_diff: float):
    sim = simulate(SD, true_diff, RULES[name], N_EXPERIMENTS, np.random.default_rng(2))
    assert sim.coverage >= 1 - ALPHA - _mc(ALPHA), sim


def test_a_t_interval_looked_at_after_every_round_is_wrong_more_often_than_alpha():
    """The simulation can fail a rule: the same rounds judged by a fixed-n t-interval are invalid."""
    rule = RULES["rounds to +-1.5"]
    naive = simulate(SD, 0.0, rule, N_EXPERIMENTS, np.random.default_rng(3), method="t")
    assert naive.false_verdict_rate > ALPHA + _mc(ALPHA), naive
    assert naive.coverage < 1 - ALPHA - _mc(ALPHA), naive
    peeking = simulate(
        SD, 0.0, rule, N_EXPERIMENTS, np.random.default_rng(3), method="t", stop_when_decided=True
    )
    assert peeking.false_verdict_rate > 2 * ALPHA, peeking
    # the sequence stays valid even when it too stops at the first decided look
    valid = simulate(SD, 0.0, rule, N_EXPERIMENTS, np.random.default_rng(3), stop_when_decided=True)
    assert valid.false_verdict_rate <= ALPHA + _mc(ALPHA), valid


def test_rounds_stop_at_the_target_and_a_true_difference_of_two_points_is_found():
    sim = simulate(SD, 2.0, RULES["rounds to +-1.5"], N_EXPERIMENTS, np.random.default_rng(4))
    assert sim.stop_reasons["target reached"] > 0.95
    assert 5 < sim.mean_seeds < 64 and sim.p90_seeds <= 64
    assert sim.outcomes["better"] > 0.8


def test_a_budget_caps_the_seeds():
    sim = simulate(SD, 0.0, RULES["rounds to +-1.0, 40 trainings"], 500, np.random.default_rng(5))
    assert sim.p90_seeds <= 20 and sim.stop_reasons["cap"] > 0.5


def _lai_log_e(d: np.ndarray, mu: float, c: float) -> float:
    """log M_n(mu) of the t-mixture written out: sqrt(c/(c+n)) (1 - S^2/((c+n) Q))^(-n/2)."""
    n, s, q = len(d), float((d - mu).sum()), float(((d - mu) ** 2).sum())
    return 0.5 * math.log(c / (c + n)) - 0.5 * n * math.log(1 - s**2 / ((c + n) * q))


def test_the_interval_is_where_the_mixture_stays_below_one_over_alpha():
    rule = Rule(target_halfwidth=1.0)
    c = rule.mixture_precision()
    d = np.random.default_rng(6).normal(0.7, SD, size=23)
    lo, hi = confidence_sequence(d, rule)
    for edge in (lo, hi):
        assert _lai_log_e(d, edge, c) == pytest.approx(math.log(1 / ALPHA), rel=1e-9)
    assert _lai_log_e(d, (lo + hi) / 2, c) < math.log(1 / ALPHA) < _lai_log_e(d, hi + 0.01, c)
    # the e-value at 0 is the test the interval inverts
    assert (anytime_p(d, rule) < ALPHA) == (not lo <= 0 <= hi)
    assert anytime_p(d, rule) == pytest.approx(min(1.0, math.exp(-_lai_log_e(d, 0.0, c))))
    # wider than the fixed-n t-interval: the price of looking after every round
    t_half = stats.t.ppf(0.975, 22) * d.std(ddof=1) / math.sqrt(23)
    assert (hi - lo) / 2 > t_half


def test_should_stop_names_why():
    rule = Rule(target_halfwidth=1.0, min_seeds=5, max_seeds=9, round_size=2)
    assert rule.looks() == [5, 7, 9]
    rng = np.random.default_rng(7)
    tight = rng.normal(0.0, 0.1, size=5)
    assert should_stop(tight, rule).stop and should_stop(tight, rule).reason == "target reached"
    wide = rng.normal(0.0, SD, size=5)
    d = should_stop(wide, rule)
    assert not d.stop and d.reason == "continue" and d.next_n == 7 and d.halfwidth > 1.0
    assert should_stop(rng.normal(0.0, SD, size=9), rule).reason == "max seeds"
    budget = Rule(target_halfwidth=1.0, min_seeds=5, max_seeds=64, max_trainings=16)
    assert budget.seed_cap == 8 and budget.looks() == [5, 7, 8]
    assert should_stop(rng.normal(0.0, SD, size=8), budget).reason == "budget"
    assert should_stop(tight[:3], rule).reason == "continue"  # the first round is min_seeds, even if tight


def test_four_verdicts_and_the_direction_of_a_lower_is_better_metric():
    rule = Rule(target_halfwidth=1.0, margin=1.0)
    rng = np.random.default_rng(8)
    noise = rng.normal(0.0, 1.0, size=40)
    noise = (noise - noise.mean()) / noise.std(ddof=1)
    up, down, flat = 3.0 + noise, -3.0 + noise, 0.1 * noise
    assert verdict(up, rule).outcome == "better" and verdict(down, rule).outcome == "worse"
    assert verdict(up, rule, higher_is_better=False).outcome == "worse"
    eq = verdict(flat, rule)
    assert eq.outcome == "equivalent" and -1.0 <= eq.low and eq.high <= 1.0
    undecided = verdict(0.5 + 2.0 * noise[:10], rule)
    assert undecided.outcome == "undecided" and undecided.low < 0 < undecided.high
    assert undecided.seeds_to_decide is not None and undecided.seeds_to_decide > 10
    small = verdict(0.5 + 0.05 * noise, rule)
    assert small.outcome == "better" and small.within_margin


def test_seeds_to_decide_is_the_first_n_whose_interval_would_decide():
    rule = Rule(target_halfwidth=1.0)
    n = seeds_to_decide(1.2, SD, rule)
    assert n is not None

    def h(k: int) -> float:
        d = np.array([-1.0, 1.0] * (k // 2) + [0.0] * (k % 2))
        d = d / d.std(ddof=1) * SD
        lo, hi = confidence_sequence(d, rule)
        return (hi - lo) / 2

    # decided at n: the interval excludes 0 (h < 1.2) or lies inside +-1 (h < 1 - 1.2: never)
    assert h(n) < 1.2 <= h(n - 1)
    assert seeds_to_decide(0.0, SD, Rule()) is None  # nothing to find and no margin to show


@pytest.mark.parametrize(("rule", "n"), [(Rule(target_halfwidth=1.0), 24), (Rule(min_seeds=10), 10)])
def test_the_minimum_detectable_effect_is_found_with_about_80_percent_power(rule: Rule, n: int):
    method = "t" if rule.target_halfwidth is None else "t-mixture"
    mde = minimum_detectable_effect(n, SD, rule, method)
    fixed = Rule(alpha=rule.alpha, min_seeds=n, margin=None) if method == "t" else Rule(
        alpha=rule.alpha, target_halfwidth=1e-9, min_seeds=n, max_seeds=n
    )  # fmt: skip
    sim = simulate(SD, mde, fixed, N_EXPERIMENTS, np.random.default_rng(9), method=method)
    assert sim.mean_seeds == n
    assert 0.8 - 0.05 <= sim.outcomes["better"] <= 0.8 + 0.05, (mde, sim)


def _arms(diffs: list[float], secondary: list[float]) -> tuple[dict, dict]:
    baseline = {s: {"AP": 0.30 + 0.001 * s, "AP50": 0.5, "aic": 0.2} for s in range(len(diffs))}
    treatment = {
        s: {"AP": baseline[s]["AP"] + d, "AP50": 0.5 + e, "aic": 0.2 + e / 10}
        for s, (d, e) in enumerate(zip(diffs, secondary, strict=True))
    }
    return treatment, baseline


def test_the_primary_is_tested_alone_and_the_secondaries_are_holm_among_themselves():
    rng = np.random.default_rng(10)
    diffs = list(0.004 + 0.01 * rng.normal(size=4))
    treatment, baseline = _arms(diffs, [0.01, 0.012, 0.02, 0.015])
    comp = compare_metrics(treatment, baseline, ("AP", "AP50", "aic"), primary="AP")
    ap = comp["AP"]
    assert ap["role"] == "primary" and ap["p_adjusted"] == ap["p_value"] == pytest.approx(
        stats.ttest_1samp(diffs, 0.0).pvalue
    )
    assert {comp["AP50"]["role"], comp["aic"]["role"]} == {"secondary"}
    assert comp["AP50"]["holm_k"] == comp["aic"]["holm_k"] == 2
    raw = [comp[m]["p_value"] for m in ("AP50", "aic")]
    assert max(comp[m]["p_adjusted"] for m in ("AP50", "aic")) == pytest.approx(max(min(raw) * 2, max(raw)))
    assert ap["outcome"] in {"better", "worse", "equivalent", "undecided"}
    assert ap["estimate"] == pytest.approx(np.mean(diffs)) and ap["estimand"] == "mean"


def test_a_row_prints_the_estimate_its_interval_is_about():
    rng = np.random.default_rng(11)
    diffs = list(0.01 + 0.02 * rng.standard_exponential(size=9))
    treatment, baseline = _arms(diffs, [0.0] * 9)
    ap = compare_metrics(treatment, baseline, ("AP",))["AP"]
    d = np.array(diffs)
    walsh = [(d[i] + d[j]) / 2 for i in range(9) for j in range(i, 9)]
    assert ap["ci_method"] == "wilcoxon-hl" and ap["estimand"] == "pseudo-median"
    assert ap["estimate"] == pytest.approx(np.median(walsh)) != pytest.approx(d.mean())


def test_seeds_in_rounds_judge_the_primary_with_the_sequence_in_ap_points():
    rng = np.random.default_rng(12)
    diffs = list(0.02 + 0.024 * rng.normal(size=30))
    treatment, baseline = _arms(diffs, [0.0] * 30)
    rule = Rule(target_halfwidth=1.5)
    comp = compare_metrics(treatment, baseline, ("AP", "AP50"), primary="AP", rule=rule)
    ap = comp["AP"]
    lo, hi = confidence_sequence(100 * np.array(diffs), rule)  # target in points: so is the interval
    assert ap["ci_method"] == ap["test"] == METHOD
    assert (100 * ap["ci_low"], 100 * ap["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert ap["outcome"] == ("better" if lo > 0 else "undecided")
    assert comp["AP50"]["role"] == "secondary" and comp["AP50"]["ci_method"] != METHOD


def test_the_verdict_sentence_names_the_primary_n_the_method_and_the_interval():
    from workers.evidence import verdict_sentence

    rng = np.random.default_rng(13)
    diffs = list(0.03 + 0.024 * rng.normal(size=30))
    treatment, baseline = _arms(diffs, [0.0] * 30)
    comp = compare_metrics(treatment, baseline, ("AP", "AP50"), primary="AP", rule=Rule(target_halfwidth=1.5))
    sentence = verdict_sentence(comp, "HarmonicDet", "the baseline", primary="AP")
    assert sentence.startswith(
        "On AP (the primary metric, tested alone at alpha 0.05), HarmonicDet is better"
    )
    assert "30 paired seeds" in sentence and "t-mixture confidence sequence" in sentence
    assert f"[{100 * comp['AP']['ci_low']:+.2f}, {100 * comp['AP']['ci_high']:+.2f}]" in sentence
    assert "80% power" in sentence
    half = 100 * (comp["AP"]["ci_high"] - comp["AP"]["ci_low"]) / 2
    assert f"Half-width reached: ±{half:.2f} points (target ±1.50 points)." in sentence
    noisy = list(0.002 + 0.024 * rng.normal(size=7))
    treatment, baseline = _arms(noisy, [0.0] * 7)
    comp = compare_metrics(treatment, baseline, ("AP",), primary="AP", rule=Rule(margin=1.0))
    sentence = verdict_sentence(comp, "HarmonicDet", "the baseline", primary="AP")
    assert "undecided" in sentence and "seeds would likely decide it" in sentence
    assert "Hodges-Lehmann" in sentence and "7 paired seeds" in sentence
