"""From paired statistics to a verdict: which arm is better (only when the adjusted test and the
interval agree), per-metric tables' cells and notes, and the plain sentence a table ends with.

With a named primary metric (:func:`compare_metrics` ``primary=``) the primary is tested alone at
alpha and gets a four-way verdict (better, worse, equivalent within the margin, undecided); the
other metrics are secondary, Holm-corrected among themselves. When its seeds ran in rounds (a rule
with a target half-width) the primary's interval is the anytime-valid t-mixture confidence sequence
of :mod:`workers.evidence.sequential`, since the number of seeds was chosen by looking at the data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from workers.evidence.paired import (
    ALPHA,
    BOOTSTRAP_MIN_PAIRS,
    LOWER_IS_BETTER,
    NO_DIFFERENCE,
    TESTS,
    WILCOXON_MIN_PAIRS,
    EvidenceError,
    holm_adjust,
    paired_comparison,
    points_scale,
    wilcoxon_min_p,
)
from workers.evidence.sequential import (
    METHOD,
    Rule,
    anytime_p,
    confidence_sequence,
    fixed_verdict,
    verdict,
)

#: the interval of each ``ci_method`` in words.
INTERVALS = {
    "t": "t-interval",
    "wilcoxon-hl": "Hodges-Lehmann interval of the exact Wilcoxon test",
    METHOD: "t-mixture confidence sequence (valid whenever the seeds stopped)",
}
#: the estimate of each ``estimand`` in words.
ESTIMATES = {"mean": "mean difference", "pseudo-median": "Hodges-Lehmann pseudo-median difference"}


def level_text(confidence: float) -> str:
    """A confidence level in words: ``95%``, ``98.3%`` (alpha 0.05 over 3 arms)."""
    return f"{100 * confidence:.3g}%"


def decide(comp: Mapping[str, Any], alpha: float = ALPHA) -> str:
    """``"treatment"``, ``"baseline"`` or ``"unclear"`` for one metric of :func:`compare_metrics`.

    An arm is better only when the Holm-adjusted p is below ``alpha`` *and* the interval
    (``ci_low``, ``ci_high``) excludes 0; the sign of the interval and ``higher_is_better`` say
    which arm. A comparison without ``p_adjusted`` (an older summary) is ``"unclear"``.
    """
    p = float(comp.get("p_adjusted", float("nan")))
    lo = float(comp.get("ci_low", float("nan")))
    hi = float(comp.get("ci_high", float("nan")))
    if not (math.isfinite(p) and math.isfinite(lo) and math.isfinite(hi)) or p >= alpha or lo <= 0 <= hi:
        return "unclear"
    return "treatment" if (lo > 0) == bool(comp.get("higher_is_better", True)) else "baseline"


def compare_metrics(
    treatment: Mapping[Any, Mapping[str, float]],
    baseline: Mapping[Any, Mapping[str, float]],
    metrics: Sequence[str] = ("AP", "AP50", "AP75", "AP90", "aic"),
    *,
    n_boot: int = 10000,
    seed: int = 0,
    alpha: float = ALPHA,
    treatment_label: str = "HarmonicDet",
    baseline_label: str = "baseline",
    primary: str | None = None,
    rule: Rule | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`paired_comparison` for the metrics of one table, Holm-adjusted across them.

    Args:
        treatment (Mapping[seed, Mapping[metric, float]]): final metrics of each treatment seed.
        baseline (Mapping[seed, Mapping[metric, float]]): final metrics of each baseline seed.
        metrics (Sequence[str]): the metrics to compare; a metric without a seed measured in both
            arms is left out of the result and of the Holm family.
        n_boot (int): bootstrap resamples (used from ``BOOTSTRAP_MIN_PAIRS`` pairs).
        seed (int): bootstrap seed.
        alpha (float): significance level of the verdicts; the intervals are ``1 - alpha``
            (``rule.alpha`` when a rule is given).
        treatment_label, baseline_label (str): the arms' names in ``verdict``.
        primary (str | None): the metric named before the run: tested alone at alpha, with the
            four-way verdict; the others are ``secondary`` and form the Holm family. None: every
            metric in one Holm family.
        rule (Rule | None): the evidence plan (target and margin in table units: AP points). With
            a target half-width the seeds ran in rounds and the primary's interval is the t-mixture
            confidence sequence over the seeds in their order; without, the margin alone is used.

    Returns:
        dict: metric -> the :func:`paired_comparison` dict plus ``higher_is_better``,
        ``p_adjusted`` (Holm over the metrics with a test; the primary's own p), ``holm_k`` (the
        family's size), ``better`` (:func:`decide`: ``"treatment"``, ``"baseline"`` or
        ``"unclear"``) and ``verdict`` in plain words (``"<label> better"`` or ``"no detectable
        difference"``). With ``primary``: ``role`` (``primary`` / ``secondary``), and on the
        primary ``outcome`` (better, worse, equivalent, undecided), ``alpha``, ``margin``, ``mde``
        (smallest difference found with 80 % power at its n), ``seeds_to_decide`` and ``rule``.
    """
    if rule is not None:
        alpha = rule.alpha
    if not 0.0 < alpha < 1.0:
        raise EvidenceError(f"alpha: must be in (0, 1), got {alpha}")
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        t = {s: m[metric] for s, m in treatment.items() if metric in m}
        b = {s: m[metric] for s, m in baseline.items() if metric in m}
        try:
            comp = paired_comparison(t, b, n_boot=n_boot, seed=seed, confidence=1.0 - alpha)
        except EvidenceError:
            continue
        comp["higher_is_better"] = metric not in LOWER_IS_BETTER
        out[metric] = comp
    family = {m: c for m, c in out.items() if m != primary or primary is None}
    adjusted = holm_adjust({m: c["p_value"] for m, c in family.items()})
    k = sum(math.isfinite(p) for p in adjusted.values())
    labels = {"treatment": f"{treatment_label} better", "baseline": f"{baseline_label} better"}
    for metric, comp in family.items():
        comp["p_adjusted"] = adjusted[metric]
        comp["holm_k"] = k
        comp["better"] = decide(comp, alpha)
        comp["verdict"] = labels.get(comp["better"], NO_DIFFERENCE)
        if primary is not None:
            comp["role"] = "secondary"
    if primary is not None and primary in out:
        _judge_primary(out[primary], primary, rule or Rule(alpha=alpha), labels)
    return out


