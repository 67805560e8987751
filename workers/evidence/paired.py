"""The paired statistics of two arms on the same seeds: the test and interval chosen by the number
of pairs (t below 6, exact Wilcoxon + Hodges-Lehmann from 6, studentised bootstrap from 10), Holm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


#: the estimate each interval is about (``ci_method`` -> ``estimand``): a row prints one with the other.
ESTIMANDS = {"t": "mean", "wilcoxon-hl": "pseudo-median", "t-mixture-cs": "mean", "none": "mean"}


def points_scale(metric: str) -> float:
    """How a metric is written in tables: AP-like metrics in points (x100), the others as measured."""
    return 100.0 if metric.startswith("AP") or metric.startswith("ap_iou") else 1.0


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


#: fewest pairs for which :func:`pairing_gain` gives a correlation (two points always lie on a line).
CORRELATION_MIN_PAIRS = 3


def pairing_gain(treatment: ArrayLike, baseline: ArrayLike) -> dict[str, float | None]:
    """What pairing by seed bought: each arm's SD over seeds, the SD of the paired differences, and
    the correlation of the arms over seeds.

    ``var(d) = var(t) + var(b) - 2 r sd(t) sd(b)``: a positive correlation r (a seed good for one arm
    is good for the other) makes the differences less noisy than two independent arms would be,
    which is what pairing buys; ``sd_unpaired`` is the SD of the difference of independent arms
    with the same spreads, ``sqrt(var(t) + var(b))``.

    Args:
        treatment, baseline (ArrayLike): the arms' values on the same seeds, in the same order.

    Returns:
        dict: ``sd_treatment``, ``sd_baseline``, ``sd_diff`` (sample SDs, NaN with one seed),
        ``sd_unpaired`` and ``correlation`` (Pearson; None with fewer than
        :data:`CORRELATION_MIN_PAIRS` seeds or when an arm does not vary).
    """
    t = np.asarray(treatment, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if t.shape != b.shape:
        raise EvidenceError(f"pairing_gain: {t.size} treatment values but {b.size} baseline values")
    nan = float("nan")
    n = t.size
    sd_t = float(t.std(ddof=1)) if n > 1 else nan
    sd_b = float(b.std(ddof=1)) if n > 1 else nan
    correlation = None
    if n >= CORRELATION_MIN_PAIRS and sd_t > 0 and sd_b > 0:
        correlation = float(np.clip(np.corrcoef(t, b)[0, 1], -1.0, 1.0))
    return {
        "sd_treatment": sd_t,
        "sd_baseline": sd_b,
        "sd_diff": float((t - b).std(ddof=1)) if n > 1 else nan,
        "sd_unpaired": math.sqrt(sd_t**2 + sd_b**2) if n > 1 else nan,
        "correlation": correlation,
    }


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
        ``confidence``, a human-readable ``note``, what the pairing bought (:func:`pairing_gain`:
        ``sd_treatment``, ``sd_baseline``, ``sd_diff``, ``sd_unpaired``, ``correlation``), and
        ``estimate``/``estimand``: the point estimate of the quantity the interval is about
        (``mean`` for ``t``, ``pseudo-median`` = ``hl_estimate`` for ``wilcoxon-hl``). With a single
        pair every statistic except ``mean_diff`` is NaN (``correlation`` None).

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
        **pairing_gain(
            np.array([t_vals[s] for s in seeds], dtype=float),
            np.array([b_vals[s] for s in seeds], dtype=float),
        ),
    }
    if n < 2:
        result["note"] = "only one paired seed: no interval or test is possible"
        _set_estimate(result)
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
    _set_estimate(result)
    return result


def _set_estimate(result: dict[str, Any]) -> None:
    """``estimate`` and ``estimand``: the quantity the row's interval is about (mean beside a
    t-interval, Hodges-Lehmann pseudo-median beside the Wilcoxon interval)."""
    result["estimand"] = ESTIMANDS.get(result["ci_method"], "mean")
    result["estimate"] = (
        result["hl_estimate"] if result["estimand"] == "pseudo-median" else result["mean_diff"]
    )


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
