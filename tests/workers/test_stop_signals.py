"""``hdet run`` stopped by a signal, on a real local Ray and MLflow: SIGTERM (``docker stop``,
Kubernetes) during a single training run and SIGINT (Ctrl-C, ``ray job stop``) during a
comparison end every run still running ``KILLED`` with the signal named, and exit 128 + signal."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hdet_run import start_spec
from mlflow import MlflowClient

BASE: dict[str, Any] = {
    "dataset": {"format": "synthetic", "train": 16, "val": 4, "test": 4, "image_size": 48, "seed": 0},
    "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 48},
    "loss": {"kind": "harmonicdet"},
    # long enough that the signal arrives while it trains
    "train": {"epochs": 30, "batch_size": 4, "lr": 0.01, "warmup": {"iters": 1, "factor": 0.5}},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 0},
    "tracking": {"experiment": "stop-test"},
}


def _start(home: Path, spec: dict[str, Any]) -> subprocess.Popen[str]:
    path = home / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return start_spec(home, path, log=home / "run.log")


def _runs(c: MlflowClient) -> list[Any]:
    exp = c.get_experiment_by_name("stop-test")
    return [] if exp is None else c.search_runs([exp.experiment_id])


def _stop_once_training(home: Path, proc: subprocess.Popen[str], sig: signal.Signals, children: int) -> float:
    """Send ``sig`` once ``children`` child runs have logged an epoch; seconds until the exit."""
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (home / "mlflow.db").exists():
            trained = [
                r for r in _runs(c) if r.data.tags.get("hdet.role") == "child" and "epoch" in r.data.metrics
            ]
            if len(trained) >= children:
                break
        time.sleep(1.0)
    assert proc.poll() is None, (
        "the run ended before it could be stopped:\n" + (home / "run.log").read_text()[-3000:]
    )
    t0 = time.time()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"hdet run did not exit within 60 s of {sig.name}")
    return time.time() - t0


def _assert_all_killed(home: Path, sig: signal.Signals, min_children: int) -> None:
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = _runs(c)
    log = (home / "run.log").read_text()
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == [], log[-3000:]
    parents = [r for r in runs if r.data.tags.get("hdet.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hdet.role") == "child"]
    assert len(parents) == 1 and len(children) >= min_children
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags["hdet.error"] == f"stopped by {sig.name}"
    assert {r.info.status for r in children} == {"KILLED"}, [
        (r.info.run_name, r.info.status) for r in children
    ]
    assert f"stopped by {sig.name}" in log


def test_sigterm_ends_a_single_run_and_its_child_run_killed(
    tmp_path: Path, left_running: Callable[[Path], list[str]]
) -> None:
    proc = _start(tmp_path, {**BASE, "name": "single"})
    took = _stop_once_training(tmp_path, proc, signal.SIGTERM, children=1)
    assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()[-3000:]
    assert took < 45
    _assert_all_killed(tmp_path, signal.SIGTERM, min_children=1)
    assert left_running(tmp_path) == []  # nothing the run started outlives it


def test_sigint_ends_a_comparison_and_every_arm_killed(
    tmp_path: Path, left_running: Callable[[Path], list[str]]
) -> None:
    spec = {
        **BASE,
        "name": "compare",
        "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
    }
    proc = _start(tmp_path, spec)
    took = _stop_once_training(tmp_path, proc, signal.SIGINT, children=2)
    assert proc.returncode == 128 + signal.SIGINT, (tmp_path / "run.log").read_text()[-3000:]
    assert took < 45
    _assert_all_killed(tmp_path, signal.SIGINT, min_children=2)
    assert left_running(tmp_path) == []  # nothing the run started outlives it