def _judge_primary(comp: dict[str, Any], metric: str, rule: Rule, labels: Mapping[str, str]) -> None:
    """The primary alone at ``rule.alpha``: its interval (the sequence when seeds ran in rounds),
    the four-way verdict, the minimum detectable effect, the seeds likely to decide it."""
    scale = points_scale(metric)
    # the rule's target and margin are in table units; the comparison's values are as measured
    raw = dataclasses.replace(
        rule,
        target_halfwidth=None if rule.target_halfwidth is None else rule.target_halfwidth / scale,
        margin=None if rule.margin is None else rule.margin / scale,
    )
    higher = bool(comp["higher_is_better"])
    seeds = sorted(comp["per_seed"], key=lambda s: (str(type(s)), s))
    diffs = [comp["per_seed"][s]["diff"] for s in seeds]
    n = len(diffs)
    sd = float(comp["std_diff"])
    if rule.target_halfwidth is not None:
        lo, hi = confidence_sequence(diffs, raw)
        v = verdict(diffs, raw, higher_is_better=higher)
        comp.update(
            test=METHOD,
            p_value=anytime_p(diffs, raw),
            ci_low=lo,
            ci_high=hi,
            ci95_low=lo,
            ci95_high=hi,
            ci_method=METHOD,
            ci_confidence=1 - rule.alpha,
            estimate=comp["mean_diff"],
            estimand="mean",
            note=f"t-mixture confidence sequence over {n} seeds in their order (anytime-valid)",
        )
    else:
        v = fixed_verdict(
            n,
            float(comp["estimate"]),
            float(comp["ci_low"]),
            float(comp["ci_high"]),
            sd,
            float(comp["p_value"]),
            raw,
            higher_is_better=higher,
            method=comp["ci_method"],
        )
    comp["role"] = "primary"
    comp["p_adjusted"] = comp["p_value"]
    comp["holm_k"] = 1 if math.isfinite(float(comp["p_value"])) else 0
    outcome = v.outcome if n >= 2 else "undecided"
    comp["outcome"] = outcome
    comp["better"] = {"better": "treatment", "worse": "baseline"}.get(outcome, "unclear")
    comp["alpha"] = rule.alpha
    comp["margin"] = v.margin
    comp["mde"] = v.mde if n >= 2 else math.inf
    comp["seeds_to_decide"] = v.seeds_to_decide
    comp["within_margin"] = v.within_margin
    comp["rule"] = dataclasses.asdict(rule)
    margin_text = f"equivalent within ±{_num(v.margin, scale)}" if v.margin is not None else ""
    words = {
        "better": labels["treatment"],
        "worse": labels["baseline"],
        "equivalent": margin_text,
        "undecided": "undecided",
    }
    comp["verdict"] = words[outcome]


