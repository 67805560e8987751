"""A suite file through `hdet run` on a real local Ray and MLflow: a comparison without a search
(baseline vs the spec's own loss on the same seeds, judged on the held-out test split), then a
single training run; every dataset is checked before the first experiment starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faults
import yaml
from hdet_run import TINY, run_spec
from mlflow import MlflowClient

BASE: dict[str, Any] = {**TINY, "tracking": {"experiment": "suite-test"}}
COMPARISON = {
    **BASE,
    "name": "compare",
    "eval": {"extra_score_thresholds": [0.001]},  # the test split judged at 0.05 and 0.001
    "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
}
SINGLE = {**BASE, "name": "single"}


def test_a_suite_runs_a_comparison_then_a_singlerun_spec(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump_all([COMPARISON, {**SINGLE, "dataset": {"format": "coco", "root": "/nope"}}])
    )
    refused = run_spec(tmp_path, bad)
    assert refused.returncode == 2 and "#2: dataset.root" in refused.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started, nothing half-made

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump_all([COMPARISON, SINGLE]))
    done = run_spec(tmp_path, suite)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "experiment 1/2: compare" in out and "experiment 2/2: single" in out
    assert "no detectable difference" in out  # 2 seeds of 1 epoch cannot show one
    assert "verdict at score threshold 0.001: AP (secondary: not part of the primary's verdict" in out

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("suite-test")
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    parents = {r.data.tags["hdet.spec_name"]: r for r in runs if r.data.tags.get("hdet.role") == "parent"}
    assert set(parents) == {"compare", "single"}
    arms = sorted(
        (r.data.tags["hdet.arm"], r.data.tags["hdet.seed"])
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents["compare"].info.run_id
    )
    assert arms == [("baseline", "0"), ("baseline", "1"), ("confirmatory", "0"), ("confirmatory", "1")]
    compared = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["compare"].info.run_id]
    for run in compared:  # every test metric also at 0.001, from the same inference (more boxes kept)
        m = run.data.metrics
        main = {k for k in m if k.startswith("test_") and not k.endswith("_thr0.001")}
        assert {f"{k}_thr0.001" for k in main} <= set(m) and "test_ap_iou_50_thr0.001" in m
        assert m["test_AR100_thr0.001"] >= m["test_AR100"]
    summary = json.loads(
        Path(c.download_artifacts(parents["compare"].info.run_id, "evidence/summary.json")).read_text()
    )
    assert summary["trials"] == [] and summary["judged_on"] == "test"
    comp = summary["confirmatory_comparison"]["AP"]
    conf, base = summary["confirmatory"]["per_seed"], summary["baseline"]["per_seed"]
    diffs = [conf[s]["test_AP"] - base[s]["test_AP"] for s in ("0", "1")]
    assert comp["n_pairs"] == 2 and abs(comp["mean_diff"] - sum(diffs) / 2) < 1e-12
    assert summary["comparison"] == {}  # no search, no best configuration
    at_001 = summary["at_score_thresholds"]["0.001"]["confirmatory_comparison"]["AP"]
    diffs = [conf[s]["test_AP_thr0.001"] - base[s]["test_AP_thr0.001"] for s in ("0", "1")]
    assert at_001["n_pairs"] == 2 and abs(at_001["mean_diff"] - sum(diffs) / 2) < 1e-12
    report = Path(c.download_artifacts(parents["compare"].info.run_id, "evidence/report.md")).read_text()
    assert "### Verdict at score threshold 0.001 (secondary)" in report
    assert "confirmatory_diff_AP_thr0.001" in parents["compare"].data.metrics


def test_a_comparison_whose_arms_failed_is_a_failed_experiment(tmp_path: Path) -> None:
    """No evidence without both sides: exit 1, naming the arms, and the parent run ends FAILED."""
    spec = tmp_path / "fail.yaml"
    spec.write_text(yaml.safe_dump({**COMPARISON, "name": "compare-fails"}))
    plan = tmp_path / "faults.json"
    with faults.installed(plan), faults.planned(plan, nonfinite_step=0):  # every training fails
        done = run_spec(tmp_path, spec)
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]
    assert "the comparison has no result" in done.stderr
    assert "baseline: " in done.stderr and "confirmatory: " in done.stderr
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("suite-test")
    assert exp is not None
    (parent,) = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hdet.role") == "parent"]
    assert parent.info.status == "FAILED"
