"""The evidence report of a search as a document: Markdown (render_markdown) or HTML (render_html).
Both are drawn from one list of blocks (headings, paragraphs, tables, images) built from a SearchSummary.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workers.report.cells import arm_mean_sd_cell, fmt_value, num, points, pval, scale_of, seed_mean_sd
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
    from workers.summary import SearchSummary, TrialRecord

__all__ = ["render_markdown", "render_html"]

Block = tuple[Any, ...]


def _comparison_blocks(
    comparison: Mapping[str, Mapping[str, Any]],
    column: str,
    primary: str,
    seeds: list[int],
    converged: list[str] | None = None,
    label: str | None = None,
) -> list[Block]:
    """One comparison table (one Holm family) with its verdict, what the pairing bought, whether the
    arms had converged (``converged``: one sentence per arm), its method and its per-seed values;
    ``label`` names the treatment in the verdict (default ``HarmonicDet (<column>)``)."""
    from workers import evidence

    label = label or f"HarmonicDet ({column})"
    main = next(
        (m for m, c in comparison.items() if c.get("role") == "primary"),
        primary if primary in comparison else next(iter(comparison)),
    )
    b: list[Block] = [
        ("p", "Verdict: " + evidence.verdict_sentence(comparison, label, "the standard-loss baseline", primary=main))
    ]  # fmt: skip
    pairing = evidence.pairing_sentence(comparison[main], main, label)
    if pairing:
        b.append(("p", f"Pairing by seed: {pairing}."))
    if converged:
        b.append(("p", "Convergence (validation AP): " + "; ".join(converged) + "."))
    with_boot = any(math.isfinite(c.get("boot_ci_low", math.nan)) for c in comparison.values())
    rows = []
    for metric, comp in comparison.items():
        scale, digits = scale_of(metric)
        lo, hi = comp.get("boot_ci_low", math.nan), comp.get("boot_ci_high", math.nan)
        boot = [f"[{points(lo, scale, digits, True)}, {points(hi, scale, digits, True)}]"]
        rows.append(
            [
                evidence.metric_cell(comparison, metric),
                arm_mean_sd_cell(comp, "treatment", metric),
                arm_mean_sd_cell(comp, "baseline", metric),
                points(comp.get("estimate", comp["mean_diff"]), scale, digits, sign=True),
                str(comp.get("n_pairs", "-")),
                comp["test"],
                pval(comp["p_value"]),
                pval(comp.get("p_adjusted", math.nan)),
                evidence.interval_cell(comparison, metric, scale, digits),
                *(boot if with_boot else []),
                f"{comp['wins']}/{comp['n_pairs']}",
                comp.get("verdict", evidence.NO_DIFFERENCE),
            ]
        )
    head = ["metric", column, "baseline", "diff", "n", "test", "p", "p adj (Holm)",
            evidence.interval_header(comparison), *(["95% CI (bootstrap-t)"] if with_boot else []),
            "seeds better", "verdict"]  # fmt: skip
    b.append(("table", head, rows))
    b.append(("p", evidence.method_note(comparison)))
    b.append(
        (
            "p",
            "AIC is the average inconsistency |score - IoU| of the detections (lower is better); "
            f"spearman is the rank correlation of score and IoU (higher is better). 'diff' is {column} minus "
            "baseline over the paired seeds, the estimate its interval is about (mean, or Hodges-Lehmann "
            f"pseudo-median beside a Wilcoxon interval); 'seeds better' counts the seeds where {column} > baseline.",
        )
    )
    b.append(("h", 3, "Per seed"))
    rows = []
    for seed in seeds:
        row = [str(seed)]
        for metric, comp in comparison.items():
            scale, digits = scale_of(metric)
            pair = comp["per_seed"].get(seed, {})
            treatment, baseline = pair.get("treatment"), pair.get("baseline")
            row.append(f"{points(treatment, scale, digits)} / {points(baseline, scale, digits)}")
        rows.append(row)
    b.append(("table", ["seed", *[f"{m} {column} / baseline" for m in comparison]], rows))
    return b


def _blocks(summary: SearchSummary, plots: Mapping[str, str]) -> list[Block]:
    """The report as a list of blocks: ("h", level, text), ("p", text), ("table", head, rows),
    ("img", alt, path), ("pre", text)."""
    b: list[Block] = []
    b.append(("h", 1, f"HarmonicDet search report: {summary.experiment}"))
    state = "complete" if summary.complete else "INTERRUPTED (resume with `hdet run SPEC --resume`)"
    wall = f", {summary.wall_s / 60:.1f} min" if math.isfinite(summary.wall_s) else ""
    b.append(
        (
            "p",
            f"Parent run `{summary.parent_run_id}`: {state}. {len(summary.trials)} configurations, "
            f"{summary.algorithm} search with {summary.scheduler} scheduling, {summary.epochs} epochs, "
            f"seeds {summary.seeds}{wall}. AP is COCO AP@[.5:.95] of the last epoch, in points.",
        )
    )
    best, base = summary.best, summary.baseline

    b.append(("h", 2, "Best configuration"))
    if best is None:
        b.append(("p", "No configuration completed the full schedule."))
    else:
        rows = [[k, fmt_value(v)] for k, v in best.params.items()]
        rows.append(["AP (mean ± sd over seeds)", seed_mean_sd(best, "AP")])
        rows.append(["trial", best.trial_id])
        b.append(("table", ["parameter", "value"], rows))

    tables = comparison_tables(summary)
    head, rows, note = ranking_table(summary)
    if rows:
        b.append(("h", 2, f"Arms ranked against the standard loss, on the {summary.judged_on} split"))
        b.append(("table", head, rows))
        b.append(("p", note))
    if base is not None and tables:
        for ct in tables:
            b.append(
                (
                    "h",
                    2,
                    f"{ct.heading} vs the standard loss, paired over seeds, on the {summary.judged_on} split",
                )
            )
            b.extend(
                _comparison_blocks(
                    ct.table, ct.column, summary.objective, ct.seeds, convergence_lines(summary, ct), ct.label
                )
            )
            for title, sentence in score_thresh_lines(summary, ct):
                b.append(("h", 3, title[0].upper() + title[1:] + " (secondary)"))
                b.append(("p", sentence))
        for line in confirmation_lines(summary):
            b.append(("p", line[0].upper() + line[1:]))
        if "paired_differences" in plots:
            b.append(("img", "paired differences per seed", plots["paired_differences"]))
    elif base is not None and base.status == "failed":
        b.append(("p", f"The baseline failed: {base.error}"))

    if summary.ap_vs_iou:
        b.append(("h", 2, "AP at each IoU threshold"))
        labels = list(summary.ap_vs_iou)
        thresholds = sorted({t for c in summary.ap_vs_iou.values() for t in c})
        rows = []
        for t in thresholds:
            vals = [summary.ap_vs_iou[label].get(t) for label in labels]
            row = [f"{t:.2f}", *[points(v) for v in vals]]
            if len(labels) == 2 and None not in vals:
                row.append(points(vals[0] - vals[1], sign=True))  # type: ignore[operator]
            rows.append(row)
        head = ["IoU", *labels] + (["difference"] if len(labels) == 2 else [])
        b.append(("table", head, rows))
        if "ap_vs_iou" in plots:
            b.append(("img", "AP vs IoU threshold", plots["ap_vs_iou"]))

    sens = summary.sensitivity
    if sens.get("n_configs"):
        b.append(("h", 2, "Sensitivity"))
        b.append(
            (
                "p",
                f"{sens['n_within']} of {sens['n_configs']} configurations that trained the full schedule "
                f"({100 * sens['share_within']:.0f}%) are within {100 * sens['tolerance']:.1f} AP of the best"
                + (f"; {sens['n_failed']} failed" if sens.get("n_failed") else "")
                + ".",
            )
        )
        rows = [[name, f"{p['spearman']:+.2f}" if math.isfinite(p["spearman"]) else "-", str(len(p["values"]))]
                for name, p in sens.get("params", {}).items()]  # fmt: skip
        b.append(("table", ["parameter", "Spearman rho with AP", "configurations"], rows))
        if "sensitivity" in plots:
            b.append(("img", "sensitivity of AP to each parameter", plots["sensitivity"]))

    b.append(("h", 2, "Trials"))
    rows = []
    fixed = (summary.confirmatory, *summary.arms, summary.best_confirmed, base)
    records: list[TrialRecord] = [*summary.trials, *(r for r in fixed if r is not None)]
    for rec in records:
        rows.append(
            [
                rec.trial_id,
                rec.status,
                f"loss {arm_label(rec.params)}"
                if rec.arm == LISTED_ARM
                else ", ".join(f"{k}={fmt_value(v)}" for k, v in rec.params.items()),
                points(rec.objective)
                + (f" ± {points(rec.objective_std)}" if rec.objective_std is not None else ""),
                str(rec.epochs),
                str(rec.epochs_run),
                num(rec.wall_s),
                num(rec.cpu_s),
                num(rec.gpu_s),
                num(rec.first_step_s, 1),
                (rec.error or "")[:200],
            ]
        )
    b.append(
        (
            "table",
            ["trial", "status", "configuration", "AP", "epochs", "epochs run (all seeds)", "wall s", "CPU s",
             "GPU s", "start s", "error"],
            rows,
        )
    )  # fmt: skip
    b.append(
        (
            "p",
            "wall s: the trial's wall time; CPU s / GPU s: resources allocated to its trainers x their "
            "wall time; start s: from the trial's start to its first training step.",
        )
    )
    return b


def render_markdown(summary: SearchSummary, plots: Mapping[str, str] | None = None) -> str:
    """The report as Markdown; ``plots`` maps plot name (``ap_vs_iou``, ``sensitivity``,
    ``paired_differences``) to an image path relative to the report."""
    out: list[str] = []
    for block in _blocks(summary, plots or {}):
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            head, rows = block[1], block[2]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            for row in rows:
                out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
        elif kind == "img":
            out.append(f"![{block[1]}]({block[2]})")
        out.append("")
    return "\n".join(out)


def render_html(summary: SearchSummary, plots: Mapping[str, str] | None = None) -> str:
    """The report as a standalone HTML page (images referenced next to it)."""
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(summary.experiment)}: HarmonicDet search report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
    ]
    for block in _blocks(summary, plots or {}):
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block[1]) + "</tr>")
            for row in block[2]:
                out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif kind == "img":
            out.append(f"<p><img alt='{e(block[1])}' src='{e(block[2])}'></p>")
    out.append("</body></html>")
    return "\n".join(out)
