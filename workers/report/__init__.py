"""Every renderer of a search's evidence: the report document, the terminal table, the plots.
Renderers read a :class:`workers.summary.SearchSummary`; ``hdet report`` rebuilds one from MLflow.

* :mod:`workers.report.document`: Markdown and HTML (:func:`render_markdown`, :func:`render_html`).
* :mod:`workers.report.text`: the plain-text table printed at the end of a search (:func:`format_table`).
* :mod:`workers.report.tables`: which comparison tables a summary holds, in the order both show them.
* :mod:`workers.report.plots`: the evidence plots (:func:`draw_plots`).
* :mod:`workers.report.cli`: ``hdet report`` (:func:`main`, :func:`build_report`) and the evidence
  folder a search logs (:func:`write_evidence`).

Imports go one way: this package imports :mod:`workers.summary`, never the reverse at module level.
"""

from workers.report.cli import build_report, find_parent_run, main, write_evidence
from workers.report.document import render_html, render_markdown
from workers.report.plots import draw_plots
from workers.report.text import format_table

__all__ = [
    "main",
    "build_report",
    "find_parent_run",
    "write_evidence",
    "render_markdown",
    "render_html",
    "format_table",
    "draw_plots",
]
