"""Seed-paired evidence: does a configuration beat the baseline by more than seed noise?

Seeds are a blocking factor: configuration and baseline are trained on the same seeds (same
initialisation, same data order, same schedule), so the unit of comparison is the per-seed
*difference* ``treatment[seed] - baseline[seed]``, not two independent samples. Everything here is
plain numpy/scipy on plain dicts so that the search, the report and the tests share one
implementation.

Choice of the paired test
    The Wilcoxon signed-rank test makes no normality assumption, but its exact two-sided p-value
    can never go below ``2 / 2**n`` (all n differences of one sign): 0.25 with 3 seeds, 0.125
    with 4, 0.0625 with 5. Below 6 pairs it can therefore never reject at the 5 % level whatever
    the data, and reporting it alone would read as "no effect" when the experiment simply has too
    few seeds. For ``n < 6`` the paired t-test is used instead (it assumes roughly normal
    differences, which is the usual model of seed noise); the Wilcoxon p-value and its floor are
    still reported beside it, and ``note`` says which test was used and why.

Confidence interval
    A percentile bootstrap of the mean paired difference (``n_boot`` resamples of the seeds). With
    very few pairs the bootstrap under-covers (it can only see the spread of the observed
    differences), so the t-interval of the mean difference is reported as well; with n = 3 it is
    the more honest of the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

#: smallest number of pairs for which the exact two-sided Wilcoxon test can reach p < 0.05.
WILCOXON_MIN_PAIRS = 6

#: smallest number of pairs for which the bootstrap interval is reported (see the module docstring).
BOOTSTRAP_MIN_PAIRS = 10

#: significance level of the verdicts of :func:`compare_metrics` (after Holm's adjustment).
ALPHA = 0.05

#: the verdict when neither arm is shown better; tables and reports print it verbatim.
NO_DIFFERENCE = "no detectable difference"

#: how each ``test`` is described in tables.
TESTS = {"t": "paired t-test", "wilcoxon": "exact Wilcoxon signed-rank test", "none": "no test"}

#: metrics where a smaller value is better (AIC: average inconsistency |score - IoU|).
LOWER_IS_BETTER = frozenset({"aic", "train_aic", "loss"})


class EvidenceError(ValueError):
    """The inputs of a comparison are unusable; the message says which and why."""


def _finite_values(name: str, values: Mapping[Any, float]) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for key, value in values.items():
        if value is None:
            continue
        v = float(value)
        if not math.isfinite(v):
            continue
        out[key] = v
    if not out and values:
        raise EvidenceError(f"{name}: no finite values among {len(values)} seed(s)")
    return out


def wilcoxon_min_p(n_pairs: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n_pairs``.

    Args:
        n_pairs (int): number of non-zero paired differences.

    Returns:
        float: ``min(1, 2 / 2**n_pairs)``.
    """
    if n_pairs <= 0:
        return 1.0
    return min(1.0, 2.0 / 2.0**n_pairs)


