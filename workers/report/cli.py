"""``hdet report EXPERIMENT``: an experiment's report from MLflow alone: a search's evidence (Markdown
or HTML), or a single run's metrics, history, plots and checkpoint; also a search's ``evidence/``.

The report is rebuilt from the tracking server only: the parent run (its params, tags and
``evidence/`` artifacts) and its child runs (one per trial and seed, with their metrics and
tags), so it works for a search that ran on any cluster, and for one that was interrupted
(``complete: false``; what finished so far is shown). The plots are drawn again from the same
numbers into the output folder next to the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from workers.report.document import render_html, render_markdown
from workers.report.plots import draw_plots
from workers.report.text import format_table
from workers.tracking import PARENT_ROLE, Tag

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from workers.summary import SearchSummary

__all__ = ["main", "build_report", "find_parent_run", "write_evidence"]


def write_evidence(summary: SearchSummary, out: Path) -> None:
    """The rendered evidence of a search into ``out``: its plots, ``report.md`` and ``table.txt``
    (what :func:`workers.summary.log_summary` logs under ``evidence/`` next to ``summary.json``)."""
    plots = draw_plots(summary, out)
    (out / "report.md").write_text(render_markdown(summary, {k: v.name for k, v in plots.items()}))
    (out / "table.txt").write_text(format_table(summary) + "\n")


def find_parent_run(c: MlflowClient, experiment: str, run_id: str | None = None) -> tuple[str, str, bool]:
    """The experiment id, its latest parent run (or ``run_id``) and whether that run is a search.

    Raises:
        LookupError: no such experiment or run; the message says which and lists what there is.
    """
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(x.name for x in c.search_experiments() if x.name != "Default")
        raise LookupError(f"no MLflow experiment {experiment!r} (experiments: {', '.join(names) or 'none'})")
    if run_id:
        run = c.get_run(run_id)
        if run.info.experiment_id != exp.experiment_id:
            raise LookupError(f"run {run_id} is not in experiment {experiment!r}")
        return str(exp.experiment_id), run_id, Tag.SEARCH_COMPLETE in run.data.tags
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{Tag.ROLE}` = '{PARENT_ROLE}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise LookupError(f"experiment {experiment!r} has no run of hdet run")
    return str(exp.experiment_id), str(runs[0].info.run_id), Tag.SEARCH_COMPLETE in runs[0].data.tags


def build_report(
    c: MlflowClient, experiment: str, out_dir: Path, *, fmt: str = "md", run_id: str | None = None
) -> Path:
    """Write ``report.md`` (or ``report.html``) and its plots into ``out_dir``; returns the report file."""
    from workers.summary import collect_summary

    exp_id, parent, is_search = find_parent_run(c, experiment, run_id)
    if not is_search:
        from workers.report.single import build_run_report

        return build_run_report(c, parent, out_dir)
    summary = collect_summary(c, exp_id, parent, experiment=experiment)
    wall = c.get_run(parent).data.metrics.get("search_wall_s")
    if wall is not None:
        summary.wall_s = wall
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(summary, out_dir)
    rel = {k: v.name for k, v in plots.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    path = out_dir / f"report.{fmt}"
    path.write_text(render_markdown(summary, rel) if fmt == "md" else render_html(summary, rel))
    return path


def main(argv: list[str] | None = None) -> int:
    """``hdet report EXPERIMENT [--tracking-uri URI] [--run RUN_ID] [--format md|html] [--out DIR]``."""
    p = argparse.ArgumentParser(
        prog="hdet report",
        description=(
            "Render an experiment's report from MLflow: a search's evidence (Markdown or HTML), or a single "
            "run's metrics, history, plots and checkpoint (Markdown). Writes ./report-EXPERIMENT/ unless --out."
        ),
    )
    p.add_argument("experiment", help="MLflow experiment name (the spec's tracking.experiment)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local store)"
    )
    p.add_argument("--run", help="parent run id (default: the experiment's latest run of hdet run)")
    p.add_argument("--format", choices=("md", "html"), default="md")
    p.add_argument("--out", help="output folder (default: ./report-EXPERIMENT)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    import os

    from workers.env import default_tracking_uri
    from workers.tracking import client

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    where = (
        "run hdet report from the directory the experiment ran from, set HDET_HOME, or pass --tracking-uri"
    )
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # Never create an empty store: say where the store was looked for.
        print(f"hdet report: no MLflow store at {uri[len('sqlite:///') :]}; {where}", file=sys.stderr)
        return 2
    out = Path(args.out or f"report-{args.experiment}")
    try:
        path = build_report(client(uri), args.experiment, out, fmt=args.format, run_id=args.run)
    except LookupError as e:
        print(f"hdet report: {e.args[0]} in {uri}; {where}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
