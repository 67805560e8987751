"""``hdet bench eval`` from the command line router: this project's evaluation and pycocotools' agree
on a generated set, and the ratio of their times is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.cli import main as hdet


def test_bench_eval_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert hdet(["bench", "eval", "--images", "40", "--dets-per-image", "10", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["max_abs_stats_diff"] <= 1e-9
    assert res["ratio"] > 0 and res["detections"] > 0
    assert "ratio (harmonic / pycocotools)" in capsys.readouterr().out