def _signed_rank_null_cdf(n: int) -> np.ndarray:
    """``P(T+ <= t)`` for ``t = 0 .. n(n+1)/2`` under the exact null of the signed-rank test."""
    pmf = np.zeros(n * (n + 1) // 2 + 1)
    pmf[0] = 1.0
    for rank in range(1, n + 1):
        # each rank enters T+ with probability 1/2, independently of the others
        shifted = np.zeros_like(pmf)
        shifted[rank:] = pmf[:-rank]
        pmf = 0.5 * (pmf + shifted)
    return np.cumsum(pmf)


def hodges_lehmann_interval(diffs: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """The interval of the Walsh averages that inverts the exact Wilcoxon signed-rank test.

    Args:
        diffs (ArrayLike): the paired differences.
        confidence (float): the nominal level, e.g. 0.95.

    Returns:
        tuple: ``(low, high, estimate, achieved)``: the ``k+1``-th smallest and largest Walsh
        average ``(d_i + d_j) / 2, i <= j``, with ``k`` the largest count such that
        ``P(T+ <= k) <= (1 - confidence) / 2``; the Hodges-Lehmann estimate (median of the Walsh
        averages); and the achieved confidence ``1 - 2 P(T+ <= k)`` (>= ``confidence``). The
        bounds are NaN when no such ``k`` exists (fewer than 6 pairs at 95 %).
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    nan = float("nan")
    if n == 0:
        return nan, nan, nan, nan
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    estimate = float(np.median(walsh))
    cdf = _signed_rank_null_cdf(n)
    ok = np.flatnonzero(cdf <= (1.0 - confidence) / 2.0)
    if ok.size == 0:
        return nan, nan, estimate, nan
    k = int(ok[-1])
    return float(walsh[k]), float(walsh[len(walsh) - 1 - k]), estimate, float(1.0 - 2.0 * cdf[k])


def studentized_bootstrap_interval(
    diffs: ArrayLike, *, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Bootstrap-t interval of the mean of ``diffs`` (see the module docstring for why not BCa).

    ``[mean - q(1 - a/2) se, mean - q(a/2) se]`` with ``q`` the quantiles of the resampled
    ``(mean* - mean) / se*`` and ``se = sd / sqrt(n)``; resamples whose ``se*`` is 0 (every draw the
    same seed) have no studentised value and are skipped.

    Returns:
        tuple: ``(low, high)``; NaN with fewer than 2 differences.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return mean, mean
    rng = np.random.default_rng(seed)
    samples = d[rng.integers(0, n, size=(n_boot, n))]
    se_star = samples.std(axis=1, ddof=1) / math.sqrt(n)
    keep = se_star > 0
    t_star = (samples.mean(axis=1)[keep] - mean) / se_star[keep]
    alpha = 1.0 - confidence
    q_lo, q_hi = np.quantile(t_star, [alpha / 2, 1 - alpha / 2])
    return mean - float(q_hi) * se, mean - float(q_lo) * se


def paired_comparison(
    treatment: Mapping[Any, float],
    baseline: Mapping[Any, float],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Compare two arms measured on the same seeds.

    Only seeds present (with a finite value) in both arms are paired; the others are listed in
    ``unpaired_seeds``. The statistics are on ``d = treatment - baseline``; which test and which
    interval are used for how many pairs is explained in the module docstring.

    Args:
        treatment (Mapping[seed, float]): the metric of the treatment arm per seed.
        baseline (Mapping[seed, float]): the metric of the baseline arm per seed.
        n_boot (int): bootstrap resamples (used from ``BOOTSTRAP_MIN_PAIRS`` pairs only).
        seed (int): seed of the bootstrap's random generator (the result is deterministic).
        confidence (float): confidence level of every interval, e.g. 0.95.

    Returns:
        dict: the interval and test actually used: ``n_pairs``, ``test`` (``"t"``,
        ``"wilcoxon"``, or ``"none"`` with one pair), ``p_value`` (its raw two-sided p),
        ``ci_low``/``ci_high`` and ``ci_method`` (``"t"``, ``"wilcoxon-hl"`` or ``"none"``),
        ``ci_confidence`` (achieved level: nominal for ``t``, exact for ``wilcoxon-hl``), and
        ``ci95_low``/``ci95_high`` (the same interval, under the name older readers use).
        Also every statistic for a reader who wants it: ``mean_diff``, ``std_diff`` (sample
        std), ``hl_estimate`` (Hodges-Lehmann), ``t_ci95_low``/``t_ci95_high`` and ``t_p``
        (t-interval and t-test, whatever ``n``), ``wilcoxon_p``, ``wilcoxon_min_p`` (its floor),
        ``boot_ci_low``/``boot_ci_high``/``boot_method`` (studentised bootstrap; NaN, NaN,
        None below ``BOOTSTRAP_MIN_PAIRS`` pairs), ``wins`` (seeds where treatment >
        baseline), ``per_seed`` ({seed: {treatment, baseline, diff}}), ``unpaired_seeds``,
        ``confidence`` and a human-readable ``note``. With a single pair every statistic except
        ``mean_diff`` is NaN.

    Raises:
        EvidenceError: no seed is shared by both arms, or ``n_boot``/``confidence`` are invalid.
    """
    if n_boot < 1:
        raise EvidenceError(f"n_boot: must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise EvidenceError(f"confidence: must be in (0, 1), got {confidence}")
    t_vals = _finite_values("treatment", treatment)
    b_vals = _finite_values("baseline", baseline)
    seeds = sorted(set(t_vals) & set(b_vals), key=lambda s: (str(type(s)), s))
    if not seeds:
        raise EvidenceError(
            f"no seed has a value in both arms (treatment seeds {sorted(map(str, t_vals))}, "
            f"baseline seeds {sorted(map(str, b_vals))})"
        )
    unpaired = sorted(map(str, (set(t_vals) | set(b_vals)) - set(seeds)))
    diffs = np.array([t_vals[s] - b_vals[s] for s in seeds], dtype=float)
    n = len(diffs)
    mean = float(diffs.mean())
    nan = float("nan")
    result: dict[str, Any] = {
        "n_pairs": n,
        "test": "none",
        "p_value": nan,
        "ci_low": nan,
        "ci_high": nan,
        "ci_method": "none",
        "ci_confidence": nan,
        "ci95_low": nan,
        "ci95_high": nan,
        "mean_diff": mean,
        "std_diff": float(diffs.std(ddof=1)) if n > 1 else nan,
        "hl_estimate": nan,
        "t_ci95_low": nan,
        "t_ci95_high": nan,
        "t_p": nan,
        "wilcoxon_p": nan,
        "wilcoxon_min_p": wilcoxon_min_p(int(np.count_nonzero(diffs))),
        "boot_ci_low": nan,
        "boot_ci_high": nan,
        "boot_method": None,
        "wins": int((diffs > 0).sum()),
        "confidence": confidence,
        "per_seed": {
            s: {"treatment": t_vals[s], "baseline": b_vals[s], "diff": t_vals[s] - b_vals[s]} for s in seeds
        },
        "unpaired_seeds": unpaired,
    }
    if n < 2:
        result["note"] = "only one paired seed: no interval or test is possible"
        return result

    from scipy import stats  # (0.7 s to import: not at module import, which Tune trials pay)

    alpha = 1.0 - confidence
    sem = float(diffs.std(ddof=1)) / math.sqrt(n)
    if sem > 0:
        half = float(stats.t.ppf(1 - alpha / 2, df=n - 1)) * sem
        result["t_ci95_low"], result["t_ci95_high"] = mean - half, mean + half
        result["t_p"] = float(stats.ttest_rel(diffs, np.zeros(n)).pvalue)
    else:
        # every seed moved by exactly the same amount: no noise to test against
        result["t_ci95_low"] = result["t_ci95_high"] = mean
        result["t_p"] = 1.0 if mean == 0 else 0.0

    if np.any(diffs != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(diffs, alternative="two-sided").pvalue)
    else:
        result["wilcoxon_p"] = 1.0
    hl_low, hl_high, result["hl_estimate"], hl_level = hodges_lehmann_interval(diffs, confidence)

    if n >= BOOTSTRAP_MIN_PAIRS:
        result["boot_ci_low"], result["boot_ci_high"] = studentized_bootstrap_interval(
            diffs, n_boot=n_boot, seed=seed, confidence=confidence
        )
        result["boot_method"] = "bootstrap-t"

    if n >= WILCOXON_MIN_PAIRS:
        result["test"] = "wilcoxon"
        result["p_value"] = result["wilcoxon_p"]
        note = f"exact Wilcoxon signed-rank test on {n} paired seeds"
        if math.isfinite(hl_low):
            result["ci_low"], result["ci_high"], result["ci_method"] = hl_low, hl_high, "wilcoxon-hl"
            result["ci_confidence"] = hl_level
            note += f", with its Hodges-Lehmann interval (exact level {hl_level:.3f})"
        else:
            # a confidence level the exact distribution cannot reach with n pairs (e.g. 99 % at n=6)
            result["ci_low"], result["ci_high"], result["ci_method"] = (
                result["t_ci95_low"], result["t_ci95_high"], "t"
            )  # fmt: skip
            result["ci_confidence"] = confidence
            note += f"; the exact Hodges-Lehmann interval cannot reach {confidence:.0%} with {n} pairs: t-interval shown"
        result["note"] = note
    else:
        result["test"] = "t"
        result["p_value"] = result["t_p"]
        result["ci_low"], result["ci_high"], result["ci_method"] = (
            result["t_ci95_low"],
            result["t_ci95_high"],
            "t",
        )
        result["ci_confidence"] = confidence
        result["note"] = (
            f"paired t-test and t-interval on {n} seeds: with n={n} the exact Wilcoxon signed-rank test "
            f"cannot give p below {wilcoxon_min_p(n):.4g} whatever the data (Wilcoxon p = "
            f"{result['wilcoxon_p']:.4g}); the t-test assumes normally distributed seed differences. "
            f"Use >= {WILCOXON_MIN_PAIRS} seeds for a distribution-free test."
        )
    result["ci95_low"], result["ci95_high"] = result["ci_low"], result["ci_high"]
    return result


def holm_adjust(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values of one family of tests.

    The i-th smallest of the ``k`` finite p-values becomes ``max_{j <= i} min(1, (k - j + 1) p_(j))``;
    a hypothesis is rejected at level alpha when its adjusted p is below alpha, which controls the
    family-wise error rate under any dependence between the tests.

    Args:
        p_values (Mapping[name, float]): raw p-values; NaN ones (no test possible) stay NaN and
            are not counted in ``k``.

    Returns:
        dict: name -> adjusted p-value.
    """
    finite = sorted((p, name) for name, p in p_values.items() if math.isfinite(p))
    k = len(finite)
    out = {name: float("nan") for name in p_values}
    running = 0.0
    for i, (p, name) in enumerate(finite):
        running = max(running, min(1.0, (k - i) * p))
        out[name] = running
    return out


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


def aggregate_seeds(per_seed: Mapping[Any, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over seeds.

    Args:
        per_seed (Mapping[seed, Mapping[metric, float]]): metrics of each seed; non-numeric and
            non-finite values are ignored.

    Returns:
        dict: metric -> ``{"mean", "std", "n"}`` (``std`` is the sample standard deviation,
        ``ddof=1``; 0 with a single seed).
    """
    values: dict[str, list[float]] = {}
    for metrics in per_seed.values():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                values.setdefault(key, []).append(float(value))
    out: dict[str, dict[str, float]] = {}
    for key, vals in values.items():
        arr = np.asarray(vals)
        out[key] = {
            "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": float(len(arr)),
        }
    return out


def sensitivity(
    configs: Iterable[Mapping[str, Any]],
    params: Sequence[str] = ("alpha", "gamma", "margin"),
    *,
    tolerance: float = 0.5,
) -> dict[str, Any]:
    """How much the objective depends on each hyperparameter, and how flat the optimum is.

    Args:
        configs (Iterable[Mapping]): one entry per configuration, ``{"params": {name: value},
            "objective": float | None}``; entries whose objective is missing or not finite
            (failed trials) are counted in ``n_failed`` and otherwise ignored. A parameter name
            matches either exactly or as the last part of a dotted name (``alpha`` matches
            ``loss.alpha``).
        params (Sequence[str]): the parameters to analyse.
        tolerance (float): width of the "near the best" band, in the objective's units (0.5 AP
            points when AP is on the 0-100 scale).

    Returns:
        dict: ``best`` (objective), ``tolerance``, ``n_configs``, ``n_failed``, ``n_within`` and
        ``share_within`` (configurations whose objective is within ``tolerance`` of the best,
        the best included), and ``params``: name -> ``{"values", "objective", "spearman"}``
        (scatter data and the Spearman rank correlation of value and objective; NaN when the
        parameter is constant or has fewer than 3 points).
    """
    if tolerance < 0:
        raise EvidenceError(f"tolerance: must be >= 0, got {tolerance}")
    ok: list[tuple[Mapping[str, Any], float]] = []
    n_failed = 0
    for cfg in configs:
        obj = cfg.get("objective")
        if obj is None or not math.isfinite(float(obj)):
            n_failed += 1
            continue
        ok.append((cfg.get("params", {}), float(obj)))
    result: dict[str, Any] = {
        "best": float("nan"),
        "tolerance": tolerance,
        "n_configs": len(ok),
        "n_failed": n_failed,
        "n_within": 0,
        "share_within": float("nan"),
        "params": {},
    }
    if not ok:
        return result
    objs = np.array([o for _, o in ok])
    best = float(objs.max())
    n_within = int((objs >= best - tolerance).sum())
    result.update(best=best, n_within=n_within, share_within=n_within / len(ok))
    for name in params:
        xs: list[float] = []
        ys: list[float] = []
        for p, obj in ok:
            value = _lookup_param(p, name)
            if value is None:
                continue
            xs.append(float(value))
            ys.append(obj)
        if not xs:
            continue
        rho = float("nan")
        if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
            from scipy import stats

            rho = float(stats.spearmanr(xs, ys).statistic)
        result["params"][name] = {"values": xs, "objective": ys, "spearman": rho}
    return result


def _lookup_param(params: Mapping[str, Any], name: str) -> float | None:
    if name in params:
        value = params[name]
    else:
        matches = [k for k in params if k.rsplit(".", 1)[-1] == name]
        if len(matches) != 1:
            return None
        value = params[matches[0]]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
