"""From paired statistics to a verdict: which arm is better (only when the adjusted test and the
interval agree), per-metric tables' cells and notes, and the plain sentence a table ends with.
"""

from __future__ import annotations

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
    wilcoxon_min_p,
)


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
) -> dict[str, dict[str, Any]]:
    """:func:`paired_comparison` for the metrics of one table, Holm-adjusted across them.

    Args:
        treatment (Mapping[seed, Mapping[metric, float]]): final metrics of each treatment seed.
        baseline (Mapping[seed, Mapping[metric, float]]): final metrics of each baseline seed.
        metrics (Sequence[str]): the metrics to compare; a metric without a seed measured in both
            arms is left out of the result and of the Holm family.
        n_boot (int): bootstrap resamples (used from ``BOOTSTRAP_MIN_PAIRS`` pairs).
        seed (int): bootstrap seed.
        alpha (float): significance level of the verdicts; the intervals are ``1 - alpha``.
        treatment_label, baseline_label (str): the arms' names in ``verdict``.

    Returns:
        dict: metric -> the :func:`paired_comparison` dict plus ``higher_is_better``,
        ``p_adjusted`` (Holm over the metrics with a test), ``holm_k`` (their number),
        ``better`` (:func:`decide`: ``"treatment"``, ``"baseline"`` or ``"unclear"``) and
        ``verdict`` in plain words (``"<label> better"`` or ``"no detectable difference"``).
    """
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
    adjusted = holm_adjust({m: c["p_value"] for m, c in out.items()})
    k = sum(math.isfinite(p) for p in adjusted.values())
    labels = {"treatment": f"{treatment_label} better", "baseline": f"{baseline_label} better"}
    for metric, comp in out.items():
        comp["p_adjusted"] = adjusted[metric]
        comp["holm_k"] = k
        comp["better"] = decide(comp, alpha)
        comp["verdict"] = labels.get(comp["better"], NO_DIFFERENCE)
    return out


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
    n = int(comp.get("n_pairs", len(comp.get("per_seed", {}))))
    better = decide(comp, alpha)
    ci = f"{round(100 * float(comp.get('confidence', 1 - alpha)))}% CI ({comp.get('ci_method', '?')})"
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


def interval_header(comparison: Mapping[str, Mapping[str, Any]]) -> str:
    """The column title of a table's intervals, e.g. ``"95% CI (t)"``; without a method when the
    metrics of the table use different ones (then :func:`interval_cell` names it per cell)."""
    methods = {c.get("ci_method", "?") for c in comparison.values()} - {"none"}
    levels = {round(100 * float(c.get("confidence", 0.95))) for c in comparison.values()}
    level = f"{levels.pop()}% CI" if len(levels) == 1 else "CI"
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
    if "none" in by_test:
        parts.append("no test with a single paired seed")
    k = max((int(c.get("holm_k", 0)) for c in comparison.values()), default=0)
    note = "Test: " + "; ".join(parts) + f". p adj: Holm-adjusted over the {k} metrics of this table."
    if any(math.isfinite(float(c.get("boot_ci_low", float("nan")))) for c in comparison.values()):
        note += f" A studentised bootstrap interval is reported from {BOOTSTRAP_MIN_PAIRS} seeds only."
    return note + f" Verdict: an arm is named only when p adj < {ALPHA} and the interval excludes 0."


def arm_mean_sd(comp: Mapping[str, Any], arm: str) -> tuple[float, float]:
    """Mean and sample sd over the paired seeds of one arm (``"treatment"`` or ``"baseline"``) of a
    :func:`paired_comparison`: the very values the difference was computed from (same seeds, same
    split), so ``mean(treatment) - mean(baseline) == mean_diff``. The sd is NaN with one seed."""
    vals = np.array([float(v[arm]) for v in comp.get("per_seed", {}).values()], dtype=float)
    if vals.size == 0:
        return float("nan"), float("nan")
    return float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