def _num(v: float | None, scale: float = 1.0, sign: str = "") -> str:
    """A number in table units: points with 2 decimals, other metrics with 3 significant digits."""
    if v is None or not math.isfinite(v):
        return "-"
    x = scale * v
    return f"{x:{sign}.2f}" if scale != 1.0 and (x == 0 or abs(x) >= 0.01) else f"{x:{sign}.3g}"


def verdict_sentence(
    comparison: Mapping[str, Mapping[str, Any]],
    treatment_label: str = "HarmonicDet",
    baseline_label: str = "baseline",
    *,
    primary: str = "AP",
    alpha: float = ALPHA,
) -> str:
    """One plain sentence: what a table of :func:`compare_metrics` says about the primary metric.

    It says "no detectable difference" unless the primary metric's Holm-adjusted test and its
    interval both name an arm (:func:`decide`), and warns that the intervals are wide with fewer
    than ``WILCOXON_MIN_PAIRS`` seeds.
    """
    comp = comparison.get(primary)
    if comp is None:
        return f"No verdict: {primary} was not measured on a common seed in both arms."
    if comp.get("role") == "primary":
        return _primary_sentence(comp, primary, treatment_label, baseline_label)
    n = int(comp.get("n_pairs", len(comp.get("per_seed", {}))))
    better = decide(comp, alpha)
    ci = f"{level_text(float(comp.get('confidence', 1 - alpha)))} CI ({comp.get('ci_method', '?')})"
    p_adj = float(comp.get("p_adjusted", float("nan")))
    k = comp.get("holm_k", len(comparison))
    p_text = f"Holm-adjusted p = {p_adj:.3g} over {k} metrics" if math.isfinite(p_adj) else "no test possible"
    if better == "unclear":
        sentence = (
            f"On {primary}, {NO_DIFFERENCE} between {treatment_label} and {baseline_label} "
            f"({TESTS.get(comp.get('test', ''), comp.get('test', ''))} on {n} paired seeds, {p_text}"
        )
        lo, hi = float(comp.get("ci_low", float("nan"))), float(comp.get("ci_high", float("nan")))
        sentence += f"; the {ci} includes 0)." if lo <= 0 <= hi else ")."
    else:
        winner, loser = (
            (treatment_label, baseline_label) if better == "treatment" else (baseline_label, treatment_label)
        )
        sentence = (
            f"On {primary}, {winner} is better than {loser} "
            f"({TESTS.get(comp['test'], comp['test'])} on {n} paired seeds, {p_text}; the {ci} excludes 0)."
        )
    if n < WILCOXON_MIN_PAIRS:
        consequence = (
            "a real difference can go undetected" if better == "unclear" else "its size is poorly known"
        )
        sentence += (
            f" With only {n} seeds (fewer than {WILCOXON_MIN_PAIRS}) the intervals are wide: {consequence}, "
            "and the t-test assumes normally distributed seed differences."
        )
    return sentence


