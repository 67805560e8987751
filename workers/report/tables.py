"""Which comparison tables a summary holds, in the order every renderer shows them, the lines on
whether their arms had converged, and their primary's verdict at the extra score thresholds. Shared
by the terminal table and the report document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from workers.summary import SearchSummary

__all__ = [
    "ComparisonTable",
    "comparison_tables",
    "confirmation_lines",
    "convergence_lines",
    "score_thresh_lines",
]


class ComparisonTable(NamedTuple):
    """One comparison with the baseline: what it is called, the seeds it pairs, its treatment arm."""

    title: str  # in a sentence: "best configuration, confirmed on fresh seeds [3, 4]"
    heading: str  # as a report heading: "Best configuration, confirmed on fresh seeds [3, 4]"
    column: str  # the treatment's column in the table (the terminal table shortens "confirmatory")
    label: str  # the treatment in the verdict sentence: "HarmonicDet (best, exploratory)"
    arm: str  # the treatment arm's key in SearchSummary.convergence
    table: Mapping[str, Mapping[str, Any]]
    seeds: list[int]
    source: str = "comparison"  # the SearchSummary field the table is


def _paired_seeds(table: Mapping[str, Mapping[str, Any]], default: list[int]) -> list[int]:
    first = next(iter(table.values()), None)
    return sorted(int(s) for s in first["per_seed"]) if first else default


def comparison_tables(summary: SearchSummary) -> list[ComparisonTable]:
    """The non-empty comparisons: confirmatory, then best vs baseline (on fresh seeds when the best was
    confirmed, then its exploratory same-seed table)."""
    out = []
    if summary.confirmatory_comparison:
        out.append(
            ComparisonTable("confirmatory (the spec's loss)", "Confirmatory configuration (the spec's loss)",
                            "confirmatory", "HarmonicDet (confirmatory)", "confirmatory",
                            summary.confirmatory_comparison, list(summary.seeds), "confirmatory_comparison")
        )  # fmt: skip
    if summary.exploratory_comparison:
        fresh = _paired_seeds(summary.comparison, summary.confirm_seeds)
        words = f"best configuration, confirmed on fresh seeds {fresh}"
        out.append(
            ComparisonTable(words, words.capitalize(), "best", "HarmonicDet (best, confirmed on fresh seeds)",
                            "best_confirmed", summary.comparison, fresh)
        )  # fmt: skip
        seeds = _paired_seeds(summary.exploratory_comparison, summary.seeds)
        words = "best configuration, exploratory (the same trainings that selected it)"
        out.append(
            ComparisonTable(words, words.capitalize(), "best", "HarmonicDet (best, exploratory)", "best",
                            summary.exploratory_comparison, seeds, "exploratory_comparison")
        )  # fmt: skip
    elif summary.comparison:
        seeds = _paired_seeds(summary.comparison, summary.seeds)
        out.append(
            ComparisonTable("best", "Best configuration", "best", "HarmonicDet (best)", "best", summary.comparison, seeds)
        )  # fmt: skip
    return out


def convergence_lines(summary: SearchSummary, table: ComparisonTable) -> list[str]:
    """Whether the baseline and the table's treatment had plateaued on validation AP when judged
    (:func:`workers.evidence.plateau_sentence`); nothing for an arm without a history."""
    from workers.evidence import plateau_sentence

    arms = (("baseline", "baseline"), (table.arm, table.label))
    return [plateau_sentence(label, summary.convergence[a]) for a, label in arms if a in summary.convergence]


def confirmation_lines(summary: SearchSummary) -> list[str]:
    """What the best configuration's verdict rests on: fresh seeds, a failed confirmation, or the
    seeds that selected it (biased upwards when judged on the selection split)."""
    confirmed = summary.best_confirmed
    if summary.comparison and confirmed is not None and not summary.exploratory_comparison:
        why = f": {confirmed.error}" if confirmed.error else ""
        return [
            f"the confirmation of the best configuration on fresh seeds {summary.confirm_seeds} did not "
            f"complete ({confirmed.status}{why}); best vs baseline is judged on the seeds that selected it."
        ]
    if summary.comparison and not summary.exploratory_comparison and summary.judged_on != "test":
        return [
            "caution: the best configuration was selected on the split it is judged on; its difference "
            "is biased upwards (the winner's curse)."
        ]
    return []


def score_thresh_lines(summary: SearchSummary, table: ComparisonTable) -> list[tuple[str, str]]:
    """``(heading, sentence)`` per extra score threshold (``eval.extra_score_thresholds``): the
    table's primary at that threshold, its paired difference, interval and outcome, labelled as a
    secondary result (the table's verdict is at ``eval.score_thresh``)."""
    from workers.evidence import points_scale
    from workers.evidence.verdict import ESTIMATES, INTERVALS

    out = []
    main = f"{summary.score_thresh:g}" if summary.score_thresh is not None else "eval.score_thresh"
    for thresh, tables in summary.at_score_thresholds.items():
        for metric, comp in tables.get(table.source, {}).items():
            scale = points_scale(metric)
            unit = " points" if scale != 1.0 else ""
            n, method = int(comp.get("n_pairs", 0)), str(comp.get("ci_method", "none"))
            lo, hi = float(comp.get("ci_low", math.nan)), float(comp.get("ci_high", math.nan))
            est = float(comp.get("estimate", comp.get("mean_diff", math.nan)))
            estimate = ESTIMATES.get(str(comp.get("estimand", "mean")), "mean difference")
            level = f"{round(100 * float(comp.get('confidence', 0.95)))}%"
            interval = (
                f"{level} {INTERVALS.get(method, method)} [{_signed(lo, scale)}, {_signed(hi, scale)}]"
                if math.isfinite(lo) and math.isfinite(hi)
                else "no interval"
            )
            outcome = str(comp.get("outcome", "undecided"))
            words = {"better": f"{table.label} better", "worse": "the baseline better"}
            outcome = words.get(outcome, str(comp.get("verdict", outcome)))
            p = float(comp.get("p_value", math.nan))
            p_text = f", p = {p:.3g}" if math.isfinite(p) else ""
            out.append(
                (
                    f"verdict at score threshold {float(thresh):g}",
                    f"{metric} (secondary: not part of the primary's verdict, which is at score threshold "
                    f"{main}): {estimate} {_signed(est, scale)}{unit}, {interval} on {n} paired seeds{p_text}: "
                    f"{outcome}.",
                )
            )
    return out


def _signed(v: float, scale: float) -> str:
    return f"{scale * v:+.2f}" if math.isfinite(v) else "-"
