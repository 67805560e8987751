"""Which comparison tables a summary holds, in the order every renderer shows them, and the lines on
whether their arms had converged. Shared by the terminal table and the report document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from workers.summary import SearchSummary

__all__ = ["ComparisonTable", "comparison_tables", "confirmation_lines", "convergence_lines"]


class ComparisonTable(NamedTuple):
    """One comparison with the baseline: what it is called, the seeds it pairs, its treatment arm."""

    title: str  # in a sentence: "best configuration, confirmed on fresh seeds [3, 4]"
    heading: str  # as a report heading: "Best configuration, confirmed on fresh seeds [3, 4]"
    column: str  # the treatment's column in the table (the terminal table shortens "confirmatory")
    label: str  # the treatment in the verdict sentence: "HarmonicDet (best, exploratory)"
    arm: str  # the treatment arm's key in SearchSummary.convergence
    table: Mapping[str, Mapping[str, Any]]
    seeds: list[int]


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
                            summary.confirmatory_comparison, list(summary.seeds))
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
                            summary.exploratory_comparison, seeds)
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
