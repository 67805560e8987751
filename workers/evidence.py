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

#: smallest number of pairs for which the exact two-sided Wilcoxon test can reach p < 0.05.
WILCOXON_MIN_PAIRS = 6

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
    ``unpaired_seeds``. The statistics are on ``d = treatment - baseline``.

    Args:
        treatment (Mapping[seed, float]): the metric of the treatment arm per seed.
        baseline (Mapping[seed, float]): the metric of the baseline arm per seed.
        n_boot (int): bootstrap resamples for the confidence interval of the mean difference.
        seed (int): seed of the bootstrap's random generator (the result is deterministic).
        confidence (float): confidence level of both intervals, e.g. 0.95.

    Returns:
        dict: ``mean_diff``, ``std_diff`` (sample std of the differences), ``ci95_low``,
        ``ci95_high`` (percentile bootstrap), ``t_ci95_low``, ``t_ci95_high`` (t-interval),
        ``p_value`` and ``test`` (``"wilcoxon"`` or ``"t"``, see the module docstring),
        ``wilcoxon_p``, ``wilcoxon_min_p``, ``t_p``, ``n_pairs``, ``wins`` (seeds where
        treatment > baseline), ``per_seed`` ({seed: {treatment, baseline, diff}}),
        ``unpaired_seeds`` and a human-readable ``note``. With a single pair every
        statistic except ``mean_diff`` is NaN.

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
        "mean_diff": mean,
        "std_diff": float(diffs.std(ddof=1)) if n > 1 else nan,
        "ci95_low": nan,
        "ci95_high": nan,
        "t_ci95_low": nan,
        "t_ci95_high": nan,
        "p_value": nan,
        "test": "t" if n < WILCOXON_MIN_PAIRS else "wilcoxon",
        "wilcoxon_p": nan,
        "wilcoxon_min_p": wilcoxon_min_p(int(np.count_nonzero(diffs))),
        "t_p": nan,
        "n_pairs": n,
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

    alpha = 1.0 - confidence
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot_means = diffs[idx].mean(axis=1)
    result["ci95_low"] = float(np.quantile(boot_means, alpha / 2))
    result["ci95_high"] = float(np.quantile(boot_means, 1 - alpha / 2))

    from scipy import stats  # (0.7 s to import: not at module import, which Tune trials pay)

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

    if result["test"] == "wilcoxon":
        result["p_value"] = result["wilcoxon_p"]
        result["note"] = f"Wilcoxon signed-rank test on {n} paired seeds"
    else:
        result["p_value"] = result["t_p"]
        result["note"] = (
            f"paired t-test on {n} seeds: with n={n} the exact Wilcoxon signed-rank test cannot give "
            f"p below {wilcoxon_min_p(n):.4g} whatever the data (Wilcoxon p = {result['wilcoxon_p']:.4g}); "
            f"the t-test assumes normally distributed seed differences. Use >= {WILCOXON_MIN_PAIRS} "
            "seeds for a distribution-free test."
        )
    return result


def compare_metrics(
    treatment: Mapping[Any, Mapping[str, float]],
    baseline: Mapping[Any, Mapping[str, float]],
    metrics: Sequence[str] = ("AP", "AP50", "AP75", "AP90", "aic"),
    *,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`paired_comparison` for several metrics of per-seed run results.

    Args:
        treatment (Mapping[seed, Mapping[metric, float]]): final metrics of each treatment seed.
        baseline (Mapping[seed, Mapping[metric, float]]): final metrics of each baseline seed.
        metrics (Sequence[str]): the metrics to compare; a metric missing from every seed of
            either arm is left out of the result.
        n_boot (int): bootstrap resamples.
        seed (int): bootstrap seed.

    Returns:
        dict: metric -> the :func:`paired_comparison` dict plus ``higher_is_better`` and
        ``better`` (``"treatment"``, ``"baseline"`` or ``"unclear"`` when the bootstrap interval
        contains 0).
    """
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        t = {s: m[metric] for s, m in treatment.items() if metric in m}
        b = {s: m[metric] for s, m in baseline.items() if metric in m}
        try:
            comp = paired_comparison(t, b, n_boot=n_boot, seed=seed)
        except EvidenceError:
            continue
        higher = metric not in LOWER_IS_BETTER
        comp["higher_is_better"] = higher
        lo, hi = comp["ci95_low"], comp["ci95_high"]
        if math.isnan(lo) or lo <= 0 <= hi:
            comp["better"] = "unclear"
        else:
            comp["better"] = "treatment" if (lo > 0) == higher else "baseline"
        out[metric] = comp
    return out


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
