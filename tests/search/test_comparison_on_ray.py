"""A suite file through `hdet run` on a real local Ray and MLflow: a comparison without a search
(baseline vs the spec's own loss on the same seeds, judged on the held-out test split), then a
single training run; every dataset is checked before the first experiment starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "dataset": {"format": "synthetic", "train": 8, "val": 4, "test": 4, "image_size": 48, "seed": 0},
    "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 48},
    "loss": {"kind": "harmonicdet"},
    "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup": {"iters": 1, "factor": 0.5}},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 0},
    "tracking": {"experiment": "suite-test"},
}
COMPARISON = {
    **BASE,
    "name": "compare",
    "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
}
SINGLE = {**BASE, "name": "single"}


def _run(home: Path, spec: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HDET_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "workers.run", str(spec), "--tracking-uri", f"sqlite:///{home / 'mlflow.db'}",
           "--storage-path", str(home / "storage")]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_suite_runs_a_comparison_then_a_single_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump_all([COMPARISON, {**SINGLE, "dataset": {"format": "coco", "root": "/nope"}}])
    )
    refused = _run(tmp_path, bad)
    assert refused.returncode == 2 and "#2: dataset.root" in refused.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started, nothing half-made

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump_all([COMPARISON, SINGLE]))
    done = _run(tmp_path, suite)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "experiment 1/2: compare" in out and "experiment 2/2: single" in out
    assert "no detectable difference" in out  # 2 seeds of 1 epoch cannot show one

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
    summary = json.loads(
        Path(c.download_artifacts(parents["compare"].info.run_id, "evidence/summary.json")).read_text()
    )
    assert summary["trials"] == [] and summary["judged_on"] == "test"
    comp = summary["confirmatory_comparison"]["AP"]
    conf, base = summary["confirmatory"]["per_seed"], summary["baseline"]["per_seed"]
    diffs = [conf[s]["test_AP"] - base[s]["test_AP"] for s in ("0", "1")]
    assert comp["n_pairs"] == 2 and abs(comp["mean_diff"] - sum(diffs) / 2) < 1e-12
    assert summary["comparison"] == {}  # no search, no best configuration


def test_a_comparison_whose_arms_failed_is_a_failed_experiment(tmp_path: Path) -> None:
    """No evidence without both sides: exit 1, naming the arms, and the parent run ends FAILED."""
    spec = tmp_path / "fail.yaml"
    failing = {
        **COMPARISON,
        "name": "compare-fails",
        "train": {**BASE["train"], "debug": {"nonfinite_step": 0}},
    }
    spec.write_text(yaml.safe_dump(failing))
    done = _run(tmp_path, spec)
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]
    assert "the comparison has no result" in done.stderr
    assert "baseline: " in done.stderr and "confirmatory: " in done.stderr
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("suite-test")
    assert exp is not None
    (parent,) = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hdet.role") == "parent"]
    assert parent.info.status == "FAILED"
