"""The evidence of a search as plain text: the table printed at the end of ``hdet run``.
Also written to the parent run as ``evidence/table.txt``; AP in points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workers.report.cells import arm_mean_sd_cell, fmt_value, num, pval, scale_of
from workers.report.tables import (
    comparison_tables,
    confirmation_lines,
    convergence_lines,
    ranking_table,
    score_thresh_lines,
)
from workers.summary.records import LISTED_ARM
from workers.summary.store import arm_label

if TYPE_CHECKING:
    from workers.summary import SearchSummary

__all__ = ["format_table", "comparison_lines"]


def format_table(summary: SearchSummary) -> str:
    """The comparison table printed at the end of a search (AP in points)."""
    lines: list[str] = []
    n = len(summary.trials)
    counts = {
        s: sum(t.status == s for t in summary.trials)
        for s in ("completed", "stopped", "failed", "incomplete")
    }
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if n or not summary.family:
        lines.append(
            f"search: {n} configurations x {len(summary.seeds)} seeds ({done}); "
            f"{summary.algorithm} + {summary.scheduler}, {summary.epochs} epochs"
        )
    else:
        arms = ", ".join(summary.family.get("arms", []))
        lines.append(
            f"comparison: {arms} against the baseline x {len(summary.seeds)} seeds, {summary.epochs} epochs"
        )
    if not summary.complete:
        lines.append("INTERRUPTED: resume with `hdet run SPEC --resume`")
    best, base = summary.best, summary.baseline
    if best is not None:
        params = ", ".join(f"{k}={fmt_value(v)}" for k, v in best.params.items())
        lines.append(f"best configuration: {params}  (trial {best.trial_id})")
    tables = comparison_tables(summary)
    rank_head, rank_rows, rank_note = ranking_table(summary)
    if rank_rows:
        lines.append("")
        lines.append(f"arms ranked ({len(rank_rows)}, the baseline included):")
        widths = [max(len(h), *(len(r[i]) for r in rank_rows)) for i, h in enumerate(rank_head)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(rank_head, widths, strict=True)).rstrip())
        lines.extend(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rank_rows
        )
        lines.append(rank_note)
    if base is not None and tables:
        for ct in tables:
            lines.append("")
            lines.append(
                f"{ct.title} vs baseline (standard loss) on the {summary.judged_on} split, paired over seeds {ct.seeds}:"
            )
            column = "confirm." if ct.arm == "confirmatory" else ct.column
            lines.extend(comparison_lines(ct.table, column, ct.label, summary.objective))
            lines.extend(f"convergence: {line}" for line in convergence_lines(summary, ct))
            lines.extend(f"{head}: {sentence}" for head, sentence in score_thresh_lines(summary, ct))
        lines.extend(confirmation_lines(summary))
        sens = summary.sensitivity
        if sens.get("n_configs"):
            lines.append(
                f"{sens['n_within']} of {sens['n_configs']} completed configurations are within "
                f"{100 * sens['tolerance']:.1f} AP of the best ({100 * sens['share_within']:.0f}%)"
            )
    elif base is not None and base.status == "failed":
        lines.append(f"baseline failed: {base.error}")
    lines.append("")
    lines.append(
        f"{'trial':<18}{'status':<11}{'AP':>7}{'±':>6}{'epochs':>7}{'wall s':>8}{'CPU s':>9}{'start s':>8}  config"
    )
    rows = [
        *summary.trials,
        *(a for a in (summary.confirmatory, *summary.arms, summary.best_confirmed, base) if a is not None),
    ]
    for t in rows:
        ap = f"{100 * t.objective:.1f}" if t.objective is not None else "-"
        sd = f"{100 * t.objective_std:.1f}" if t.objective_std is not None else "-"
        cfg = ", ".join(f"{k.rsplit('.', 1)[-1]}={fmt_value(v)}" for k, v in t.params.items())
        if t.arm == LISTED_ARM:
            cfg = f"loss {arm_label(t.params)}"
        if t.status == "failed" and t.error:
            cfg = f"{cfg}  [{t.error[:80]}]"
        lines.append(
            f"{t.trial_id:<18}{t.status:<11}{ap:>7}{sd:>6}{t.epochs:>7}{num(t.wall_s):>8}{num(t.cpu_s):>9}"
            f"{num(t.first_step_s, 1):>8}  {cfg}"
        )
    return "\n".join(lines)


def comparison_lines(
    comparison: Mapping[str, Mapping[str, Any]], column: str, label: str, primary: str
) -> list[str]:
    """One comparison table: per metric both arms' mean ± sd, diff (the estimate its interval is
    about), n, test, raw and adjusted p (the primary's alone, the secondaries' Holm), the interval
    named by its method, the verdict; then the method, the verdict sentence on ``primary`` and what
    pairing by seed bought on it.
    ``column`` heads the treatment's column, ``label`` names it in words."""
    from workers import evidence

    names = {m: evidence.metric_cell(comparison, m) for m in comparison}
    w = max(8, *(len(v) + 1 for v in names.values()))
    tw = max(9, *(len(str(c["test"])) + 1 for c in comparison.values()))
    cw = max(20, *(len(evidence.interval_cell(comparison, m, *scale_of(m))) for m in comparison))
    head = (
        f"{'metric':<{w}}{column:>15}{'baseline':>15}{'diff':>8}{'n':>4}  {'test':<{tw}}{'p':>9}{'p adj':>9}"
        f"  {evidence.interval_header(comparison):<{cw}}  verdict"
    )
    lines = [head, "-" * (len(head) + len(evidence.NO_DIFFERENCE) - len("verdict"))]
    for metric, comp in comparison.items():
        scale, digits = scale_of(metric)
        b = arm_mean_sd_cell(comp, "treatment", metric)
        a = arm_mean_sd_cell(comp, "baseline", metric)
        diff = f"{scale * comp.get('estimate', comp['mean_diff']):+.{digits}f}"
        ci = evidence.interval_cell(comparison, metric, scale, digits)
        p, p_adj = comp["p_value"], comp.get("p_adjusted", float("nan"))
        lines.append(
            f"{names[metric]:<{w}}{b:>15}{a:>15}{diff:>8}{comp.get('n_pairs', '-'):>4}  {comp['test']:<{tw}}"
            f"{pval(p):>9}{pval(p_adj):>9}  {ci:<{cw}}  {comp.get('verdict', evidence.NO_DIFFERENCE)}"
        )
    lines.append(evidence.method_note(comparison))
    main = next(
        (m for m, c in comparison.items() if c.get("role") == "primary"),
        primary if primary in comparison else next(iter(comparison)),
    )
    sentence = evidence.verdict_sentence(comparison, label, "the standard-loss baseline", primary=main)
    lines.append(f"verdict: {sentence}")
    pairing = evidence.pairing_sentence(comparison[main], main, label)
    if pairing:
        lines.append(f"pairing: {pairing}")
    return lines