def _primary_sentence(comp: Mapping[str, Any], metric: str, treatment_label: str, baseline_label: str) -> str:
    """The verdict on a primary metric: the four-way outcome, the estimate and its interval by name,
    n, and when undecided the seeds likely to decide it and the smallest detectable difference."""
    scale = points_scale(metric)
    unit = " points" if scale != 1.0 else ""
    alpha = float(comp.get("alpha", ALPHA))
    n = int(comp.get("n_pairs", 0))
    outcome = str(comp.get("outcome", "undecided"))
    margin = comp.get("margin")
    level = level_text(1 - alpha)
    method = str(comp.get("ci_method", "none"))
    lo, hi = float(comp.get("ci_low", math.nan)), float(comp.get("ci_high", math.nan))
    estimate = ESTIMATES.get(str(comp.get("estimand", "mean")), "mean difference")
    est = f"{_num(float(comp.get('estimate', comp.get('mean_diff', math.nan))), scale, '+')}{unit}"
    if math.isfinite(lo) and math.isfinite(hi):
        interval = (
            f"{level} {INTERVALS.get(method, method)} [{_num(lo, scale, '+')}, {_num(hi, scale, '+')}]"
            f" on {n} paired seeds"
        )
    else:
        interval = f"no interval on {n} paired seed{'s' if n != 1 else ''}"
    p = float(comp.get("p_value", math.nan))
    p_name = "anytime-valid p" if method == METHOD else f"{TESTS.get(str(comp.get('test')), 'test')} p"
    p_text = f", {p_name} = {p:.3g}" if math.isfinite(p) else ""
    k = int(comp.get("family_k", 1) or 1)
    if k > 1:
        family_alpha = float(comp.get("family_alpha", alpha * k))
        head = (
            f"On {metric} (the primary metric, tested at alpha {family_alpha:g}/{k} = {alpha:.3g}: Bonferroni "
            f"over the {k} arms judged against the baseline)"
        )
    else:
        head = f"On {metric} (the primary metric, tested alone at alpha {alpha:g})"
    facts = f"{estimate} {est}, {interval}{p_text}"
    if outcome in ("better", "worse"):
        winner, loser = (
            (treatment_label, baseline_label) if outcome == "better" else (baseline_label, treatment_label)
        )
        sentence = f"{head}, {winner} is better than {loser}: {facts}; the interval excludes 0."
        if comp.get("within_margin") and margin is not None:
            sentence += (
                f" The whole interval lies inside ±{_num(margin, scale)}{unit}: real, but within the margin."
            )
    elif outcome == "equivalent":
        sentence = (
            f"{head}, {treatment_label} and {baseline_label} are equivalent within ±{_num(margin, scale)}{unit}: "
            f"{facts}; the interval lies inside the margin."
        )
    else:
        sentence = (
            f"{head}, undecided: {NO_DIFFERENCE} between {treatment_label} and {baseline_label}, and no "
            f"equivalence shown: {facts}."
        )
        sd = float(comp.get("std_diff", math.nan))
        more = comp.get("seeds_to_decide")
        if more is not None and math.isfinite(sd):
            sentence += f" About {more} seeds would likely decide it (observed SD {_num(sd, scale)}{unit})."
        elif math.isfinite(sd):
            sentence += " No practical number of seeds would decide it at the observed mean and SD"
            sentence += (
                "." if margin is not None else " (an equivalence margin would let it show equivalence)."
            )
    if float(comp.get("std_diff", math.nan)) == 0:
        sentence += (
            " Every seed gave the same difference, so the interval has no width: the seeds show no noise "
            "to judge against (a degenerate case the normal model does not describe)."
        )
    if math.isfinite(lo) and math.isfinite(hi):
        target = (comp.get("rule") or {}).get("target_halfwidth")
        asked = f" (target ±{_num(float(target) / scale, scale)}{unit})" if target is not None else ""
        sentence += f" Half-width reached: ±{_num((hi - lo) / 2, scale)}{unit}{asked}."
    mde = float(comp.get("mde", math.inf))
    if math.isfinite(mde):
        sentence += (
            f" The smallest difference this interval detects with 80% power at n = {n} is about "
            f"{_num(mde, scale)}{unit}."
        )
    if n < WILCOXON_MIN_PAIRS and method != METHOD:
        sentence += (
            f" With only {n} seeds (fewer than {WILCOXON_MIN_PAIRS}) the intervals are wide, and the t-test "
            "assumes normally distributed seed differences."
        )
    return sentence


def pairing_sentence(
    comp: Mapping[str, Any],
    metric: str,
    treatment_label: str = "HarmonicDet",
    baseline_label: str = "baseline",
) -> str:
    """What pairing by seed bought on one metric, in table units: e.g. ``"AP: SD baseline 1.90,
    HarmonicDet 2.10, of the paired differences 2.40, correlation +0.20; independent arms: 2.83"``
    (:func:`workers.evidence.paired.pairing_gain`); empty for a comparison without those values."""
    if "sd_diff" not in comp:
        return ""
    scale = points_scale(metric)
    r = comp.get("correlation")
    corr = f"correlation {float(r):+.2f}" if r is not None else "no correlation (under 3 seeds or no spread)"
    return (
        f"{metric}: SD {baseline_label} {_num(comp.get('sd_baseline'), scale)}, {treatment_label} "
        f"{_num(comp.get('sd_treatment'), scale)}, of the paired differences {_num(comp['sd_diff'], scale)}, "
        f"{corr}; independent arms: {_num(comp.get('sd_unpaired'), scale)}"
    )


def interval_header(comparison: Mapping[str, Mapping[str, Any]]) -> str:
    """The column title of a table's intervals, e.g. ``"95% CI (t)"``; without a method when the
    metrics of the table use different ones (then :func:`interval_cell` names it per cell)."""
    methods = {c.get("ci_method", "?") for c in comparison.values()} - {"none"}
    levels = {level_text(float(c.get("confidence", 0.95))) for c in comparison.values()}
    level = f"{levels.pop()} CI" if len(levels) == 1 else "CI"
    return f"{level} ({methods.pop()})" if len(methods) == 1 else level


