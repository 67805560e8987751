"""A real search on a real local Ray and MLflow: ASHA over 4 trials, interrupted, resumed, reported.

One scenario proves the search's contract end to end (it is the expensive part, ~3 minutes on 2
cores):

1. ``hdet run`` starts a search of 4 configurations (2 of them with a learning rate that makes
   the loss non-finite) plus the standard-loss baseline and the confirmatory arm (the spec's own
   loss section), and is interrupted (SIGINT) once two trainings have finished and a search trial's
   training waits at the start of its last epoch (a fault: :mod:`faults`);
2. ``hdet run --resume`` finishes it: that training resumes from its checkpoint, and its trial still
   reports every epoch to Tune (the epochs before the checkpoint come from its child run);
3. nothing either run started is left running; MLflow then holds one child run per trial (never a second one), the finished trials were not
   trained again, the failed ones carry their reason, and the summary on the parent run agrees
   with the child runs' own metrics, judged on the held-out test split; ``hdet report`` renders it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults
import pytest
import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2

SPEC: dict[str, Any] = {
    "name": "search-test",
    "dataset": {"format": "synthetic", "train": 8, "val": 4, "image_size": 48, "seed": 0},
    "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 48},
    "loss": {"kind": "harmonicdet"},
    "train": {"epochs": EPOCHS, "batch_size": 4, "lr": 0.01, "warmup": {"iters": 1, "factor": 0.5}},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 0},
    "search": {
        "space": {"alpha": {"uniform": [0.5, 2.5]}, "train.lr": {"grid": [0.01, 1.0e12]}},
        "algorithm": "random",
        "scheduler": "asha",
        "num_samples": 2,
        "max_concurrent": 1,
        "seeds": [0],
        "baseline": True,
        "confirmatory": True,
        "confirm_best": False,  # the confirmation on fresh seeds: tests/search/test_confirm_best_on_ray.py
    },
    "tracking": {"experiment": "search-test"},
}


def _hdet_run(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HDET_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "workers.run", str(home / "spec.yaml"), "--tracking-uri", _uri(home),
           "--storage-path", str(home / "storage"), *args]  # fmt: skip
    log = open(home / f"run{len(list(home.glob('run*.log')))}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def _children(c: MlflowClient) -> list[Any]:
    exp = c.get_experiment_by_name("search-test")
    if exp is None:
        return []
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hdet.role") == "child"]


@pytest.fixture(scope="module")
def searched(
    request: pytest.FixtureRequest,
    scratch: Callable[[pytest.FixtureRequest, str], Path],
    left_running: Callable[[Path], list[str]],
) -> dict[str, Any]:
    home = scratch(request, "search_home")
    (home / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    c = MlflowClient(tracking_uri=_uri(home))

    plan, hung = home / "faults.json", home / "hung"
    with (
        faults.installed(plan),
        faults.planned(
            plan, hang_after_epoch=EPOCHS - 1, hang_marker=str(hung), hang_skip=("baseline", "confirmatory")
        ),
    ):
        first = _hdet_run(home)
        finished_before: dict[str, Any] = {}
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            done = [r for r in _children(c) if r.info.status == "FINISHED"]
            if len(done) >= 2 and hung.exists():
                finished_before = {r.info.run_id: r for r in done}
                break
            time.sleep(1.0)
        assert first.poll() is None, "the search ended before it could be interrupted"
        assert len(finished_before) >= 2 and hung.exists()
        first.send_signal(signal.SIGINT)
        rc_first = first.wait(timeout=180)

    second = _hdet_run(home, "--resume")
    rc_second = second.wait(timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(home.glob("run*.log")))
    return {
        "left_running": left_running(home),
        "home": home,
        "hung": hung.read_text().split()[0],  # the run key of the training that hung
        "client": c,
        "finished_before": finished_before,
        "rc": (rc_first, rc_second),
        "logs": logs,
    }


def _parent(c: MlflowClient) -> Any:
    exp = c.get_experiment_by_name("search-test")
    assert exp is not None
    parents = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hdet.role") == "parent"]
    assert len(parents) == 1, "the resumed search must reuse its parent run"
    return parents[0]


def test_resumed_search_completes_with_one_child_run_per_trial_and_seed(searched: dict[str, Any]):
    assert searched["rc"][1] == 0, searched["logs"][-4000:]
    c = searched["client"]
    children = _children(c)
    keys = [r.data.tags["hdet.run_key"] for r in children]
    assert len(keys) == len(set(keys)), f"duplicated child runs: {sorted(keys)}"
    trials = {r.data.tags["hdet.trial_id"] for r in children if r.data.tags.get("hdet.arm") == "search"}
    assert len(trials) == 4
    for arm in ("baseline", "confirmatory"):
        assert {r.data.tags["hdet.trial_id"] for r in children if r.data.tags.get("hdet.arm") == arm} == {arm}
    parent = _parent(c)
    assert parent.data.tags["hdet.search_complete"] == "true"


def test_nothing_of_the_interrupted_or_the_resumed_run_is_left_running(searched: dict[str, Any]):
    assert searched["left_running"] == [], searched["logs"][-3000:]


def test_finished_trials_were_not_trained_again(searched: dict[str, Any]):
    c = searched["client"]
    for run_id, before in searched["finished_before"].items():
        after = c.get_run(run_id)
        assert after.info.status == "FINISHED"
        assert after.info.end_time == before.info.end_time, "a finished training ran again after resume"
        assert after.data.tags.get("hdet.starts") == "1"
        epochs = [m.step for m in c.get_metric_history(run_id, "epoch")]
        assert sorted(epochs) == list(range(1, EPOCHS + 1))


def test_a_trial_resumed_from_its_checkpoint_reported_every_epoch_to_tune(searched: dict[str, Any]):
    c = searched["client"]
    run = next(r for r in _children(c) if r.data.tags["hdet.run_key"] == searched["hung"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("hdet.resumed_from_epoch") == str(EPOCHS - 1), run.data.tags
    ap = {int(m.step): m.value for m in c.get_metric_history(run.info.run_id, "AP")}
    assert sorted(ap) == list(range(1, EPOCHS + 1))
    trial_id = run.data.tags["hdet.trial_id"]
    (result_file,) = (searched["home"] / "storage").glob(f"search-test-search-*/*{trial_id}*/result.json")
    reported = {}
    for line in result_file.read_text().splitlines():
        row = json.loads(line)
        if "epoch" in row and "AP" in row:
            reported[int(row["epoch"])] = row["AP"]
    # one seed: the trial's mean is that seed's AP, for the epoch before the checkpoint too
    assert sorted(reported) == list(range(1, EPOCHS + 1)), reported
    for epoch, value in ap.items():
        assert reported[epoch] == pytest.approx(value)


def test_failed_trials_carry_their_reason_and_the_search_went_on(searched: dict[str, Any]):
    c = searched["client"]
    summary = json.loads(
        Path(c.download_artifacts(_parent(c).info.run_id, "evidence/summary.json")).read_text()
    )
    by_lr = {}
    for t in summary["trials"]:
        by_lr.setdefault(t["params"]["train.lr"], []).append(t)
    assert all(t["status"] == "failed" for t in by_lr[1.0e12])
    assert all(
        "non-finite" in (t["error"] or "").lower() or "nan" in (t["error"] or "").lower()
        for t in by_lr[1.0e12]
    )
    assert all(t["status"] in ("completed", "stopped") for t in by_lr[0.01])
    assert any(t["status"] == "completed" for t in by_lr[0.01])


def test_summary_agrees_with_the_child_runs(searched: dict[str, Any]):
    c = searched["client"]
    parent = _parent(c)
    summary = json.loads(Path(c.download_artifacts(parent.info.run_id, "evidence/summary.json")).read_text())
    best = next(t for t in summary["trials"] if t["trial_id"] == summary["best_trial_id"])
    assert best["status"] == "completed"
    for rec in (best, summary["baseline"]):
        for seed, run_id in rec["child_runs"].items():
            run = c.get_run(run_id)
            assert run.data.tags["hdet.seed"] == seed
            for metric in ("AP", "AP50", "AP75", "AP90"):
                assert rec["per_seed"][seed][metric] == pytest.approx(run.data.metrics[metric])
            assert run.data.metrics["epoch"] == EPOCHS
    assert best["objective"] == pytest.approx(c.get_run(best["child_runs"]["0"]).data.metrics["AP"])
    # judged on the held-out test split, not on val where the best configuration was selected
    assert summary["judged_on"] == "test"
    base = summary["baseline"]["per_seed"]["0"]
    diff = summary["comparison"]["AP"]["mean_diff"]
    assert diff == pytest.approx(best["per_seed"]["0"]["test_AP"] - base["test_AP"])
    assert parent.data.metrics["diff_AP"] == pytest.approx(diff)
    conf = summary["confirmatory"]
    assert conf["status"] == "completed" and conf["params"] == {}
    assert summary["confirmatory_comparison"]["AP"]["mean_diff"] == pytest.approx(
        conf["per_seed"]["0"]["test_AP"] - base["test_AP"]
    )
    assert set(summary["mechanism"]) >= {"baseline (standard)", "confirmatory (harmonic)"}
    assert parent.data.params["best.loss.alpha"] == str(best["params"]["loss.alpha"])
    names = {a.path for a in c.list_artifacts(parent.info.run_id, "evidence")}
    assert {
        "evidence/ap_vs_iou.png",
        "evidence/report.md",
        "evidence/summary.json",
        "evidence/mechanism.png",
    } <= names
    for t in summary["trials"]:
        assert t["wall_s"] > 0 and t["cpu_s"] >= 0


def test_report_renders_from_mlflow_alone(searched: dict[str, Any], tmp_path: Path):
    from workers.report import main as report_main

    out = tmp_path / "report"
    rc = report_main(["search-test", "--tracking-uri", _uri(searched["home"]), "--out", str(out)])
    assert rc == 0
    text = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_trial_id"] in text
    assert "Best configuration vs the standard loss" in text and "ap_vs_iou.png" in text
    assert (out / "ap_vs_iou.png").stat().st_size > 0
    html_rc = report_main(
        ["search-test", "--tracking-uri", _uri(searched["home"]), "--out", str(out), "--format", "html"]
    )
    assert html_rc == 0 and "<table>" in (out / "report.html").read_text()
    assert (
        report_main(["no-such-experiment", "--tracking-uri", _uri(searched["home"]), "--out", str(out)]) == 2
    )
