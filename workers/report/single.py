"""``hdet report`` for a single training run (a spec without a search section): its final metrics,
its per-epoch history, its plots, where its checkpoint is and how to draw its detections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.tracking import Artifact, Tag

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["build_run_report", "FINAL_METRICS"]

#: The final metrics a run report lists, in this order (those the run has).
FINAL_METRICS = (
    "AP", "AP50", "AP75", "AP90", "aic", "spearman",
    "test_AP", "test_AP50", "test_AP75", "test_AP90", "test_aic",
    "train_aic", "train_pushed_down_share", "train_mean_score", "images_per_s",
)  # fmt: skip
_HISTORY = ("loss", "AP", "AP50", "AP90", "aic", "train_pushed_down_share", "images_per_s")


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def build_run_report(c: MlflowClient, parent_run_id: str, out_dir: Path) -> Path:
    """Write ``report.md`` (and the run's plots) for the single run under ``parent_run_id``."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent = c.get_run(parent_run_id)
    children = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    )
    tags = parent.data.tags
    lines = [
        f"# {tags.get(Tag.SPEC_NAME, parent.info.run_name)}: one training run",
        "",
        f"- parent run `{parent_run_id}` ({parent.info.status}); arch `{tags.get(Tag.ARCH)}`, "
        f"loss `{tags.get(Tag.LOSS)}`, dataset `{tags.get(Tag.DATASET)}`",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in children:
        rid, m = run.info.run_id, run.data.metrics
        lines += [
            f"- training run `{rid}` ({run.info.status})"
            + (f": {run.data.tags[Tag.ERROR]}" if Tag.ERROR in run.data.tags else ""),
            f"- checkpoint: `runs:/{rid}/{Artifact.CHECKPOINT_DIR}` (`{Artifact.MODEL_FILE}` + "
            f"`{Artifact.MODEL_INFO_FILE}`); draw it: `hdet predict --run {rid} IMAGE...`",
            "",
            "## Final metrics",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {_fmt(m[k])} |" for k in FINAL_METRICS if k in m),
            "",
            "## Per epoch",
            "",
            "| epoch | " + " | ".join(_HISTORY) + " |",
            "|---" * (len(_HISTORY) + 1) + "|",
        ]
        history: dict[int, dict[str, float]] = {}
        for key in _HISTORY:
            for point in c.get_metric_history(rid, key):
                history.setdefault(int(point.step), {})[key] = point.value
        for epoch in sorted(history):
            lines.append(f"| {epoch} | " + " | ".join(_fmt(history[epoch].get(k)) for k in _HISTORY) + " |")
        plots = _download_plots(c, rid, out_dir)
        if plots:
            lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
        (out_dir / "metrics.json").write_text(json.dumps({"run_id": rid, "final": dict(m)}, indent=2))
    if not children:
        lines += ["", "No training run has started under this parent run."]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _download_plots(c: Any, run_id: str, out_dir: Path) -> list[Path]:
    try:
        local = Path(c.download_artifacts(run_id, "plots", str(out_dir / ".artifacts")))
    except Exception:  # a run that ended before its plots were drawn
        return []
    plots = []
    for f in sorted(local.glob("*.png")):
        dst = out_dir / f.name
        dst.write_bytes(f.read_bytes())
        plots.append(dst)
    return plots
