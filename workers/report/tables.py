"""Which comparison tables a summary holds, in the order every renderer shows them, the lines on
whether their arms had converged, and their primary's verdict at the extra score thresholds. Shared
by the terminal table and the report document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from workers.report.cells import points, pval
from workers.summary.store import arm_label

if TYPE_CHECKING:
    from workers.summary import SearchSummary

__all__ = [
    "ComparisonTable",
    "comparison_tables",
    "ranking_table",
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
    labels = arm_labels(summary)
    for name, table in summary.arm_comparisons.items():
        words = f"arm {name} ({labels.get(name, name)})"
        out.append(
            ComparisonTable(words, words.capitalize(), name, f"{name} ({labels.get(name, name)})", name, table,
                            list(summary.seeds), f"arm:{name}")
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


def arm_labels(summary: SearchSummary) -> dict[str, str]:
    """Each arm of ``search.arms`` -> its loss in short (``standard+box=giou``)."""
    return {r.trial_id: arm_label(r.params) for r in summary.arms}


def ranking_table(summary: SearchSummary) -> tuple[list[str], list[list[str]], str]:
    """The arms ranked on the primary (``summary.ranking``): ``(head, rows, note)``, empty rows
    without ranked arms. Each arm against the baseline with its family-corrected interval and
    verdict, its consistency (AIC, Spearman) and AP by IoU threshold, and whether it is in the best set."""
    from workers.evidence import points_scale
    from workers.evidence.verdict import INTERVALS, level_text

    rows_in = summary.ranking
    if not rows_in:
        return [], [], ""
    primary = next(
        (m for t in summary.arm_comparisons.values() for m, c in t.items() if c.get("role") == "primary"),
        summary.objective,
    )
    scale = points_scale(primary)
    digits, diff_digits = (1, 2) if scale != 1.0 else (3, 3)  # AP in points; aic as measured
    labels = arm_labels(summary)
    labels.update({"baseline": "standard", "confirmatory": "the spec's loss"})
    fam = summary.family
    k, alpha = int(fam.get("k", 1)), float(fam.get("alpha", 0.05))
    level = level_text(1 - alpha / k)
    head = ["rank", "arm", "loss", "n", f"{primary} mean ± sd", "diff vs baseline", f"{level} CI",
            "p adj", "verdict vs baseline", "AIC", "Spearman", "AP50", "AP75", "best set"]  # fmt: skip
    rows = []
    methods = set()
    for r in rows_in:
        against = "estimate" in r
        if against:
            methods.add(str(r.get("ci_method")))
        rows.append([
            str(r["rank"]),
            r["arm"],
            labels.get(r["arm"], r["arm"]),
            str(r["n"]),
            f"{points(r['mean'], scale, digits)} ± {points(r['sd'], scale, digits)}",
            points(r.get("estimate"), scale, diff_digits, sign=True) if against else "(baseline)",
            f"[{points(r.get('ci_low'), scale, diff_digits, True)}, {points(r.get('ci_high'), scale, diff_digits, True)}]"
            if against else "",
            pval(_f(r.get("p_adjusted"))) if against else "-",
            str(r.get("outcome", "")) if against else "",
            points(r.get("aic"), 1.0, 3),
            points(r.get("spearman"), 1.0, 3),
            points(r.get("AP50")),
            points(r.get("AP75")),
            "yes" if r["in_best_set"] else f"no (below {', '.join(r['beaten_by'])})",
        ])  # fmt: skip
    how = "; ".join(INTERVALS.get(m, m) for m in sorted(methods))
    m = int(rows_in[0].get("pairs", 0))
    note = (
        f"Arms ranked on {primary} (the primary, mean over seeds {summary.seeds} on the {summary.judged_on} "
        f"split). Each arm against the baseline: {how}; Bonferroni over the {k} arms, each at alpha "
        f"{alpha:g}/{k} = {alpha / k:.3g} (p adj = min(1, {k} p)), so the chance of any false verdict across "
        f"them is at most {alpha:g}. Best set: the arms no other arm beats by a paired test at {alpha:g}/{m} "
        f"(Bonferroni over the {m} pairs, the baseline included); it holds the truly best arm with "
        f"probability at least {1 - alpha:g}, and its arms are indistinguishable from the best at these seeds."
    )
    return head, rows, note


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


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
    from workers.evidence.verdict import ESTIMATES, INTERVALS, level_text

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
            level = level_text(float(comp.get("confidence", 0.95)))
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