def interval_cell(
    comparison: Mapping[str, Mapping[str, Any]], metric: str, scale: float = 1.0, digits: int = 3
) -> str:
    """``"[low, high]"`` of one metric in the table's units, ``"-"`` without an interval."""
    comp = comparison[metric]
    lo, hi = (
        float(comp.get("ci_low", comp.get("ci95_low", float("nan")))),
        float(comp.get("ci_high", comp.get("ci95_high", float("nan")))),
    )
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    cell = f"[{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"
    if "(" not in interval_header(comparison):
        cell += f" {comp.get('ci_method', '?')}"
    return cell


def method_note(comparison: Mapping[str, Mapping[str, Any]]) -> str:
    """The line under a table: which test and interval were used and why, and the Holm family."""
    if not comparison:
        return ""
    parts = []
    by_test: dict[str, list[int]] = {}
    for comp in comparison.values():
        by_test.setdefault(str(comp.get("test", "none")), []).append(int(comp.get("n_pairs", 0)))
    if "t" in by_test:
        n = min(by_test["t"])
        parts.append(
            f"paired t-test on {n} seeds with its t-interval (n < {WILCOXON_MIN_PAIRS}: the exact "
            f"Wilcoxon signed-rank test cannot give p below {wilcoxon_min_p(n):.4g} with {n} seeds "
            "whatever the data)"
        )
    if "wilcoxon" in by_test:
        n = min(by_test["wilcoxon"])
        parts.append(
            f"exact Wilcoxon signed-rank test on {n} seeds with its Hodges-Lehmann interval "
            f"(n >= {WILCOXON_MIN_PAIRS}: no normality assumed)"
        )
    if METHOD in by_test:
        n = min(by_test[METHOD])
        parts.append(
            f"t-mixture confidence sequence on {n} seeds run in rounds (Lai 1976, Wang & Ramdas 2023; "
            "anytime-valid, so the interval keeps its level whatever round the seeds stopped at), with "
            "its e-value's p"
        )
    if "none" in by_test:
        parts.append("no test with a single paired seed")
    roles = {str(c.get("role")): m for m, c in comparison.items() if c.get("role")}
    k = max((int(c.get("holm_k", 0)) for c in comparison.values() if c.get("role") != "primary"), default=0)
    note = "Test: " + "; ".join(parts) + "."
    if "primary" in roles:
        note += (
            f" The primary metric ({roles['primary']}) is tested alone; p adj of the {k} secondary metrics: "
            "Holm-adjusted among themselves."
        )
    else:
        note += f" p adj: Holm-adjusted over the {k} metrics of this table."
    if any(c.get("estimand") == "pseudo-median" for c in comparison.values()):
        note += (
            " diff: the estimate its interval is about (the mean difference beside a t-interval, the "
            "Hodges-Lehmann pseudo-median beside a Wilcoxon interval)."
        )
    if any(math.isfinite(float(c.get("boot_ci_low", float("nan")))) for c in comparison.values()):
        note += f" A studentised bootstrap interval is reported from {BOOTSTRAP_MIN_PAIRS} seeds only."
    k = max((int(c.get("family_k", 1) or 1) for c in comparison.values()), default=1)
    if k > 1:
        note += (
            f" This arm is one of {k} judged against the baseline: every test and interval of this table is at "
            f"alpha/{k} (Bonferroni), and its primary's p adj is min(1, {k} p)."
        )
    alpha = next((float(c["alpha"]) for c in comparison.values() if "alpha" in c), ALPHA)
    note += f" Verdict: an arm is named only when p adj < {alpha:g} and the interval excludes 0"
    if "primary" in roles:
        note += "; the primary is called equivalent when its interval lies inside ±margin, else undecided"
    return note + "."


def metric_cell(comparison: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """A row's metric name, marked when it is the table's primary metric."""
    return f"{metric} (primary)" if comparison[metric].get("role") == "primary" else metric


def arm_mean_sd(comp: Mapping[str, Any], arm: str) -> tuple[float, float]:
    """Mean and sample sd over the paired seeds of one arm (``"treatment"`` or ``"baseline"``) of a
    :func:`paired_comparison`: the very values the difference was computed from (same seeds, same
    split), so ``mean(treatment) - mean(baseline) == mean_diff``. The sd is NaN with one seed."""
    vals = np.array([float(v[arm]) for v in comp.get("per_seed", {}).values()], dtype=float)
    if vals.size == 0:
        return float("nan"), float("nan")
    return float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
