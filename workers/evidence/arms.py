"""Several arms against one baseline on the same seeds: the family-wise error across the arms, the
arms ranked on the primary metric, and the arms the seeds cannot tell from the best.

Family-wise error (:func:`family_adjust`)
    Each of the k arms is judged against the baseline at ``alpha / k`` (Bonferroni, the rule of
    :func:`workers.evidence.sequential.family_rule`): the chance of any false verdict across the
    arms is then at most alpha, whatever their dependence (they share the baseline's seeds). The
    primary's adjusted p is ``min(1, k * p)``; its interval is at ``1 - alpha / k``.

The best set (:func:`rank_arms`)
    Every pair of the K arms (the baseline included) is compared on the seeds both trained, with a
    paired test at ``alpha / m``, m = K (K - 1) / 2. An arm is left out of the set only when another
    arm is better than it by such a test (adjusted p below alpha and the interval excluding 0), so
    the set holds the truly best arm with probability at least 1 - alpha: leaving it out takes a
    false "better" among the pairs. The arms in it are "indistinguishable from the best" at these
    seeds.

:func:`simulate_family` measures both rates by simulation (tests/search/test_arms.py).
Pure numpy/scipy on plain dicts, like the rest of :mod:`workers.evidence`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.evidence.paired import LOWER_IS_BETTER, EvidenceError, paired_comparison
from workers.evidence.sequential import Rule, family_rule, halfwidth

__all__ = ["FAMILY_METHOD", "FamilySim", "family_adjust", "rank_arms", "simulate_family"]

#: how the family's correction is named in tables and JSON.
FAMILY_METHOD = "bonferroni"
#: the metrics a ranked row carries beside the primary (means over the paired seeds).
ROW_METRICS = ("AP", "AP50", "AP75", "AP90", "aic", "spearman")


def family_adjust(table: dict[str, dict[str, Any]], k: int, alpha: float) -> None:
    """Mark one arm's table (:func:`workers.evidence.compare_metrics`, computed at ``alpha / k``) as a
    member of a family of ``k`` arms: the primary's ``p_adjusted`` becomes ``min(1, k p)``, and every
    metric gets ``family_k``, ``family_alpha`` (the family's level) and ``family_method``."""
    for comp in table.values():
        comp["family_k"] = k
        comp["family_alpha"] = alpha
        comp["family_method"] = FAMILY_METHOD
        if comp.get("role") == "primary" and k > 1:
            p = float(comp.get("p_value", math.nan))
            comp["p_adjusted"] = min(1.0, k * p) if math.isfinite(p) else p


def _better(
    values: Mapping[int, float], other: Mapping[int, float], metric: str, level: float
) -> dict[str, Any]:
    """Whether ``values`` beat ``other`` on their common seeds, by a paired test at ``level``."""
    try:
        comp = paired_comparison(values, other, n_boot=1, confidence=1.0 - level)
    except EvidenceError:
        return {"better": False, "p": math.nan, "n": 0}
    p, lo, hi = float(comp["p_value"]), float(comp["ci_low"]), float(comp["ci_high"])
    higher = metric not in LOWER_IS_BETTER
    decided = math.isfinite(p) and p < level and math.isfinite(lo) and math.isfinite(hi)
    ahead = (lo > 0) if higher else (hi < 0)
    return {"better": bool(decided and ahead), "p": p, "n": int(comp["n_pairs"])}


def rank_arms(
    per_seed: Mapping[str, Mapping[int, Mapping[str, float]]],
    tables: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    primary: str,
    alpha: float,
    baseline: str = "baseline",
) -> list[dict[str, Any]]:
    """The arms ranked on ``primary`` (best first), each with its verdict against the baseline and
    whether it is in the best set.

    Args:
        per_seed: arm -> seed -> metrics, on the split judged on (the baseline among them).
        tables: arm -> its comparison with the baseline (:func:`family_adjust` applied); the
            baseline has none.
        primary: the primary metric.
        alpha: the family's level (the spec's ``evidence.alpha``).
        baseline: the baseline's key in ``per_seed``.

    Returns:
        list of dict: ``arm``, ``rank`` (1 = best mean), ``n`` (seeds), ``mean``, ``sd``, the means of
        :data:`ROW_METRICS`; against the baseline (absent for the baseline itself) ``estimate``,
        ``ci_low``, ``ci_high``, ``ci_method``, ``ci_confidence``, ``p_value``, ``p_adjusted``,
        ``outcome``; then ``in_best_set``, ``beaten_by`` (the arms found better than it) and
        ``pairs`` (the number of pairwise tests, m).
    """
    arms = [a for a in per_seed if any(primary in m for m in per_seed[a].values())]
    higher = primary not in LOWER_IS_BETTER
    values = {a: {s: float(m[primary]) for s, m in per_seed[a].items() if primary in m} for a in arms}
    m = len(arms) * (len(arms) - 1) // 2
    level = alpha / max(1, m)
    beaten_by: dict[str, list[str]] = {a: [] for a in arms}
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            if _better(values[a], values[b], primary, level)["better"]:
                beaten_by[b].append(a)
            elif _better(values[b], values[a], primary, level)["better"]:
                beaten_by[a].append(b)
    rows = []
    for a in arms:
        vals = np.array(list(values[a].values()), dtype=float)
        row: dict[str, Any] = {
            "arm": a,
            "n": int(vals.size),
            "mean": float(vals.mean()),
            "sd": float(vals.std(ddof=1)) if vals.size > 1 else math.nan,
        }
        for metric in ROW_METRICS:
            got = [float(v[metric]) for v in per_seed[a].values() if metric in v]
            row[metric] = float(np.mean(got)) if got else math.nan
        comp = tables.get(a, {}).get(primary)
        if comp is not None:
            for key in (
                "estimate",
                "ci_low",
                "ci_high",
                "ci_method",
                "ci_confidence",
                "p_value",
                "p_adjusted",
            ):
                row[key] = comp.get(key)
            row["outcome"] = comp.get("outcome", comp.get("better"))
        row["in_best_set"] = not beaten_by[a]
        row["beaten_by"] = sorted(beaten_by[a])
        row["pairs"] = m
        rows.append(row)
    rows.sort(key=lambda r: -r["mean"] if higher else r["mean"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


@dataclass(frozen=True)
class FamilySim:
    """What :func:`simulate_family` measured over ``n_experiments`` simulated comparisons."""

    n_experiments: int
    k: int
    familywise_false_rate: float  # any arm given a verdict against its true sign
    simultaneous_coverage: float  # every arm's interval holds its true difference
    best_left_out_rate: float  # the truly best arm left out of the best set
    mean_seeds: float

    def mc_error(self, rate: float) -> float:
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.n_experiments)


def simulate_family(
    true_diffs: Sequence[float],
    rule: Rule,
    n_experiments: int,
    rng: np.random.Generator,
    *,
    sd_arm: float = 1.0,
    sd_baseline: float = 1.0,
    correct: bool = True,
) -> FamilySim:
    """Run k arms against one baseline on simulated seeds: each seed draws the baseline
    ``N(0, sd_baseline)`` and arm i ``N(true_diffs[i], sd_arm)``, so the arms' differences share
    the baseline's draw. With ``rule.target_halfwidth`` seeds come in rounds and stop when every
    arm's t-mixture half-width is at most the target (or at the cap); else the fixed n is judged
    with t-intervals. ``correct`` applies :func:`family_rule` (False: each arm at the full alpha).

    The best set is measured at the last look with the pairwise t-tests of :func:`rank_arms`
    (Bonferroni over the K (K - 1) / 2 pairs, baseline included)."""
    from scipy import stats

    k = len(true_diffs)
    per_arm = family_rule(rule, k) if correct else rule
    looks = np.asarray(rule.looks(), dtype=int)
    n_max = int(looks[-1])
    base = rng.normal(0.0, sd_baseline, size=(n_experiments, n_max))
    arms = rng.normal(np.asarray(true_diffs, float)[None, :, None], sd_arm, size=(n_experiments, k, n_max))
    d = arms - base[:, None, :]
    n = looks.astype(float)
    s = np.cumsum(d, axis=2)[:, :, looks - 1]
    q = np.cumsum(d**2, axis=2)[:, :, looks - 1]
    mean = s / n
    ss = np.maximum(q - n * mean**2, 0.0)
    if rule.target_halfwidth is not None:
        h = halfwidth(n, ss, per_arm.alpha, per_arm.mixture_precision())
        stop = np.all(h <= rule.target_halfwidth, axis=1) & (n >= rule.min_seeds)[None, :]
    else:
        sd = np.sqrt(ss / np.maximum(n - 1, 1))
        h = stats.t.ppf(1 - per_arm.alpha / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
        stop = np.zeros((n_experiments, looks.size), bool)
    stop[:, -1] = True
    at = np.argmax(stop, axis=1)
    rows = np.arange(n_experiments)
    mu = mean[rows, :, at]
    hw = h[rows, :, at]
    lo, hi = mu - hw, mu + hw
    truth = np.asarray(true_diffs, float)[None, :]
    false = ((lo > 0) & (truth <= 0)) | ((hi < 0) & (truth >= 0))
    covered = (lo <= truth) & (truth <= hi)
    # the best set at the last look: K arms (baseline = index k, true value 0), pairwise t-tests
    values = np.concatenate([arms, base[:, None, :]], axis=1)
    true_all = np.concatenate([np.asarray(true_diffs, float), [0.0]])
    best = int(np.argmax(true_all))
    pairs = (k + 1) * k // 2
    level = rule.alpha / pairs if correct else rule.alpha
    left_out = np.zeros(n_experiments, bool)
    for j in range(k + 1):
        if j == best:
            continue
        diff = values[:, j, :] - values[:, best, :]
        nn = diff.shape[1]
        t = diff.mean(axis=1) / (diff.std(axis=1, ddof=1) / math.sqrt(nn))
        p = 2 * stats.t.sf(np.abs(t), nn - 1)
        left_out |= (p < level) & (t > 0)
    return FamilySim(
        n_experiments=n_experiments,
        k=k,
        familywise_false_rate=float(false.any(axis=1).mean()),
        simultaneous_coverage=float(covered.all(axis=1).mean()),
        best_left_out_rate=float(left_out.mean()),
        mean_seeds=float(looks[at].mean()),
    )
