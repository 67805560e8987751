"""The evidence plots of a search: AP vs IoU, sensitivity, paired differences, the mechanism.
Drawn from a SearchSummary by harmonic's plotting functions, imported (with matplotlib) only when drawing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.summary import SearchSummary

__all__ = ["draw_plots"]


def draw_plots(summary: SearchSummary, out: Path) -> dict[str, Path]:
    """The evidence plots of a summary into ``out``: name -> file."""
    from harmonic.plots import plot_ap_vs_iou
    from harmonic.plots_evidence import plot_mechanism, plot_paired_differences, plot_sensitivity

    plots: dict[str, Path] = {}
    if summary.ap_vs_iou:
        ref = "baseline (standard)" if "baseline (standard)" in summary.ap_vs_iou else None
        plots["ap_vs_iou"] = plot_ap_vs_iou(
            summary.ap_vs_iou, out / "ap_vs_iou.png", reference=ref,
            title="AP at each IoU threshold (mean over seeds)",
        )  # fmt: skip
    if summary.sensitivity.get("params"):
        base = summary.baseline.objective if summary.baseline else None
        plots["sensitivity"] = plot_sensitivity(summary.sensitivity, out / "sensitivity.png", baseline=base)
    split = summary.judged_on
    if summary.confirmatory_comparison:
        plots["confirmatory_differences"] = plot_paired_differences(
            summary.confirmatory_comparison, out / "confirmatory_differences.png",
            title=f"Confirmatory configuration - baseline, per seed ({split})",
        )  # fmt: skip
    if summary.comparison:
        plots["paired_differences"] = plot_paired_differences(
            summary.comparison, out / "paired_differences.png",
            title=f"Best configuration - baseline, per seed ({split})",
        )  # fmt: skip
    if summary.mechanism:
        plots["mechanism"] = plot_mechanism(summary.mechanism, out / "mechanism.png")
    return plots
