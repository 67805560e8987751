"""scripts/evidence_local.py: a comparison's trainings in plain processes (no Ray, no MLflow), one JSON
line each, a rerun trains only what is missing, and the evidence table of the lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "evidence_local.py"

SUITE = {
    "name": "local-tiny",
    "dataset": {"format": "synthetic", "train": 16, "val": 8, "test": 16, "image_size": 64, "seed": 0,
                "synth": {"max_objects": 2, "min_scale": 0.2, "max_scale": 0.35}},
    "pretrain": {"task": "segment", "images": 32, "val_images": 8, "seed": 1000, "epochs": 1, "batch_size": 16,
                 "synth": {"max_objects": 2, "min_scale": 0.2, "max_scale": 0.35}},
    "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 64},
    "loss": {"kind": "harmonicdet", "alpha": 1.5, "gamma": 0.8, "margin": 0.2},
    "train": {"epochs": 2, "batch_size": 4, "lr": 0.001, "optimizer": "adamw"},
    "scaling": {"num_workers": 1, "use_gpu": False},
    "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
}  # fmt: skip


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HDET_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.fixture(scope="module")
def finished(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> tuple[Path, Path, str]:
    tmp = scratch(request, "local")
    suite = tmp / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    out = tmp / "lines.jsonl"
    r = _run(tmp, str(suite), "--out", str(out), "--jobs", "2", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp, out, r.stdout


def test_every_training_leaves_its_line(finished: tuple[Path, Path, str]) -> None:
    _, out, stdout = finished
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["key"] for x in lines) == [
        "local-tiny/baseline/seed0", "local-tiny/baseline/seed1",
        "local-tiny/confirmatory/seed0", "local-tiny/confirmatory/seed1",
    ]  # fmt: skip
    for x in lines:
        assert x["status"] == "completed", x
        assert x["device"] == "cpu" and x["amp"] is False
        assert 0.0 <= x["test"]["AP"] <= 1.0
        assert [h["epoch"] for h in x["history"]] == [1, 2]
        assert all(h["loss"] > 0 for h in x["history"])
    # the same seed, two losses: the arms differ from the first epoch's loss on
    by_key = {x["key"]: x for x in lines}
    base, conf = by_key["local-tiny/baseline/seed0"], by_key["local-tiny/confirmatory/seed0"]
    assert base["history"][0]["loss"] != conf["history"][0]["loss"]
    assert "train_pushed_down_share" in conf["history"][-1]
    assert "paired over seeds [0, 1]" in stdout
    assert "verdict: On AP" in stdout


def test_a_rerun_trains_only_what_is_missing(finished: tuple[Path, Path, str]) -> None:
    tmp, out, _ = finished
    lines = out.read_text().splitlines()
    kept = [x for x in lines if "confirmatory/seed1" not in x]
    partial = tmp / "partial.jsonl"
    partial.write_text("\n".join(kept) + "\n")
    r = _run(tmp, str(tmp / "suite.yaml"), "--out", str(partial), "--jobs", "1", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    trained = [x for x in r.stdout.splitlines() if ": completed" in x]
    assert trained and all("local-tiny/confirmatory/seed1" in x for x in trained), r.stdout
    assert len(partial.read_text().splitlines()) == 4


def test_report_reads_the_lines(finished: tuple[Path, Path, str]) -> None:
    tmp, out, _ = finished
    r = _run(tmp, "--report", str(out))
    assert r.returncode == 0, r.stderr
    assert "local-tiny (retinanet, cpu, amp False)" in r.stdout
    assert "no detectable difference" in r.stdout


def test_a_suite_without_both_arms_is_refused(tmp_path: Path) -> None:
    bad = {**SUITE, "search": {**SUITE["search"], "baseline": False}}  # type: ignore[dict-item]
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump(bad))
    r = _run(tmp_path, str(suite), "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode != 0
    assert "needs search.baseline and search.confirmatory" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()
