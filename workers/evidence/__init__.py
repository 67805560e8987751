"""Seed-paired evidence: does an arm beat the baseline by more than seed noise?

Seeds are a blocking factor: an arm and the baseline are trained on the same seeds (same
initialisation, same data order, same schedule), so the unit of comparison is the per-seed
*difference* ``treatment[seed] - baseline[seed]``, not two independent samples. Everything here is
plain numpy/scipy on plain dicts, so the search, the report, the REST service and the tests share
one implementation.

Test and interval, by the number of pairs n (:func:`paired_comparison`)
    * n < 6: the paired t-test and its t-interval of the mean difference. The exact two-sided
      Wilcoxon p can never go below ``2 / 2**n`` (0.0625 with 5 pairs), so below 6 pairs it could
      never reject whatever the data; it is reported beside the t-test, with its floor.
    * n >= 6: the exact Wilcoxon signed-rank test and the Hodges-Lehmann interval of the median
      difference (no normality assumed).
    * n >= 10: a studentised bootstrap interval of the mean difference is added (a percentile
      bootstrap on few seeds under-covers: with 3 seeds it is exactly [min d, max d]).

Point estimate and interval estimate the same quantity: ``estimate`` is the mean difference beside
a t-interval (or the sequence below) and the Hodges-Lehmann pseudo-median beside the Wilcoxon one.

Verdict (:func:`compare_metrics`, :func:`decide`)
    With a primary metric named before the run, it is tested alone at alpha and gets four outcomes
    (better, worse, equivalent within ±margin, undecided: with the seeds likely to decide it and
    the smallest difference detectable at 80 % power); the other metrics are secondary, their
    p-values Holm-adjusted among themselves. Without one, p-values are Holm-adjusted over the
    metrics of one table. An arm is called better only when its adjusted p < alpha **and** its
    interval excludes 0. Otherwise the verdict is :data:`NO_DIFFERENCE` (the primary's:
    "undecided"), said in those words, and :func:`verdict_sentence` says when few seeds make the
    interval wide.

Convergence (:mod:`workers.evidence.convergence`)
    Whether each arm's validation AP had stopped improving when the verdict was taken: a gain over
    the last quarter of the epochs no larger than the seeds' SD (:func:`plateau`).

Seeds in rounds (:mod:`workers.evidence.sequential`)
    When the user asks for a precision (a target half-width), seeds run in rounds until the
    primary's interval is that narrow; its interval is then a t-mixture confidence sequence
    (Lai 1976; Wang & Ramdas 2023), valid whenever the rounds stopped (a t-interval recomputed
    after each round is not).
"""

from __future__ import annotations

from workers.evidence.convergence import plateau, plateau_sentence
from workers.evidence.paired import (
    ALPHA,
    BOOTSTRAP_MIN_PAIRS,
    LOWER_IS_BETTER,
    NO_DIFFERENCE,
    TESTS,
    WILCOXON_MIN_PAIRS,
    EvidenceError,
    hodges_lehmann_interval,
    holm_adjust,
    paired_comparison,
    pairing_gain,
    points_scale,
    studentized_bootstrap_interval,
    wilcoxon_min_p,
)
from workers.evidence.spread import (
    aggregate_seeds,
    sensitivity,
)
from workers.evidence.verdict import (
    arm_mean_sd,
    compare_metrics,
    decide,
    interval_cell,
    interval_header,
    method_note,
    metric_cell,
    pairing_sentence,
    verdict_sentence,
)

__all__ = [
    "ALPHA",
    "BOOTSTRAP_MIN_PAIRS",
    "EvidenceError",
    "LOWER_IS_BETTER",
    "NO_DIFFERENCE",
    "TESTS",
    "WILCOXON_MIN_PAIRS",
    "aggregate_seeds",
    "arm_mean_sd",
    "compare_metrics",
    "decide",
    "hodges_lehmann_interval",
    "holm_adjust",
    "interval_cell",
    "interval_header",
    "method_note",
    "metric_cell",
    "paired_comparison",
    "pairing_gain",
    "pairing_sentence",
    "plateau",
    "plateau_sentence",
    "points_scale",
    "sensitivity",
    "studentized_bootstrap_interval",
    "verdict_sentence",
    "wilcoxon_min_p",
]
